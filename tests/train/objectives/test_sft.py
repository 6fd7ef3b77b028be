"""SFT: assistant-only targets, packing without cross-conversation targets, learning, resume, bad data."""

import datasets
import pytest
import torch

from doge_cli.config import resolve_config
from doge_cli.errors import DogeError
from doge_cli.train.objectives import objective_for
from doge_cli.train.objectives.sft import shift_labels

from .chat_fixtures import built_objective, final_weights, metrics, rows, run_stage


def objective(data, init, tmp_path, **extra):
    return built_objective("sft", data, init, tmp_path, **extra)


def test_decoded_targets_are_exactly_the_assistant_turns(sft_data, chat_root, tok, tmp_path):
    from doge_cli.data.builtin import builtin_dataset

    raw = builtin_dataset("math-sft", max_examples=360)
    obj = objective(sft_data, chat_root / "start", tmp_path, packing="false")
    idx = [0, 1, 2]
    batch = obj.collate(rows(obj.train_data, idx))
    for r, (ids, targets) in enumerate(zip(batch["input_ids"], batch["labels"])):
        predicted = targets[targets != -100].tolist()
        # each target is the token one position later: the reply (with its end-of-turn) only
        assert predicted == ids[1:][targets[:-1] != -100].tolist()
        expected = raw[40 + idx[r]]["messages"][-1]["content"].strip() + "<|eot_id|>"
        assert tok.decode(predicted) == expected


def test_packing_gives_same_targets_and_no_cross_conversation_target(sft_data, chat_root, tmp_path):
    packed = objective(sft_data, chat_root / "start", tmp_path).collate(rows(datasets.load_from_disk(str(sft_data))["train"], [3, 4, 5]))
    padded = objective(sft_data, chat_root / "start", tmp_path, packing="false").collate(
        rows(datasets.load_from_disk(str(sft_data))["train"], [3, 4, 5]))
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    assert packed["labels"][packed["labels"] != -100].tolist() == padded["labels"][padded["labels"] != -100].tolist()
    starts = (packed["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert len(starts) == 3
    for s in starts[1:]:
        assert packed["labels"][0, s - 1] == -100  # the last token of a conversation never predicts the next one


def test_shift_labels_respects_document_starts():
    labels = torch.tensor([[-100, 5, 6, -100, 7, 8]])
    pos = torch.tensor([[0, 1, 2, 0, 1, 2]])
    assert shift_labels(labels, pos).tolist() == [[5, 6, -100, 7, 8, -100]]
    labels = torch.tensor([[-100, 5, 6, 9, 7, 8]])
    assert shift_labels(labels, pos).tolist() == [[5, 6, -100, 7, 8, -100]]


def held_out_loss(model_dir, data, tmp_path):
    from doge_cli.model import load_model

    obj = objective(data, model_dir, tmp_path, packing="false")
    model = load_model(model_dir, attn_implementation="sdpa")
    total, n = 0.0, 0
    with torch.no_grad():
        for lo in range(0, 40, 8):
            batch = obj.collate(rows(obj.eval_data, list(range(lo, lo + 8))))
            total += float(obj.loss(model, batch).loss_sum)
            n += obj.count_targets(batch)
    return total / n


def test_sft_lowers_held_out_assistant_loss_and_exports(sft_data, chat_root, tmp_path):
    result = run_stage("sft", sft_data, tmp_path / "run", chat_root / "start", steps=30)
    before = held_out_loss(chat_root / "start", sft_data, tmp_path)
    after = held_out_loss(result.final_dir, sft_data, tmp_path)
    assert after < before - 1.0, (before, after)

    from transformers import AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(result.final_dir)
    gen = GenerationConfig.from_pretrained(result.final_dir)
    assert tok.chat_template and "generation" in tok.chat_template
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    assert tok.convert_tokens_to_ids("<|eot_id|>") in eos and gen.pad_token_id == tok.pad_token_id


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_sft_resume_equals_straight_run(sft_data, chat_root, tmp_path, optimizer):
    opt = {"optim.name": optimizer}
    run_stage("sft", sft_data, tmp_path / "straight", chat_root / "start", steps=6, **opt)
    run_stage("sft", sft_data, tmp_path / "resumed", chat_root / "start", steps=6, stop_after=3,
              **{"checkpoint.every": 3, **opt})
    run_stage("sft", sft_data, tmp_path / "resumed", chat_root / "start", steps=6, resume="auto",
              **{"checkpoint.every": 3, **opt})
    assert [m["loss"] for m in metrics(tmp_path / "straight")] == [m["loss"] for m in metrics(tmp_path / "resumed")]
    a, b = final_weights(tmp_path / "straight" / "final"), final_weights(tmp_path / "resumed" / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_conversation_without_assistant_turn_is_a_one_line_error(sft_data, chat_root, tmp_path):
    dd = datasets.load_from_disk(str(sft_data))
    train = dd["train"].select(range(10)).to_list()
    train[3]["labels"] = [-100] * len(train[3]["labels"])
    bad = tmp_path / "bad"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(train)}).save_to_disk(str(bad))
    with pytest.raises(DogeError, match="row 3 .*no assistant tokens") as err:
        objective(bad, chat_root / "start", tmp_path, **{"data.tokenizer": str(chat_root / "tokenizer")})
    assert "\n" not in str(err.value)


def test_missing_model_is_a_one_line_error(sft_data, tmp_path):
    from .chat_fixtures import overrides

    cfg = resolve_config("sft", hardware="cpu", overrides=overrides(sft_data, tmp_path / "o", "x"))
    cfg.init_from = None
    with pytest.raises(DogeError, match="--model"):
        objective_for(cfg).setup()
