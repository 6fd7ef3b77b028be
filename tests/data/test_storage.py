import errno

import datasets
import pytest

from doge_cli.data.storage import atomic_dir, read_manifest, save_dataset
from doge_cli.errors import DogeError


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
    (tmp_path / "out").mkdir()
    (tmp_path / "out/keep").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "new").write_text("half")
            raise RuntimeError("boom")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (tmp_path / "out/keep").read_text() == "old"
