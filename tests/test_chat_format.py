"""The chat/R1 format's one owner: stop ids, splitting replies, the final answer, boxed answers."""

import pytest

from doge_cli.chat_format import (
    BEGIN_SOLUTION,
    BEGIN_THOUGHT,
    END_SOLUTION,
    END_THOUGHT,
    config_eos_ids,
    final_answer,
    last_boxed,
    stop_ids,
)

R1 = f"{BEGIN_THOUGHT} 2+2 is \\boxed{{5}}? no {END_THOUGHT} {BEGIN_SOLUTION} so \\boxed{{4}} {END_SOLUTION}"


@pytest.mark.parametrize("text, expected", [
    ("\\boxed{\\frac{1}{2}} and \\boxed{3}", "3"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("no box", None),
    ("\\boxed{unclosed", None),
])
def test_last_boxed_balances_braces(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize("text, answer", [
    (R1, "4"),  # the boxed answer of the solution, not the one in the thinking
    (f"{BEGIN_THOUGHT} \\boxed{{7}} {END_THOUGHT} {BEGIN_SOLUTION} 12 {END_SOLUTION}", "12"),
    (f"{BEGIN_THOUGHT} the answer is \\boxed{{7}}", ""),  # unfinished thought: no answer yet
    ("work\nmore work\n42", "42"),  # plain reply: its last line
    ("the answer is \\boxed{9}\nthanks", "9"),
    (f"{BEGIN_SOLUTION} x = 3\nso 3 {END_SOLUTION}", "x = 3\nso 3"),
])
def test_final_answer_reads_only_the_answer_part(text, answer):
    assert final_answer(text) == answer


def test_stop_ids_join_the_config_and_the_tokenizer():
    from types import SimpleNamespace

    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from doge_cli.chat_format import EOD, EOT, PAD

    backend = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1, EOT: 2, EOD: 3, PAD: 4}, unk_token="[UNK]"))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOT, pad_token=PAD, unk_token="[UNK]")
    assert config_eos_ids(SimpleNamespace(eos_token_id=None)) == []
    assert config_eos_ids(SimpleNamespace(eos_token_id=7)) == [7]
    assert stop_ids(SimpleNamespace(eos_token_id=[3]), tok) == [3, 2]
    assert stop_ids(SimpleNamespace(eos_token_id=None), tok) == [2, 3]
