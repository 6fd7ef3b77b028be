"""Pretraining data as token streams: the blocks equal the former int32-column format's, the merged index
equals the former DatasetDict merge, training sees the same batches (same losses), a stopped tokenize
resumes to identical files, N shards merge to the one-machine result, and bad inputs are one line."""

from __future__ import annotations

import json
import shutil

import datasets
import numpy as np
import pytest

from doge_cli.data import tokenization
from doge_cli.data.blocks import BlockRows, TokenStream, open_merged, parse_shard, shard_rows
from doge_cli.data.merge import merge_stage
from doge_cli.data.tokenization import tokenize_stages
from doge_cli.data.tokenizer import load_tokenizer
from doge_cli.errors import DogeError
from tests.data.reference_packing import pack_documents

SOURCES = ["bible-kjv", "fortunes", "python-docs"]
LENGTH = 64


def _old_blocks(work_dir, tokenizer_dir, source, length=LENGTH):
    """The former format: every document's ids + EOS, packed by the former packer."""
    tok = load_tokenizer(str(tokenizer_dir))
    texts = datasets.load_from_disk(str(work_dir / "pt" / source))["text"]
    docs = [np.asarray(tok(t, add_special_tokens=False)["input_ids"], dtype=np.int32) for t in texts]
    ids, pos = zip(*pack_documents(docs, length, tok.eos_token_id, tok.pad_token_id))
    return np.concatenate(ids), np.concatenate(pos)


def _tokenize(work_dir, tokenizer_dir, **kwargs):
    return tokenize_stages(str(tokenizer_dir), work_dir, ["pt"], LENGTH, sources=SOURCES, progress=False, **kwargs)


def _rows(rows: BlockRows):
    got = rows[list(range(len(rows)))]
    return np.stack(got["input_ids"]), np.stack(got["position_ids"])


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.bin"))}


def test_blocks_equal_the_former_packed_columns(work_dir, tokenizer_dir):
    manifests = _tokenize(work_dir, tokenizer_dir)
    for source, manifest in zip(SOURCES, manifests):
        stream = TokenStream(work_dir / "tokenized" / "pt" / source)
        ids, pos = zip(*(stream.block(b) for b in range(stream.blocks)))
        old_ids, old_pos = _old_blocks(work_dir, tokenizer_dir, source)
        assert np.array_equal(np.stack(ids), old_ids) and np.array_equal(np.stack(pos), old_pos)
        assert manifest["dtype"] == "<u2" and manifest["bytes"] <= 2.125 * manifest["tokens"] + 1
        assert manifest["documents"] == len(datasets.load_from_disk(str(work_dir / "pt" / source)))


def test_the_merged_index_holds_the_rows_a_datasetdict_merge_holds(work_dir, tokenizer_dir):
    """The former merge (select, concatenate, seeded shuffle of the packed rows; still what the other
    stages get) against the index over the same blocks."""
    from doge_cli.data.storage import save_dataset

    _tokenize(work_dir, tokenizer_dir)
    old_root = work_dir / "old"
    for source in SOURCES:
        ids, pos = _old_blocks(work_dir, tokenizer_dir, source)
        ds = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "position_ids": pos.tolist()})
        key = {"tokenizer": "t", "max_length": LENGTH, "stage": "sft"}
        save_dataset(ds, old_root / "tokenized" / "sft" / source, stage="sft", source=source,
                     extra={"cache_key": key, "max_length": LENGTH})
    for train_examples in (None, 900):  # as many as fit without repeats, and an upsampled mixture
        new = merge_stage(work_dir, "pt", train_examples=train_examples, test_examples=12, seed=233)
        old = merge_stage(old_root, "sft", train_examples=train_examples, test_examples=12, seed=233)
        assert new["sources"].keys() == old["sources"].keys()
        assert all(new["sources"][n][k] == old["sources"][n][k] for n in old["sources"] for k in ("train", "test"))
        merged = open_merged(work_dir / "merged" / "pt")
        reference = datasets.load_from_disk(str(old_root / "merged" / "sft"))
        for split in ("train", "test"):
            ids, pos = _rows(merged[split])
            assert np.array_equal(ids, np.array(reference[split]["input_ids"]))
            assert np.array_equal(pos, np.array(reference[split]["position_ids"]))
        assert new["bytes"] < 16 * (new["train_rows"] + new["test_rows"]) + 4096  # an index, not a copy


def test_training_on_the_index_gives_the_losses_of_the_former_format(work_dir, tokenizer_dir, tmp_path):
    from doge_cli.config import resolve_config
    from doge_cli.io import write_json
    from doge_cli.train.core import train
    from doge_cli.train.objectives import objective_for

    _tokenize(work_dir, tokenizer_dir)
    merge_stage(work_dir, "pt", train_examples=None, test_examples=8, seed=233)
    merged = open_merged(work_dir / "merged" / "pt")
    old = tmp_path / "old-merged"
    datasets.DatasetDict({split: datasets.Dataset.from_dict(
        dict(zip(("input_ids", "position_ids"), (a.tolist() for a in _rows(merged[split])))))
        for split in ("train", "test")}).save_to_disk(str(old))
    write_json(old / "manifest.json", {"stage": "pt", "tokenizer": str(tokenizer_dir)})
    losses = {}
    for name, path in (("index", work_dir / "merged" / "pt"), ("columns", old)):
        cfg = resolve_config("pt", recipe=None, hardware="cpu", overrides=[
            f"data.path={path}", f"data.tokenizer={tokenizer_dir}", f"data.max_length={LENGTH}",
            f"output_dir={tmp_path / name}", "model.hidden_size=32", "model.intermediate_size=64",
            "model.num_hidden_layers=2", "model.num_attention_heads=2", "model.num_key_value_heads=1",
            f"model.max_position_embeddings={LENGTH}", "train.max_steps=6", "train.global_batch_size=4",
            "runtime.micro_batch_size=2", "runtime.precision=fp32", "runtime.attn_implementation=sdpa",
            "logging.log_every=1", "logging.eval_every=3", "logging.eval_batches=2", "checkpoint.every=0"])
        train(cfg, objective_for(cfg))
        records = [json.loads(ln) for ln in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [(r.get("loss"), r.get("eval_loss")) for r in records]
    assert losses["index"] == losses["columns"]  # bit for bit: the same batches
    assert sum(1 for _, e in losses["index"] if e is not None) >= 2


def test_a_stopped_tokenize_resumes_to_the_files_of_an_uninterrupted_run(work_dir, tokenizer_dir, tmp_path,
                                                                            monkeypatch):
    from doge_cli.data import blocks

    other = tmp_path / "straight"
    shutil.copytree(work_dir, other)
    monkeypatch.setattr(tokenization, "PT_BATCH_DOCS", 50)
    _tokenize(other, tokenizer_dir)
    straight = _files(other / "tokenized")

    appended = []
    append = blocks.StreamWriter.append

    def crash_on_the_fourth_batch(self, docs):
        append(self, docs)
        appended.append(len(docs))
        if len(appended) == 2:  # bytes of this batch are on disk, its progress is not: as a kill would leave it
            self.flush()
            raise KeyboardInterrupt

    monkeypatch.setattr(blocks.StreamWriter, "append", crash_on_the_fourth_batch)
    with pytest.raises(KeyboardInterrupt):
        _tokenize(work_dir, tokenizer_dir)
    partial = work_dir / "tokenized" / "pt" / "bible-kjv" / ".shard-00000-of-00001.partial"
    progress = json.loads((partial / "progress.json").read_text())
    assert progress["rows_done"] == 50  # one batch recorded; the second's bytes are beyond it
    assert (partial / "tokens.bin").stat().st_size > progress["stream"]["tokens"] * 2
    monkeypatch.setattr(blocks.StreamWriter, "append", append)
    logged = []
    tokenize_stages(str(tokenizer_dir), work_dir, ["pt"], LENGTH, sources=SOURCES, progress=False, log=logged.append)
    assert any("bible-kjv shard-00000-of-00001: resuming after 50 of" in line for line in logged)
    assert _files(work_dir / "tokenized") == straight
    assert not partial.exists()


def test_shards_tokenized_apart_merge_to_the_one_machine_result(work_dir, tokenizer_dir, tmp_path):
    one = tmp_path / "one"
    shutil.copytree(work_dir, one)
    _tokenize(one, tokenizer_dir)
    merge_stage(one, "pt", train_examples=None, test_examples=10, seed=233)
    machines = []
    for index in range(3):  # three machines, each with its own copy of the raw data
        machine = tmp_path / f"machine-{index}"
        shutil.copytree(work_dir, machine)
        manifests = _tokenize(machine, tokenizer_dir, shard=(index, 3))
        assert all(m["shard"] == [index, 3] for m in manifests)
        machines.append(machine)
    for machine in machines[1:]:  # their shard folders copied together
        for source in SOURCES:
            shard = machine / "tokenized" / "pt" / source / next(
                p.name for p in (machine / "tokenized" / "pt" / source).iterdir() if p.name.startswith("shard-"))
            shutil.copytree(shard, machines[0] / "tokenized" / "pt" / source / shard.name)
    merge_stage(machines[0], "pt", train_examples=None, test_examples=10, seed=233)
    want, got = open_merged(one / "merged" / "pt"), open_merged(machines[0] / "merged" / "pt")
    for split in ("train", "test"):
        for a, b in zip(_rows(want[split]), _rows(got[split])):
            assert np.array_equal(a, b)
    for source in SOURCES:
        assert TokenStream(one / "tokenized" / "pt" / source).tokens == \
            TokenStream(machines[0] / "tokenized" / "pt" / source).tokens


def test_incomplete_or_mismatched_shards_and_old_folders_are_one_line(work_dir, tokenizer_dir, tmp_path):
    from doge_cli.data.tokenizer import train_tokenizer

    _tokenize(work_dir, tokenizer_dir, shard=(0, 2))
    with pytest.raises(DogeError, match=r"lacks shard 1 of 2.*--shard 1/2"):
        merge_stage(work_dir, "pt", train_examples=None, test_examples=4)
    other_tok, elsewhere = tmp_path / "tok-b", tmp_path / "machine-b"
    train_tokenizer(other_tok, datasets_dir=work_dir, vocab_size=450)
    shutil.copytree(work_dir, elsewhere, ignore=shutil.ignore_patterns("tokenized"))
    tokenize_stages(str(other_tok), elsewhere, ["pt"], LENGTH, sources=SOURCES, progress=False, shard=(1, 2))
    for source in SOURCES:  # the other machine's shards, made with another tokenizer, copied in
        shutil.copytree(elsewhere / "tokenized" / "pt" / source / "shard-00001-of-00002",
                        work_dir / "tokenized" / "pt" / source / "shard-00001-of-00002")
    with pytest.raises(DogeError, match="tokenized with different settings, tokenizers or raw data"):
        merge_stage(work_dir, "pt", train_examples=None, test_examples=4)
    # Run here, shard 1 replaces the stale copy (another tokenizer) and keeps shard 0.
    tokenize_stages(str(tokenizer_dir), work_dir, ["pt"], LENGTH, sources=SOURCES, progress=False, shard=(1, 2))
    merge_stage(work_dir, "pt", train_examples=None, test_examples=4)
    assert open_merged(work_dir / "merged" / "pt")["train"][0]["input_ids"].shape == (LENGTH,)
    # A source tokenized again after the merge: the index would point at other tokens.
    shutil.rmtree(work_dir / "tokenized" / "pt" / "fortunes" / "shard-00001-of-00002")
    tokenize_stages(str(tokenizer_dir), work_dir, ["pt"], LENGTH, sources=["fortunes"], progress=False, shard=(1, 2))
    with pytest.raises(DogeError, match="fortunes changed after .* was merged; re-run `doge data merge --stage pt`"):
        open_merged(work_dir / "merged" / "pt")
    # The former column format in tokenized/pt: re-tokenize, in one line.
    old = work_dir / "tokenized" / "pt" / "fortunes"
    shutil.rmtree(old)
    datasets.Dataset.from_dict({"input_ids": [[1, 2]], "position_ids": [[0, 1]]}).save_to_disk(str(old))
    with pytest.raises(DogeError, match="older int32 column format; re-run `doge data tokenize --stage pt`"):
        merge_stage(work_dir, "pt", train_examples=None, test_examples=4)


@pytest.mark.parametrize("text", ["2/2", "a/b", "-1/2", "3", "1/0", ""])
def test_bad_shard_specs_are_refused(text):
    with pytest.raises(DogeError, match="--shard"):
        parse_shard(text)


def test_shard_rows_split_every_row_once():
    for rows in (0, 1, 7, 100):
        for count in (1, 2, 3, 8):
            ranges = [shard_rows(rows, i, count) for i in range(count)]
            assert ranges[0][0] == 0 and ranges[-1][1] == rows
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


def test_shards_are_only_for_pretraining(work_dir, tokenizer_dir):
    with pytest.raises(DogeError, match="--shard splits pretraining sources"):
        tokenize_stages(str(tokenizer_dir), work_dir, ["pt", "sft"], LENGTH, shard=(0, 2))


def test_a_tokenized_folder_with_foreign_files_is_refused_before_work(work_dir, tokenizer_dir):
    folder = work_dir / "tokenized" / "pt" / "fortunes"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(DogeError, match=r"holds files doge did not write \(notes.txt\)"):
        _tokenize(work_dir, tokenizer_dir)
    assert not (work_dir / "tokenized" / "pt" / "bible-kjv").exists()
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]
