"""The one generation engine (``engine.Engine``) and what it needs: per-request sampling and streaming."""

from doge_cli.inference.engine import Engine, Request
from doge_cli.inference.generate import GenerationOutput, generate
from doge_cli.inference.sampling import SamplingParams

__all__ = ["Engine", "GenerationOutput", "Request", "SamplingParams", "generate"]
