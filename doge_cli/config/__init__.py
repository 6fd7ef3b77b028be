"""Typed, validated configuration: schemas, presets and the layered resolver."""

from doge_cli.config.loader import ConfigError, gradient_accumulation_steps, resolve_config, to_yaml
from doge_cli.config.presets import HARDWARE, SIZES
from doge_cli.config.schema import STAGES, DPOConfig, GRPOConfig, PretrainConfig, SFTConfig, StageConfig

__all__ = [
    "ConfigError",
    "DPOConfig",
    "GRPOConfig",
    "HARDWARE",
    "PretrainConfig",
    "SFTConfig",
    "SIZES",
    "STAGES",
    "StageConfig",
    "gradient_accumulation_steps",
    "resolve_config",
    "to_yaml",
]
