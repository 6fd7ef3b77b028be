"""The hub path, exercised offline through a local folder laid out like the hub repos."""

import datasets
import pytest

from doge_cli.data import hub
from doge_cli.data.download import download_recipe
from doge_cli.errors import DogeError


def _repo(root, repo, configs):
    """Write parquet files and a dataset card declaring configs/splits, as hub repos do."""
    folder = root / repo
    lines = ["---", "configs:"]
    for config, (split, rows) in configs.items():
        rel = f"{config or 'data'}/{split}-00000-of-00001.parquet"
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_list(rows).to_parquet(str(folder / rel))
        lines += [f"- config_name: {config or 'default'}", "  data_files:", f"  - split: {split}", f"    path: {rel}"]
    (folder / "README.md").write_text("\n".join([*lines, "---", ""]))


@pytest.fixture()
def mirror(tmp_path):
    root = tmp_path / "mirror"
    _repo(root, "HuggingFaceTB/smollm-corpus", {
        "fineweb-edu-dedup": ("train", [{"text": f"web page {i}", "id": str(i)} for i in range(25)]),
        "cosmopedia-v2": ("train", [{"prompt": f"Write {i}", "text": f"Essay {i}"} for i in range(10)]),
    })
    chosen = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "good"}]
    rejected = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "bad"}]
    _repo(root, "HuggingFaceH4/ultrafeedback_binarized", {
        None: ("train_prefs", [{"prompt": "Q?", "chosen": chosen, "rejected": rejected}] * 4),
    })
    _repo(root, "AI-MO/NuminaMath-TIR", {
        None: ("train", [{"problem": "2+3?", "solution": "We add: \\boxed{5}."}] * 3),
    })
    return root


def test_hub_sources_through_a_mirror(mirror, tmp_path):
    out = tmp_path / "ds"
    download_recipe("pretrain", out, sources=["fineweb-edu-dedup", "cosmopedia-v2"], hub_mirror=mirror)
    web = datasets.load_from_disk(str(out / "pt/fineweb-edu-dedup"))
    assert len(web) == 25 and web.column_names == ["text"]
    assert datasets.load_from_disk(str(out / "pt/cosmopedia-v2"))[0] == {"text": "Essay 0", "prompt": "Write 0"}
    download_recipe("dpo", out, hub_mirror=mirror)
    assert datasets.load_from_disk(str(out / "dpo/ultrafeedback_binarized"))[0] == {
        "prompt": [{"role": "user", "content": "Q?"}], "chosen": "good", "rejected": "bad"}
    m = download_recipe("grpo", out, hub_mirror=mirror, max_examples=2)[0]
    assert m["rows"] == 2 and datasets.load_from_disk(str(out / "grpo/numinamath-tir"))[0]["answer"] == "5"
    assert {"source", "revision", "rows", "bytes"} <= set(m)


def test_interrupted_stream_resumes(mirror, tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "SHARD_ROWS", 4)
    real = datasets.load_dataset
    state = {"fail": True}

    def flaky(*args, **kwargs):
        ds = real(*args, **kwargs)
        if not (kwargs.get("streaming") and state["fail"]):
            return ds

        def rows():
            for i, row in enumerate(ds):
                if i == 10:
                    raise ConnectionError("connection reset")
                yield row

        return _Stream(rows, ds)

    monkeypatch.setattr(datasets, "load_dataset", flaky)
    out = tmp_path / "ds"
    with pytest.raises(DogeError):
        download_recipe("pretrain", out, sources=["fineweb-edu-dedup"], hub_mirror=mirror, streaming=True)
    partial = out / "pt/.fineweb-edu-dedup.partial"
    assert len(list(partial.glob("shard-*.parquet"))) == 3  # rows 0-9 kept, in shards of 4, 4, 2
    assert not (out / "pt/fineweb-edu-dedup").exists()
    state["fail"] = False
    download_recipe("pretrain", out, sources=["fineweb-edu-dedup"], hub_mirror=mirror, streaming=True)
    texts = datasets.load_from_disk(str(out / "pt/fineweb-edu-dedup"))["text"]
    assert list(texts) == [f"web page {i}" for i in range(25)]
    assert not partial.exists()


class _Stream:
    def __init__(self, rows, ds):
        self._rows, self._ds = rows, ds

    def __iter__(self):
        return self._rows()

    def skip(self, n):
        return self._ds.skip(n)


def test_hub_id_while_offline_names_quickstart(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DogeError, match="--recipe quickstart"):
        download_recipe("sft", tmp_path / "ds")
    with pytest.raises(DogeError, match="has no source"):
        download_recipe("sft", tmp_path / "ds", sources=["nope"])
    assert not (tmp_path / "ds" / "sft").exists()


def test_python_edu_is_left_out_of_the_pretrain_recipe_and_says_why(tmp_path):
    """smollm-corpus python-edu has no text column (only Software Heritage blob ids): the recipe skips it
    instead of failing after the first sources, and asking for it explains where its code lives."""
    from doge_cli.data.download import RECIPES

    assert "python-edu" not in RECIPES["pretrain"]
    with pytest.raises(DogeError, match="blob ids.*--local"):
        download_recipe("pretrain", tmp_path / "ds", sources=["python-edu"])
    assert not (tmp_path / "ds").exists()
