"""A forced R1-style chat model: every reply is ``<thought> the </thought><solution>4</solution>``."""

import pytest

from .toymodel import save_forced_r1_model

THOUGHT, ANSWER = "the", "4"


@pytest.fixture(scope="session")
def r1_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    return save_forced_r1_model(root, THOUGHT, ANSWER)
