import datasets
import numpy as np
import pytest

from doge_cli.data.blocks import TokenStream
from doge_cli.data.tokenization import tokenize_stage
from doge_cli.data.tokenizer import load_tokenizer, train_tokenizer
from doge_cli.errors import DogeError


def _tok(path):
    return load_tokenizer(str(path))


def test_pretraining_blocks_keep_every_token(work_dir, tokenizer_dir):
    tokenize_stage(str(tokenizer_dir), work_dir, "pt", 64, sources=["python-docs"], progress=False)
    tok = _tok(tokenizer_dir)
    stream = TokenStream(work_dir / "tokenized/pt/python-docs")
    ids, pos = (np.stack(x) for x in zip(*(stream.block(b) for b in range(stream.blocks))))
    assert ids.shape[1] == 64 and pos.shape == ids.shape
    raw = datasets.load_from_disk(str(work_dir / "pt/python-docs"))["text"]
    expected = np.concatenate([np.array(tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
                               for t in raw])
    flat = ids.reshape(-1)
    assert np.array_equal(flat[: len(expected)], expected)
    assert np.all(flat[len(expected):] == tok.pad_token_id)
    # One new document (cumsum of position 0) per EOS-terminated document, plus block restarts.
    flat_pos = pos.reshape(-1)[: len(expected)]
    doc_starts = np.concatenate(([0], np.flatnonzero(expected == tok.eos_token_id)[:-1] + 1))
    assert np.all(flat_pos[doc_starts] == 0)
    assert np.all(pos[:, 0] == 0)


def test_prompt_text_rows_are_rendered_as_conversations(work_dir, tokenizer_dir):
    ds = datasets.Dataset.from_dict({"prompt": ["Write a verse."], "text": ["Let there be light."]})
    ds.save_to_disk(str(work_dir / "pt/cosmo"))
    tokenize_stage(str(tokenizer_dir), work_dir, "pt", 128, sources=["cosmo"], identity="You are Doge.",
                   progress=False)
    tok = _tok(tokenizer_dir)
    ids = TokenStream(work_dir / "tokenized/pt/cosmo").block(0)[0].tolist()
    text = tok.decode([i for i in ids if i != tok.pad_token_id])
    assert text == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are Doge.<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\nWrite a verse.<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\nLet there be light.<|eot_id|>")


@pytest.mark.parametrize("stage,source", [("sft", "chatterbot"), ("r1", "math-r1")])
def test_labels_cover_exactly_the_assistant_replies(work_dir, tokenizer_dir, stage, source):
    tokenize_stage(str(tokenizer_dir), work_dir, stage, 1024, sources=[source], progress=False)
    tok = _tok(tokenizer_dir)
    raw = datasets.load_from_disk(str(work_dir / stage / source))
    out = datasets.load_from_disk(str(work_dir / "tokenized" / stage / source))
    assert len(out) == len(raw)
    for conv, row in zip(raw.select(range(20))["messages"], out.select(range(20))):
        replies = "".join(m["content"].strip() + "<|eot_id|>" for m in conv if m["role"] == "assistant")
        assert tok.decode([t for t in row["labels"] if t != -100]) == replies
        assert row["position_ids"] == list(range(len(row["input_ids"])))
        assert [t for t, lab in zip(row["input_ids"], row["labels"]) if lab != -100] == \
            [t for t in row["labels"] if t != -100]
    if stage == "r1":
        assert "<|begin_of_thought|>" in tok.decode(out[0]["input_ids"])
        assert tok.decode(out[0]["input_ids"]).count("<|start_header_id|>system") == 1


def test_packed_sft_restarts_positions(work_dir, tokenizer_dir):
    tokenize_stage(str(tokenizer_dir), work_dir, "sft", 256, sources=["math-sft"], pack=True, progress=False)
    out = datasets.load_from_disk(str(work_dir / "tokenized/sft/math-sft"))
    raw_rows = len(datasets.load_from_disk(str(work_dir / "sft/math-sft")))
    assert len(out) < raw_rows
    assert sum(r.count(0) for r in out["position_ids"]) == raw_rows
    assert all(len(r) <= 256 for r in out["input_ids"])


def test_dpo_columns_follow_trl(work_dir, tokenizer_dir):
    tokenize_stage(str(tokenizer_dir), work_dir, "dpo", 256, sources=["math-dpo"], progress=False)
    tok = _tok(tokenizer_dir)
    raw = datasets.load_from_disk(str(work_dir / "dpo/math-dpo"))[0]
    row = datasets.load_from_disk(str(work_dir / "tokenized/dpo/math-dpo"))[0]
    assert tok.decode(row["prompt_input_ids"]) == tok.apply_chat_template(
        raw["prompt"], tokenize=False, add_generation_prompt=True)
    assert tok.decode(row["chosen_input_ids"]) == raw["chosen"] + "<|eot_id|>"
    assert tok.decode(row["rejected_input_ids"]) == raw["rejected"] + "<|eot_id|>"


def test_grpo_prompts_are_messages_with_answers(work_dir, tokenizer_dir):
    tokenize_stage(str(tokenizer_dir), work_dir, "grpo", 512, progress=False)
    out = datasets.load_from_disk(str(work_dir / "tokenized/grpo/math-grpo"))
    raw = datasets.load_from_disk(str(work_dir / "grpo/math-grpo"))
    assert out[0]["prompt"][-1] == {"role": "user", "content": raw[0]["prompt"]}
    assert out[0]["prompt"][0]["role"] == "system" and out[0]["answer"] == raw[0]["answer"]


def test_cache_is_reused_and_invalidated_by_a_new_tokenizer(work_dir, tokenizer_dir, tmp_path):
    first = tokenize_stage(str(tokenizer_dir), work_dir, "sft", 128, sources=["math-sft"], progress=False)
    again = tokenize_stage(str(tokenizer_dir), work_dir, "sft", 128, sources=["math-sft"], progress=False)
    assert not first[0]["cached"] and again[0]["cached"]
    other = tmp_path / "tok-b"
    train_tokenizer(other, datasets_dir=work_dir, vocab_size=450)
    changed = tokenize_stage(str(other), work_dir, "sft", 128, sources=["math-sft"], progress=False)
    assert not changed[0]["cached"]
    ids = datasets.load_from_disk(str(work_dir / "tokenized/sft/math-sft"))[0]["input_ids"]
    assert ids == _tok(other).apply_chat_template(
        datasets.load_from_disk(str(work_dir / "sft/math-sft"))[0]["messages"], tokenize=True, return_dict=True
    )["input_ids"]
    longer = tokenize_stage(str(other), work_dir, "sft", 256, sources=["math-sft"], progress=False)
    assert not longer[0]["cached"]


def test_missing_stage_and_source_are_user_errors(work_dir, tokenizer_dir, tmp_path):
    with pytest.raises(DogeError, match="no pt data"):
        tokenize_stage(str(tokenizer_dir), tmp_path, "pt", 128)
    with pytest.raises(DogeError, match="no source 'nope'"):
        tokenize_stage(str(tokenizer_dir), work_dir, "pt", 128, sources=["nope"])


def test_every_stage_is_checked_before_any_is_written(work_dir, tokenizer_dir):
    from doge_cli.data.tokenization import tokenize_stages

    # SFT conversations cannot keep an assistant token in 16 tokens (the header alone is longer), so
    # the sft stage fails; pt is listed first and must not have been written.
    with pytest.raises(DogeError, match="sft/.*nothing left after tokenizing"):
        tokenize_stages(str(tokenizer_dir), work_dir, ["pt", "sft"], 16, progress=False)
    assert not (work_dir / "tokenized").exists()


def test_tokenized_folder_not_written_by_doge_is_refused_up_front(work_dir, tokenizer_dir):
    from doge_cli.data.tokenization import tokenize_stages

    foreign = work_dir / "tokenized" / "pt" / "python-docs"
    foreign.mkdir(parents=True)
    (foreign / "mine.txt").write_text("keep")
    with pytest.raises(DogeError, match="did not write"):
        tokenize_stages(str(tokenizer_dir), work_dir, ["sft", "pt"], 64, progress=False)
    assert sorted(p.name for p in (work_dir / "tokenized").iterdir()) == ["pt"]  # sft was not written first
    assert [p.name for p in foreign.iterdir()] == ["mine.txt"]


@pytest.mark.parametrize("length", [0, 15, 10**12])
def test_absurd_max_length_is_refused(work_dir, tokenizer_dir, length):
    with pytest.raises(DogeError, match="--max-length"):
        tokenize_stage(str(tokenizer_dir), work_dir, "pt", length)


@pytest.mark.parametrize("stage,source,pack,length", [("sft", "math-sft", True, 256), ("dpo", "math-dpo", False, 256),
                                                      ("grpo", "math-grpo", False, 1024)])
def test_chat_stages_stream_in_batches_and_workers_to_the_in_memory_result(work_dir, tokenizer_dir, tmp_path,
                                                                           monkeypatch, stage, source, pack, length):
    """Batches of 7 rows (packing carries a row across them), in 2 worker processes, against the in-memory
    tokenization of the whole source at once."""
    from doge_cli.chat_format import R1_SYSTEM_PROMPT
    from doge_cli.data import tokenization
    from doge_cli.data.tokenization import prepare_grpo, tokenize_chat, tokenize_dpo

    monkeypatch.setattr(tokenization, "CHAT_BATCH_ROWS", 7)
    tokenize_stage(str(tokenizer_dir), work_dir, stage, length, sources=[source], pack=pack, num_proc=2,
                   progress=False)
    got = datasets.load_from_disk(str(work_dir / "tokenized" / stage / source))
    raw = datasets.load_from_disk(str(work_dir / stage / source))
    tok = _tok(tokenizer_dir)
    if stage == "sft":
        want = tokenize_chat(raw, tok, length, system=None, pack=True, num_proc=None)
    elif stage == "dpo":
        want = tokenize_dpo(raw, tok, length, system=None, num_proc=None)
    else:
        want = prepare_grpo(raw, tok, length, system=R1_SYSTEM_PROMPT)
    assert got.to_dict() == want.to_dict() and len(got) > 0
