"""Atomic writes that replace only doge's own outputs (doge_cli/io.py)."""

import errno
import json

import pytest

from doge_cli.errors import DogeError
from doge_cli.io import (
    OUTPUT_MARKER,
    atomic_dir,
    atomic_file,
    check_component,
    check_file_target,
    check_replaceable,
    write_json,
    write_text_atomic,
)


def test_atomic_dir_marks_its_output_and_replaces_only_marked_or_empty_folders(tmp_path):
    with atomic_dir(tmp_path / "out", kind="test") as tmp:
        (tmp / "a.txt").write_text("1")
    marker = json.loads((tmp_path / "out" / OUTPUT_MARKER).read_text())
    assert marker["kind"] == "test" and (tmp_path / "out" / "a.txt").read_text() == "1"
    with atomic_dir(tmp_path / "out", kind="test") as tmp:
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [OUTPUT_MARKER, "b.txt"]
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "x").write_text("keep")
    with pytest.raises(DogeError, match="did not write"):
        with atomic_dir(tmp_path / "theirs", kind="test"):
            raise AssertionError("never reached: refused before any work")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_atomic_dir_failure_leaves_the_old_output(tmp_path):
    with atomic_dir(tmp_path / "out", kind="test") as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "out", kind="test") as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("boom")
    assert (tmp_path / "out" / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_file_is_whole_or_absent(tmp_path, monkeypatch):
    target = tmp_path / "f.txt"
    write_text_atomic(target, "one")
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert target.read_text() == "one" and sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("os.replace", full)
    with pytest.raises(DogeError, match="disk full"):
        write_json(target, {"a": 1})
    assert target.read_text() == "one"


@pytest.mark.parametrize("name", ["my-corpus", "web.2024", "a_b+c=d@e"])
def test_plain_names_pass(name):
    assert check_component(name) == name


def test_file_targets_are_replaced_only_when_recognised(tmp_path):
    mine = tmp_path / "mine.json"
    mine.write_text('{"ours": true}')
    assert check_file_target(mine, is_ours=lambda p: "ours" in p.read_text()) == mine
    with pytest.raises(DogeError, match="not one doge wrote"):
        check_file_target(mine, is_ours=lambda p: False)
    with pytest.raises(DogeError, match="is a folder"):
        check_file_target(tmp_path)
    with pytest.raises(DogeError, match="does not exist"):
        check_file_target(tmp_path / "no" / "f.json")
    check_replaceable(tmp_path / "absent")  # nothing there: fine


def test_atomic_files_get_the_permissions_a_plain_write_would(tmp_path):
    import os
    import stat

    from doge_cli.io import write_json, write_text_atomic

    old = os.umask(0o027)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        write_text_atomic(tmp_path / "b.txt", "hi")
        (tmp_path / "plain.txt").write_text("hi")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {"a.json": 0o640, "b.txt": 0o640, "plain.txt": 0o640}  # not mkstemp's 0600


def test_a_doge_folder_with_the_users_files_inside_is_not_replaced(tmp_path):
    import pytest

    from doge_cli.errors import DogeError
    from doge_cli.io import atomic_dir, check_replaceable

    out = tmp_path / "model"
    with atomic_dir(out, kind="model") as tmp:
        (tmp / "weights.bin").write_text("w")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "x.json").write_text("{}")
    check_replaceable(out)  # only doge's files: replaceable
    (out / "README.md").write_text("my edited card")
    with pytest.raises(DogeError, match="holds README.md, which doge did not write there"):
        check_replaceable(out, "--out")
    with pytest.raises(DogeError, match="holds README.md"):
        with atomic_dir(out, kind="model") as tmp:
            (tmp / "weights.bin").write_text("new")
    assert (out / "README.md").read_text() == "my edited card" and (out / "weights.bin").read_text() == "w"
    (out / "README.md").unlink()
    with atomic_dir(out, kind="model") as tmp:
        (tmp / "weights.bin").write_text("new")
    assert (out / "weights.bin").read_text() == "new"
