"""`doge data ...` end to end through the CLI, on builtin and local sources, offline."""

import json

import datasets
import pytest
from typer.testing import CliRunner

from doge_cli.cli.main import app, run
from doge_cli.data.blocks import open_merged

runner = CliRunner()


def _ok(args):
    result = runner.invoke(app, args)
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def _fails(argv, capsys, *, match):
    # What the test's own setup printed is not the command's: a datasets progress bar (shown or not
    # depending on what earlier tests switched off) once failed the one-line check.
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run(argv)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2
    assert err.startswith("doge: error: ") and "\n" not in err and "Traceback" not in err
    assert match in err, err
    return err


def test_whole_pipeline_on_builtin_and_local_data(tmp_path):
    ds, tok = tmp_path / "datasets", tmp_path / "tokenizer"
    out = _ok(["data", "download", "--recipe", "quickstart", "--save-dir", str(ds), "--max-examples", "60"])
    assert "pt/bible-kjv: 60 rows" in out and "eval/arithmetic" in out
    manifest = json.loads((ds / "pt/bible-kjv/manifest.json").read_text())
    assert {"source", "revision", "rows", "bytes"} <= set(manifest)
    assert (ds / "eval/chatterbot-mc/test.jsonl").is_file()

    local = tmp_path / "notes.jsonl"
    local.write_text("".join(json.dumps({"body": f"note number {i}"}) + "\n" for i in range(30)))
    _ok(["data", "download", "--local", str(local), "--stage", "pt", "--text-field", "body",
         "--save-dir", str(ds)])

    out = _ok(["data", "train-tokenizer", "--out", str(tok), "--vocab-size", "500", "--datasets-dir", str(ds)])
    assert "tokens (asked for 500)" in out
    out = _ok(["data", "tokenize", "--tokenizer", str(tok), "--datasets-dir", str(ds), "--max-length", "1024"])
    for stage in ("pt", "sft", "dpo", "grpo", "r1"):
        assert f"{stage}/" in out
    assert "\r" not in out and "%|" not in out  # no progress bar frames when the output is not a terminal
    assert (ds / "tokenized/pt/notes/shard-00000-of-00001/tokens.bin").is_file()
    again = _ok(["data", "tokenize", "--tokenizer", str(tok), "--datasets-dir", str(ds), "--max-length", "1024",
                 "--stage", "sft"])
    assert "cached" in again

    _ok(["data", "merge", "--datasets-dir", str(ds), "--stage", "pt", "--train-examples", "100",
         "--test-examples", "10", "--seed", "233", "--ratio", "bible-kjv=1", "--ratio", "fortunes=1"])
    merged = open_merged(ds / "merged/pt")
    assert len(merged["train"]) == 100 and len(merged["test"]) == 10
    assert merged["train"].column_names == ["input_ids", "position_ids"]
    assert merged["train"][0]["input_ids"].shape == (1024,)
    for stage in ("sft", "dpo", "grpo", "r1"):
        _ok(["data", "merge", "--datasets-dir", str(ds), "--stage", stage, "--test-examples", "5"])
        assert (ds / "merged" / stage / "train").is_dir()


def test_user_errors_exit_2_with_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _fails(["data", "download", "--recipe", "pretrain", "--save-dir", str(tmp_path)], capsys,
           match="--recipe quickstart")
    _fails(["data", "download", "--recipe", "nope", "--save-dir", str(tmp_path)], capsys, match="unknown recipe")
    _fails(["data", "download", "--local", str(tmp_path / "none.jsonl")], capsys, match="does not exist")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": 1}\nnot json\n')
    _fails(["data", "download", "--local", str(bad), "--save-dir", str(tmp_path / "d")], capsys,
           match="bad.jsonl:2")
    _fails(["data", "tokenize", "--tokenizer", "SmallDoge/Doge-tokenizer", "--datasets-dir", str(tmp_path / "d"),
            "--stage", "pt"], capsys, match="no pt data")
    _fails(["data", "train-tokenizer", "--out", str(tmp_path / "t"), "--datasets-dir", str(tmp_path / "d")],
           capsys, match="no datasets")
    _fails(["data", "merge", "--datasets-dir", str(tmp_path / "d")], capsys, match="no tokenized pt data")
    _fails(["data", "merge", "--datasets-dir", str(tmp_path / "d"), "--ratio", "x"], capsys, match="bad --ratio")
    assert not (tmp_path / "t").exists()


def test_unknown_and_offline_tokenizer(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ds = tmp_path / "d"
    datasets.Dataset.from_dict({"text": ["x"]}).save_to_disk(str(ds / "pt/x"))
    _fails(["data", "tokenize", "--tokenizer", str(tmp_path / "missing"), "--datasets-dir", str(ds)], capsys,
           match="unknown tokenizer")
    _fails(["data", "tokenize", "--tokenizer", "SmallDoge/Doge-tokenizer", "--datasets-dir", str(ds)], capsys,
           match="offline")
