import json

import datasets
import pytest

from doge_cli.data.download import import_local
from doge_cli.errors import DogeError


def _load(root, stage, name):
    return datasets.load_from_disk(str(root / stage / name))


def test_jsonl_with_field_mapping(tmp_path):
    src = tmp_path / "chats.jsonl"
    rows = [{"conv": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}] * 3
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = import_local(src, tmp_path / "ds", stage="sft", fields={"messages": "conv"})
    assert m["rows"] == 3 and m["source"].startswith("local:")
    assert _load(tmp_path / "ds", "sft", "chats")[0]["messages"] == [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def test_csv_parquet_txt_and_folders(tmp_path):
    (tmp_path / "a.csv").write_text("q,a,bad\nWhat?,This,That\n")
    import_local(tmp_path / "a.csv", tmp_path / "ds", stage="dpo",
                 fields={"prompt": "q", "chosen": "a", "rejected": "bad"})
    row = _load(tmp_path / "ds", "dpo", "a")[0]
    assert row == {"prompt": [{"role": "user", "content": "What?"}], "chosen": "This", "rejected": "That"}

    datasets.Dataset.from_dict({"problem": ["1+1?"], "solution": ["so \\boxed{2}"]}).to_parquet(str(tmp_path / "g.parquet"))
    import_local(tmp_path / "g.parquet", tmp_path / "ds", stage="grpo")
    assert _load(tmp_path / "ds", "grpo", "g")[0] == {"prompt": "1+1?", "answer": "2"}

    txt = tmp_path / "books"
    txt.mkdir()
    (txt / "one.txt").write_text("First paragraph.\n\nSecond paragraph.\n")
    (txt / "two.txt").write_text("Third.\n")
    import_local(txt, tmp_path / "ds", stage="pt")
    assert len(_load(tmp_path / "ds", "pt", "books")) == 3


def test_local_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": broken}\n')
    with pytest.raises(DogeError, match=r"bad.jsonl:3: malformed JSON"):
        import_local(bad, tmp_path / "ds", stage="pt")
    good = tmp_path / "good.jsonl"
    good.write_text('{"body": "x", "title": "y"}\n')
    with pytest.raises(DogeError, match=r"no 'text' field.*fields: body, title"):
        import_local(good, tmp_path / "ds", stage="pt")
    with pytest.raises(DogeError, match=r"no field 'txt'.*fields: body, title"):
        import_local(good, tmp_path / "ds", stage="pt", fields={"text": "txt"})
    latin = tmp_path / "latin.txt"
    latin.write_bytes("line one\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(DogeError, match=r"latin.txt:2: text is not UTF-8"):
        import_local(latin, tmp_path / "ds", stage="pt")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DogeError, match="is empty"):
        import_local(tmp_path / "empty.jsonl", tmp_path / "ds", stage="pt")
    with pytest.raises(DogeError, match="does not exist"):
        import_local(tmp_path / "missing.jsonl", tmp_path / "ds", stage="pt")
    assert not (tmp_path / "ds").exists() or not any((tmp_path / "ds").rglob("state.json"))


@pytest.mark.parametrize("lines, match", [
    (['{"text": 42}', '{"text": 7}'], "holds int64 values, not text"),
    (['{"text": ["a", "b"]}'], "holds list values, not text"),
    (['{"text": "ok"}', '{"text": 5}'], "mixed"),
    (['["a", "b"]'], ":1: each JSON line must be an object"),
    (['{"text": "ok"}', "[1, 2]"], ":2: each JSON line must be an object"),
    (['{"text": "ok"}', '"just a string"'], ":2: each JSON line must be an object"),
])
def test_rows_that_are_not_text_are_refused(tmp_path, lines, match):
    from doge_cli.data.download import import_local

    f = tmp_path / "bad.jsonl"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(DogeError, match=match):
        import_local(f, tmp_path / "ds", stage="pt")
    assert not (tmp_path / "ds").exists()


def test_name_escaping_the_save_dir_is_refused(tmp_path):
    from doge_cli.data.download import import_local

    f = tmp_path / "ok.jsonl"
    f.write_text('{"text": "hello"}\n')
    for name in ("../../outside", "/tmp/abs", "a/b"):
        with pytest.raises(DogeError, match="plain name"):
            import_local(f, tmp_path / "ds", stage="pt", name=name)
    assert not (tmp_path / "ds").exists() and not (tmp_path / "outside").exists()
    import_local(f, tmp_path / "ds", stage="pt", name="my-corpus")
    assert (tmp_path / "ds" / "pt" / "my-corpus").is_dir()


def test_a_large_file_is_streamed_in_batches_in_order(tmp_path, monkeypatch):
    from doge_cli.data import local

    monkeypatch.setattr(local, "BATCH_ROWS", 3)
    f = tmp_path / "many.jsonl"
    rows = [{"text": f"doc {i}"} if i % 4 else {"text": f"doc {i}", "prompt": f"q {i}"} for i in range(10)]
    rows[5]["text"] = "   "  # dropped: empty after stripping
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = import_local(f, tmp_path / "ds", stage="pt")
    saved = _load(tmp_path / "ds", "pt", "many")
    assert m["rows"] == 9 and saved["text"] == [r["text"] for r in rows if r["text"].strip()]
    assert saved["prompt"] == ["q 0" if i == 0 else "q 4" if i == 4 else "q 8" if i == 8 else ""
                               for i in range(10) if i != 5]
    import_local(f, tmp_path / "ds", stage="pt", name="first7", max_examples=7)
    assert _load(tmp_path / "ds", "pt", "first7")["text"] == [f"doc {i}" for i in range(7) if i != 5]


def test_a_problem_in_a_later_batch_leaves_nothing_behind(tmp_path, monkeypatch):
    from doge_cli.data import local

    monkeypatch.setattr(local, "BATCH_ROWS", 2)
    f = tmp_path / "late.jsonl"
    f.write_text("".join(json.dumps({"text": "fine"}) + "\n" for _ in range(6)) + '{"text": 12}\n')
    with pytest.raises(DogeError, match="holds int64 values, not text"):  # the fourth batch holds only the 12
        import_local(f, tmp_path / "ds", stage="pt")
    f.write_text("".join(json.dumps({"text": "fine"}) + "\n" for _ in range(6)) + '{"text": "ok"\n')
    with pytest.raises(DogeError, match=r"late.jsonl:7: malformed JSON line"):
        import_local(f, tmp_path / "ds", stage="pt")
    assert not (tmp_path / "ds").exists()
