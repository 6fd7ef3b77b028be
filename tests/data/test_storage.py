import errno

import datasets
import pytest

from doge_cli.data.storage import read_manifest, save_dataset
from doge_cli.errors import DogeError
from doge_cli.io import atomic_dir


def test_save_writes_manifest_and_replaces_atomically(tmp_path):
    ds = datasets.Dataset.from_dict({"text": ["a", "b"]})
    m = save_dataset(ds, tmp_path / "pt/x", stage="pt", source="test", revision="r1")
    assert read_manifest(tmp_path / "pt/x") == m and m["rows"] == 2 and m["bytes"] > 0
    save_dataset(ds.select([0]), tmp_path / "pt/x", stage="pt", source="test")
    assert read_manifest(tmp_path / "pt/x")["rows"] == 1
    assert [p.name for p in (tmp_path / "pt").iterdir()] == ["x"]


def test_disk_full_is_a_user_error_and_leaves_nothing(tmp_path, monkeypatch):
    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", full)
    with pytest.raises(DogeError, match="disk full"):
        save_dataset(datasets.Dataset.from_dict({"text": ["a"]}), tmp_path / "pt/x", stage="pt", source="t")
    assert list((tmp_path / "pt").iterdir()) == []


def test_failure_keeps_the_previous_version(tmp_path):
    from doge_cli.io import OUTPUT_MARKER

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / OUTPUT_MARKER).write_text("{}")  # an earlier doge output
    (tmp_path / "out/keep").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "out", kind="test") as tmp:
            (tmp / "new").write_text("half")
            raise RuntimeError("boom")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (tmp_path / "out/keep").read_text() == "old"


def test_only_doge_outputs_are_replaced(tmp_path):
    from doge_cli.io import OUTPUT_MARKER

    ds = datasets.Dataset.from_dict({"text": ["a"]})
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    with pytest.raises(DogeError, match="did not write"):
        save_dataset(ds, foreign, stage="pt", source="t")
    assert [p.name for p in foreign.iterdir()] == ["thesis.tex"]
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(DogeError, match="not a folder doge wrote"):
        save_dataset(ds, afile, stage="pt", source="t")
    assert afile.read_text() == "x"
    (tmp_path / "empty").mkdir()
    save_dataset(ds, tmp_path / "empty", stage="pt", source="t")  # an empty folder holds nothing to lose
    assert (tmp_path / "empty" / OUTPUT_MARKER).is_file()


@pytest.mark.parametrize("name", ["../escape", "/abs", "a/b", "..", ".", ".hidden", "", "a b", "a\\b"])
def test_names_must_be_one_plain_path_component(name):
    from doge_cli.io import check_component

    with pytest.raises(DogeError, match="plain name"):
        check_component(name)
