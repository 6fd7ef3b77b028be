"""The Doge model: modeling, attention backends, KV-cache generation and Hugging Face interop.

Importing this package imports torch and transformers; the CLI imports it inside command bodies.
"""

from doge_cli.model.generation import GenerationOutput, generate
from doge_cli.model.hub import load_model, save_pretrained
from doge_cli.model.modeling import CausalLMOutput, DogeForCausalLM, KVCache
from doge_cli.model.sizes import count_parameters, size_config, training_flops_per_token

__all__ = [
    "CausalLMOutput",
    "DogeForCausalLM",
    "GenerationOutput",
    "KVCache",
    "count_parameters",
    "generate",
    "load_model",
    "save_pretrained",
    "size_config",
    "training_flops_per_token",
]
