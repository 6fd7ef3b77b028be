import datasets
import pytest

from doge_cli.data.merge import merge_stage, parse_ratios, plan_counts
from doge_cli.errors import DogeError


def _fake_tokenized(root, sizes):
    for name, n in sizes.items():
        ds = datasets.Dataset.from_dict({"input_ids": [[i, i] for i in range(n)], "src": [name] * n})
        ds.save_to_disk(str(root / "tokenized" / "pt" / name))


def test_ratios_hold_within_one_percent(tmp_path):
    _fake_tokenized(tmp_path, {"fineweb-edu-dedup": 5000, "cosmopedia-v2": 3000, "python-edu": 800, "finemath": 500})
    m = merge_stage(tmp_path, "pt", train_examples=4000, test_examples=200, seed=233)
    train = datasets.load_from_disk(str(tmp_path / "merged/pt/train"))
    assert len(train) == 4000 and m["test_rows"] == 200
    counts = {n: train["src"].count(n) for n in m["sources"]}
    for name, weight in {"fineweb-edu-dedup": 7, "cosmopedia-v2": 2, "python-edu": 0.5, "finemath": 0.5}.items():
        assert abs(counts[name] / 4000 - weight / 10) < 0.01


def test_explicit_ratios_and_upsampling(tmp_path):
    _fake_tokenized(tmp_path, {"a": 100, "b": 1000, "c": 50})
    merge_stage(tmp_path, "pt", train_examples=1000, test_examples=20, seed=1, ratios={"a": 1, "b": 1})
    train = datasets.load_from_disk(str(tmp_path / "merged/pt/train"))
    assert train["src"].count("a") == 500 and train["src"].count("c") == 0


def test_same_seed_same_split_and_no_leak(tmp_path):
    _fake_tokenized(tmp_path, {"a": 300, "b": 300})
    merge_stage(tmp_path, "pt", train_examples=400, test_examples=50, seed=233, out=tmp_path / "m1")
    merge_stage(tmp_path, "pt", train_examples=400, test_examples=50, seed=233, out=tmp_path / "m2")
    merge_stage(tmp_path, "pt", train_examples=400, test_examples=50, seed=234, out=tmp_path / "m3")
    one, two, three = (datasets.load_from_disk(str(tmp_path / m)) for m in ("m1", "m2", "m3"))
    for split in ("train", "test"):
        assert one[split].to_dict() == two[split].to_dict()
    assert one["train"].to_dict() != three["train"].to_dict()
    test_rows = set(zip(one["test"]["src"], (r[0] for r in one["test"]["input_ids"])))
    train_rows = set(zip(one["train"]["src"], (r[0] for r in one["train"]["input_ids"])))
    assert test_rows.isdisjoint(train_rows)


def test_plan_counts_sum_exactly():
    counts = plan_counts({"a": 1, "b": 1, "c": 1}, {"a": 1, "b": 1, "c": 1}, 100)
    assert sum(counts.values()) == 100 and max(counts.values()) - min(counts.values()) <= 1


def test_merge_errors(tmp_path):
    with pytest.raises(DogeError, match="no tokenized pt data"):
        merge_stage(tmp_path, "pt", train_examples=10, test_examples=1)
    _fake_tokenized(tmp_path, {"a": 10})
    with pytest.raises(DogeError, match="not a tokenized pt source"):
        merge_stage(tmp_path, "pt", train_examples=10, test_examples=1, ratios={"zzz": 1})
    with pytest.raises(DogeError, match="too few"):
        merge_stage(tmp_path, "pt", train_examples=10, test_examples=10)
    with pytest.raises(DogeError, match="bad --ratio"):
        parse_ratios(["a:1"])
    assert not (tmp_path / "merged").exists() or not any((tmp_path / "merged").iterdir())
