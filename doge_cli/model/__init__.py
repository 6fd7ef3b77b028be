"""The Doge model: modeling (with its KV cache), attention backends and Hugging Face interop.

Generation lives in ``doge_cli.inference`` (the one engine).

Importing this package imports torch and transformers; the CLI imports it inside command bodies.
"""

from doge_cli.model.hub import load_model, save_pretrained
from doge_cli.model.modeling import CausalLMOutput, DogeForCausalLM, KVCache
from doge_cli.model.sizes import count_parameters, size_config, training_flops_per_token

__all__ = [
    "CausalLMOutput",
    "DogeForCausalLM",
    "KVCache",
    "count_parameters",
    "load_model",
    "save_pretrained",
    "size_config",
    "training_flops_per_token",
]
