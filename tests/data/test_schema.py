"""Canonical columns per stage: messages in either layout, and each stage's normalisation."""

import datasets
import pytest

from doge_cli.data.schema import normalize, to_messages
from doge_cli.errors import DogeError


def test_messages_in_either_layout_with_role_aliases():
    assert to_messages([{"from": "human", "value": "hi"}, {"from": "gpt", "value": 3}], "x") == [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "3"}]
    with pytest.raises(DogeError, match="expected a list of messages"):
        to_messages("hi", "x")
    with pytest.raises(DogeError, match="need 'role' and 'content'"):
        to_messages([{"speaker": "a"}], "x")


def test_each_stage_maps_onto_its_columns():
    pt = normalize(datasets.Dataset.from_dict({"content": ["a", " ", None]}), "pt")
    assert pt.column_names == ["text"] and pt["text"] == ["a"]  # empty rows dropped
    sft = normalize(datasets.Dataset.from_dict({"prompt": ["q"], "answer": ["a"], "system": ["be kind"]}), "sft",
                    {"prompt": "prompt"})
    assert sft["messages"] == [[{"role": "system", "content": "be kind"}, {"role": "user", "content": "q"},
                                {"role": "assistant", "content": "a"}]]
    dpo = normalize(datasets.Dataset.from_dict({
        "prompt": ["q"], "chosen": [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}]],
        "rejected": ["bad"]}), "dpo")
    assert dpo[0] == {"prompt": [{"role": "user", "content": "q"}], "chosen": "good", "rejected": "bad"}
    grpo = normalize(datasets.Dataset.from_dict({"problem": ["2+2?"], "solution": ["so \\boxed{4}"]}), "grpo")
    assert grpo[0] == {"prompt": "2+2?", "answer": "4"}


def test_unknown_stage_and_unmapped_fields_are_one_line_errors():
    ds = datasets.Dataset.from_dict({"body": ["a"]})
    with pytest.raises(DogeError, match="unknown stage 'rl'"):
        normalize(ds, "rl")
    with pytest.raises(DogeError, match="no 'text' field for stage pt; fields: body; map one with --text-field"):
        normalize(ds, "pt")
    assert normalize(ds, "pt", {"text": "body"})["text"] == ["a"]
