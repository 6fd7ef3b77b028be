"""Shared tiny fixtures: a sliced quickstart datasets folder and a small tokenizer trained on it."""

import shutil

import pytest

SLICE = 120
VOCAB = 600


@pytest.fixture(scope="session")
def quick_dir(tmp_path_factory):
    from doge_cli.data.download import download_recipe

    path = tmp_path_factory.mktemp("quick") / "datasets"
    download_recipe("quickstart", path, max_examples=SLICE)
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(quick_dir, tmp_path_factory):
    from doge_cli.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer(out, datasets_dir=quick_dir, vocab_size=VOCAB)
    return out


@pytest.fixture()
def work_dir(quick_dir, tmp_path):
    """A private copy of the quickstart folder that a test may change."""
    dest = tmp_path / "datasets"
    shutil.copytree(quick_dir, dest, ignore=shutil.ignore_patterns("tokenized", "merged"))
    return dest
