"""Every ``section.key`` a user-facing message names (errors, hints, log lines) exists in the config
schema: a renamed setting cannot leave a message pointing at a key that is gone."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from pydantic import BaseModel

from doge_cli.config.schema import STAGES

PACKAGE = Path(__file__).resolve().parents[1] / "doge_cli"
MESSAGE_CALLS = {"DogeError", "ConfigError", "say", "log", "print", "warning", "message", "echo"}
FILES = (".safetensors", ".json", ".yaml", ".pt", ".py", ".jsonl", ".txt", ".bin", ".png")


def _sections() -> dict[str, set[str]]:
    """section -> its keys, over every stage's schema (nested keys as dotted names)."""
    out: dict[str, set[str]] = {}
    for cls in STAGES.values():
        for name, info in cls.model_fields.items():
            sub = info.annotation
            if isinstance(sub, type) and issubclass(sub, BaseModel):
                out.setdefault(name, set()).update(sub.model_fields)
    return out


def _message_strings():
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            if name not in MESSAGE_CALLS:
                continue
            for arg in node.args:
                for sub in ast.walk(arg):
                    if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                        yield path.relative_to(PACKAGE.parent), sub.value


def _named_keys(texts):
    """``(where, "section.key", known)`` for every config key the texts name (file names skipped)."""
    sections = _sections()
    pattern = re.compile(r"\b(" + "|".join(sections) + r")\.([a-z_]+)\b")
    for where, text in texts:
        for match in pattern.finditer(text):
            section, key = match.groups()
            if f".{key}" in FILES:
                continue
            yield where, f"{section}.{key}", key in sections[section]


def test_the_scan_catches_a_stale_key():
    named = list(_named_keys([("x", "raise optim.warmup, or lower optim.lr; see model.safetensors")]))
    assert named == [("x", "optim.warmup", False), ("x", "optim.lr", True)]


def test_every_config_key_named_in_a_message_exists():
    named = list(_named_keys(_message_strings()))
    assert len(named) >= 15  # the scan sees the messages it is meant to check
    stale = [f"{where}: {key}" for where, key, known in named if not known]
    assert not stale, stale
