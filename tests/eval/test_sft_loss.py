"""Held-out assistant-token loss: only label tokens count, each once."""

import math

import pytest

from doge_cli.errors import DogeError


def test_assistant_token_loss_counts_only_label_tokens(tmp_path):
    import datasets

    from doge_cli.eval.sft_loss import assistant_token_loss
    from tests.chat.toymodel import GAP, forced_model, make_chat_tokenizer

    tok = make_chat_tokenizer(tmp_path / "tok")
    model = forced_model(tok, {100: 101, 101: 102})
    rows = {"input_ids": [[100, 101, 102, 7], [100, 55]], "labels": [[-100, 101, 102, -100], [-100, 55]]}
    split = datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows)})
    split.save_to_disk(str(tmp_path / "sft"))
    result = assistant_token_loss(model, tmp_path / "sft", batch_size=1)
    # Two forced tokens cost ~0, the unforced 55 costs GAP + log(1 + (V - 1) e^-GAP) ~ GAP.
    hard = GAP + math.log(1 + (model.config.vocab_size - 1) * math.exp(-GAP))
    assert result["tokens"] == 3 and result["rows"] == 2
    assert result["loss"] == pytest.approx(hard / 3, rel=1e-3)
    with pytest.raises(DogeError, match="no 'train' split"):
        assistant_token_loss(model, tmp_path / "sft", split="train")
