"""The one offline test: any of the three variables, with any value huggingface_hub takes as true."""

import pytest

from doge_cli.offline import OFFLINE_VARS, hub_offline, offline_flags


@pytest.mark.parametrize("var", OFFLINE_VARS)
@pytest.mark.parametrize("value, offline", [("1", True), ("true", True), ("YES", True), ("on", True),
                                            ("0", False), ("", False), ("false", False)])
def test_every_variable_and_true_value_counts(monkeypatch, var, value, offline):
    for other in OFFLINE_VARS:
        monkeypatch.delenv(other, raising=False)
    monkeypatch.setenv(var, value)
    assert hub_offline() is offline
    assert offline_flags() == ([var] if offline else [])
