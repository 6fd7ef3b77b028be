import datasets
import pytest

from doge_cli.data.merge import merge_stage, parse_ratios, plan_counts
from doge_cli.data.storage import save_dataset
from doge_cli.errors import DogeError

# The mixture logic is one for every stage; these tests run it on DatasetDict merges (pretraining's index
# over token streams is checked against this same merge in test_blocks.py).
STAGE = "sft"


def _fake_tokenized(root, sizes, fingerprint="tok-a", max_length=2):
    """Sources as `doge data tokenize` leaves them: the rows plus a manifest with its cache key."""
    for name, n in sizes.items():
        ds = datasets.Dataset.from_dict({"input_ids": [[i, i] for i in range(n)], "src": [name] * n})
        key = {"tokenizer": fingerprint, "max_length": max_length, "stage": STAGE}
        save_dataset(ds, root / "tokenized" / STAGE / name, stage=STAGE, source=f"tokenized:{name}",
                     extra={"cache_key": key, "tokenizer": str(root / "tokenizer"), "max_length": max_length})


def test_ratios_hold_within_one_percent(tmp_path):
    _fake_tokenized(tmp_path, {"fineweb-edu-dedup": 5000, "cosmopedia-v2": 3000, "python-edu": 800, "finemath": 500})
    m = merge_stage(tmp_path, STAGE, train_examples=4000, test_examples=200, seed=233)
    train = datasets.load_from_disk(str(tmp_path / "merged/sft/train"))
    assert len(train) == 4000 and m["test_rows"] == 200
    counts = {n: train["src"].count(n) for n in m["sources"]}
    for name, weight in {"fineweb-edu-dedup": 7, "cosmopedia-v2": 2, "python-edu": 0.5, "finemath": 0.5}.items():
        assert abs(counts[name] / 4000 - weight / 10) < 0.01


def test_explicit_ratios_and_upsampling(tmp_path):
    _fake_tokenized(tmp_path, {"a": 100, "b": 1000, "c": 50})
    merge_stage(tmp_path, STAGE, train_examples=1000, test_examples=20, seed=1, ratios={"a": 1, "b": 1})
    train = datasets.load_from_disk(str(tmp_path / "merged/sft/train"))
    assert train["src"].count("a") == 500 and train["src"].count("c") == 0


def test_same_seed_same_split_and_no_leak(tmp_path):
    _fake_tokenized(tmp_path, {"a": 300, "b": 300})
    merge_stage(tmp_path, STAGE, train_examples=400, test_examples=50, seed=233, out=tmp_path / "m1")
    merge_stage(tmp_path, STAGE, train_examples=400, test_examples=50, seed=233, out=tmp_path / "m2")
    merge_stage(tmp_path, STAGE, train_examples=400, test_examples=50, seed=234, out=tmp_path / "m3")
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
    with pytest.raises(DogeError, match="no tokenized sft data"):
        merge_stage(tmp_path, STAGE, train_examples=10, test_examples=1)
    _fake_tokenized(tmp_path, {"a": 10})
    with pytest.raises(DogeError, match="not a tokenized sft source"):
        merge_stage(tmp_path, STAGE, train_examples=10, test_examples=1, ratios={"zzz": 1})
    with pytest.raises(DogeError, match="too few"):
        merge_stage(tmp_path, STAGE, train_examples=10, test_examples=10)
    with pytest.raises(DogeError, match="bad --ratio"):
        parse_ratios(["a:1"])
    assert not (tmp_path / "merged").exists() or not any((tmp_path / "merged").iterdir())


def test_sources_are_identified_by_tokenizer_fingerprint_not_path(tmp_path):
    # Same tokenizer folder path recorded for both, but different contents (fingerprints).
    _fake_tokenized(tmp_path, {"a": 50}, fingerprint="tok-a")
    _fake_tokenized(tmp_path, {"b": 50}, fingerprint="tok-b")
    with pytest.raises(DogeError, match="different tokenizers"):
        merge_stage(tmp_path, STAGE, train_examples=20, test_examples=2)
    assert not (tmp_path / "merged").exists()


def test_sources_tokenized_at_different_lengths_are_refused(tmp_path):
    _fake_tokenized(tmp_path, {"a": 50}, max_length=2)
    _fake_tokenized(tmp_path, {"b": 50}, max_length=4)
    with pytest.raises(DogeError, match="different --max-length"):
        merge_stage(tmp_path, STAGE, train_examples=20, test_examples=2)


@pytest.mark.parametrize("item", ["a=nan", "a=inf", "a=-1", "a=", "=1", "a"])
def test_bad_ratios_are_refused(item):
    with pytest.raises(DogeError, match="bad --ratio"):
        parse_ratios([item])


def test_absurd_train_examples_is_refused_before_work(tmp_path):
    _fake_tokenized(tmp_path, {"a": 50})
    with pytest.raises(DogeError, match="more than 1000 times"):
        merge_stage(tmp_path, STAGE, train_examples=10**15, test_examples=2)


def test_merge_output_that_is_not_doge_s_is_refused(tmp_path):
    _fake_tokenized(tmp_path, {"a": 50})
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(DogeError, match="did not write"):
        merge_stage(tmp_path, STAGE, train_examples=20, test_examples=2, out=mine)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    merge_stage(tmp_path, STAGE, train_examples=20, test_examples=2, out=tmp_path / "m")
    merge_stage(tmp_path, STAGE, train_examples=10, test_examples=2, out=tmp_path / "m")  # doge's own: replaced
    assert len(datasets.load_from_disk(str(tmp_path / "m/train"))) == 10


def test_the_streamed_merge_holds_the_rows_concatenate_and_shuffle_give(tmp_path, monkeypatch):
    """Through many small buckets (each a range of positions, filled from every source), against datasets'
    own concatenate_datasets + shuffle(seed) of the same picks."""
    from doge_cli.data import merge

    monkeypatch.setattr(merge, "BUCKET_BYTES", 2000)
    _fake_tokenized(tmp_path, {"a": 300, "b": 120, "c": 80})
    merge_stage(tmp_path, STAGE, train_examples=600, test_examples=30, seed=5)
    got = datasets.load_from_disk(str(tmp_path / "merged" / STAGE))
    parts = {n: datasets.load_from_disk(str(tmp_path / "tokenized" / STAGE / n)) for n in ("a", "b", "c")}
    picked, _ = merge._pick_rows({n: len(d) for n, d in parts.items()}, dict.fromkeys(parts, 1.0), 600, 30, 5,
                                 lambda _m: None)
    for split, which, seed in (("train", 0, 5), ("test", 1, 6)):
        want = datasets.concatenate_datasets([parts[n].select(picked[n][which]) for n in parts]).shuffle(seed=seed)
        assert got[split].to_dict() == want.to_dict()
