"""Resolve a stage config from layers, with one-line errors for every kind of bad input.

Precedence, lowest first: schema defaults (with the stage's own defaults) < size preset <
hardware preset < YAML recipe < command-line overrides (``section.key=value``). The merged
mapping is validated once; an error names the key, the offending value, where it came from and
what is allowed.
"""

from __future__ import annotations

import difflib
import os
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from doge_cli.config import presets
from doge_cli.config.schema import STAGES, StageConfig
from doge_cli.errors import DogeError


class ConfigError(DogeError):
    """A configuration problem the user can fix."""


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML recipe as a mapping; any problem is a one-line :class:`ConfigError`."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file {p} does not exist; check the path (recipes live under configs/)")
    if p.is_dir():
        raise ConfigError(f"config path {p} is a folder; pass a .yaml file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {p} is not UTF-8 text") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise ConfigError(f"config file {p} is not valid YAML{where}: {problem}") from None
    if data is None:
        raise ConfigError(f"config file {p} is empty; it must be a mapping such as 'optim: {{lr: 3.0e-3}}'")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must contain a mapping of sections, not a {type(data).__name__}")
    return data


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """Turn ``["optim.lr=3e-3", "train.max_steps=10"]`` into a nested mapping.

    Values are read as YAML scalars (numbers, booleans, null, lists, mappings) so the command
    line accepts what a recipe file would.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override '{item}' is not of the form section.key=value (e.g. optim.lr=3e-3)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with another override of '{part}'")
        node[parts[-1]] = value
    return out


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive merge; mappings merge key by key, anything else is replaced."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _has_path(mapping: dict[str, Any], path: Sequence[Any]) -> bool:
    node: Any = mapping
    for part in path:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            return False
    return True


def _model_at(cls: type[BaseModel], path: Sequence[Any]) -> type[BaseModel] | None:
    """The pydantic model class that owns the last key of ``path``."""
    current: type[BaseModel] | None = cls
    for part in path[:-1]:
        if current is None:
            return None
        if isinstance(part, int):
            continue
        info = current.model_fields.get(part)
        if info is None:
            return None
        current = _first_model(info.annotation)
    return current


def _first_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _first_model(arg)
        if found is not None:
            return found
    return None


def _format_error(err: ValidationError, cls: type[BaseModel], layers: list[tuple[str, dict[str, Any]]]) -> str:
    first = err.errors()[0]
    loc = [p for p in first["loc"] if p not in {"function-after"}]
    dotted = ".".join(str(p) for p in loc) or "(top level)"
    source = next((name for name, data in reversed(layers) if loc and _has_path(data, loc)), None)
    origin = f" (from {source})" if source else ""
    if first["type"] == "extra_forbidden":
        owner = _model_at(cls, loc)
        known = list(owner.model_fields) if owner else []
        guess = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.5)
        hint = f"; did you mean '{'.'.join(str(p) for p in loc[:-1] + [guess[0]])}'?" if guess else ""
        allowed = f" Known keys here: {', '.join(known)}." if known and not guess else ""
        return f"unknown config key '{dotted}'{origin}{hint}{allowed}"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "missing":
        return f"config key '{dotted}' is required{origin}"
    if "input" in first and loc and not isinstance(first["input"], dict):
        return f"config key '{dotted}' = {first['input']!r}{origin}: {msg}"
    if loc:  # a check across several keys of a section: the message names them
        return f"config section '{dotted}'{origin}: {msg}"
    return f"invalid config{origin}: {msg}"


def validate_layers(stage: str, layers: list[tuple[str, dict[str, Any]]]) -> StageConfig:
    """Merge named layers (lowest precedence first) and validate them as ``stage``."""
    cls = STAGES[stage]
    merged: dict[str, Any] = {}
    for _, data in layers:
        merged = deep_merge(merged, data)
    if merged.get("stage", stage) != stage:
        raise ConfigError(f"the recipe is for stage '{merged['stage']}' but you ran stage '{stage}'; "
                          f"use 'doge train {merged['stage']}' or fix the recipe's 'stage' key")
    merged["stage"] = stage
    try:
        return cls.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(_format_error(err, cls, layers)) from None


def resolve_config(
    stage: str,
    *,
    size: str | None = None,
    hardware: str | None = None,
    recipe: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
) -> StageConfig:
    """Build the config a run will use. ``size``/``hardware`` given here win over the recipe's."""
    if stage not in STAGES:
        raise ConfigError(f"unknown stage '{stage}'; choose one of {', '.join(STAGES)}")
    recipe_data = load_yaml(recipe) if recipe is not None else {}
    cli_data = parse_overrides(overrides)

    size_name = size or cli_data.get("size") or recipe_data.get("size")
    hardware_name = hardware or cli_data.get("hardware") or recipe_data.get("hardware") or "auto"

    layers: list[tuple[str, dict[str, Any]]] = [("stage defaults", presets.STAGE_DEFAULTS[stage])]
    if size_name is not None:
        key = presets.normalize_size(str(size_name))
        if key is None:
            raise ConfigError(_unknown("size", str(size_name), presets.SIZES))
        preset = presets.SIZES[key]
        layers.append((f"size preset {key}", {"size": key, "model": preset.model, **preset.stage_layer(stage)}))
    hw_key = str(hardware_name).lower()
    if hw_key not in presets.HARDWARE_NAMES:
        raise ConfigError(_unknown("hardware", str(hardware_name), presets.HARDWARE_NAMES))
    if hw_key == "auto":
        hw_key = presets.detect_hardware()
    layers.append((f"hardware preset {hw_key}", _hardware_layer(hw_key)))
    if recipe is not None:
        layers.append((f"recipe {recipe}", {k: v for k, v in recipe_data.items() if k not in ("size", "hardware")}))
    if cli_data:
        layers.append(("the command line", {k: v for k, v in cli_data.items() if k not in ("size", "hardware")}))

    config = validate_layers(stage, layers)
    # The preset's micro batch depends on the final model shape, so it is computed last, and
    # only where neither the recipe nor the command line chose one.
    if not any(_has_path(d, ["runtime", "micro_batch_size"]) for d in (recipe_data, cli_data)):
        hw = presets.HARDWARE[hw_key]
        config.runtime.micro_batch_size = presets.micro_batch_for(
            hw, config.model.model_dump(), config.data.max_length, config.train.global_batch_size,
            config.runtime.gradient_checkpointing,
        )
    if config.train.global_batch_size % config.runtime.micro_batch_size:
        raise ConfigError(
            f"train.global_batch_size {config.train.global_batch_size} is not a multiple of "
            f"runtime.micro_batch_size {config.runtime.micro_batch_size}; change one of them"
        )
    config.size = size_name and presets.normalize_size(str(size_name))
    config.hardware = hw_key
    return config


def _hardware_layer(name: str) -> dict[str, Any]:
    hw = presets.HARDWARE[name]
    return {
        "hardware": name,
        "runtime": {
            "device": hw.device,
            "precision": hw.precision,
            "attn_implementation": hw.attn_implementation,
            "compile": hw.compile,
            "dataloader_workers": hw.dataloader_workers,
        },
    }


def _unknown(what: str, value: str, choices: Iterable[str]) -> str:
    choices = list(choices)
    guess = difflib.get_close_matches(value, choices, n=1, cutoff=0.4)
    hint = f"; did you mean '{guess[0]}'?" if guess else ""
    return f"unknown {what} '{value}'{hint} Choose one of: {', '.join(choices)}"


def gradient_accumulation_steps(config: StageConfig, world_size: int = 1) -> int:
    """Micro-batches per optimizer step on each process, keeping the global batch fixed."""
    per_step = config.runtime.micro_batch_size * world_size
    if config.train.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size {config.train.global_batch_size} is not divisible by micro batch "
            f"{config.runtime.micro_batch_size} × {world_size} processes; adjust runtime.micro_batch_size"
        )
    return config.train.global_batch_size // per_step


def summary_lines(config: StageConfig, world_size: int = 1) -> list[str]:
    """Human summary of the derived quantities (shown above ``doge config show``)."""
    accum = gradient_accumulation_steps(config, world_size)
    tokens = config.train.global_batch_size * config.data.max_length
    lines = [
        f"stage {config.stage}, size {config.size or 'custom'}, hardware {config.hardware}",
        f"global batch per optimizer step: {config.train.global_batch_size} sequences x {config.data.max_length} "
        f"tokens = {tokens:,} tokens (micro batch {config.runtime.micro_batch_size} x accumulation {accum} "
        f"x {world_size} process{'es' if world_size > 1 else ''})",
    ]
    if config.train.max_steps:
        total = config.train.max_steps * tokens
        amount = f"{total / 1e9:.2f}B" if total >= 1e9 else f"{total / 1e6:.2f}M"
        lines.append(f"{config.train.max_steps:,} optimizer steps = {amount} tokens")
    return lines


def to_yaml(config: BaseModel, explain: bool = False) -> str:
    """The config as YAML; with ``explain`` each key is preceded by its documentation."""
    if not explain:
        data = config.model_dump(mode="json")
        if "stage" in data:  # the stage first: it says what the rest is for
            data = {"stage": data.pop("stage"), **data}
        return yaml.safe_dump(data, sort_keys=False, width=100)
    lines: list[str] = []
    _explain_into(config, lines, 0)
    return "\n".join(lines) + "\n"


def _explain_into(model: BaseModel, lines: list[str], indent: int) -> None:
    pad = "  " * indent
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        for doc_line in (info.description or "").split("\n"):
            if doc_line.strip():
                lines.append(f"{pad}# {' '.join(doc_line.split())}")
        if isinstance(value, BaseModel):
            lines.append(f"{pad}{name}:")
            _explain_into(value, lines, indent + 1)
        else:
            dumped = yaml.safe_dump({name: _plain(value)}, sort_keys=False, width=100).rstrip("\n")
            lines.extend(pad + line for line in dumped.split("\n"))


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
