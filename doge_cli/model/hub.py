"""Hugging Face interop: save folders transformers loads natively, load native / hub / old small-doge checkpoints.

Old small-doge checkpoints (the SmallDoge repos that needed ``trust_remote_code``) come in two layouts,
told apart by their keys:

- **2024-25 names** (small-doge's first modeling code): renamed through :data:`LEGACY_KEY_MAP`::

    model.word_embed              -> model.embed_tokens
    layers.N.pre_layernorm        -> layers.N.input_layernorm
    layers.N.pre_residual.weight  -> layers.N.input_residual
    layers.N.post_layernorm       -> layers.N.post_attention_layernorm
    layers.N.post_residual.weight -> layers.N.post_attention_residual
    layers.N.feed_forward.*       -> layers.N.mlp.*        (SwiGLU, or the router_gate/down_embed/up_embed CDMoE)
    model.final_layernorm         -> model.norm
    model.rotary_emb.*            -> dropped (recomputed buffers)

  That version had no top-k keep window (``keep_window_size`` is set beyond any length) and an optional
  ``dynamic_mask_ratio`` cut, which doge does not reproduce: a ratio above 0 is refused (the released
  configs use 0). ``hidden_bias`` becomes ``attention_bias`` / ``mlp_bias`` as the weights show.
- **transformers-style names** (small-doge's later modeling code): the native names, but no
  ``self_attn.q_norm`` / ``k_norm`` weights.

Both differ from transformers' Doge in math, not only in names: no q/k RMS norms, and ``A`` /
``dt_proj`` sized by the query heads, so the dynamic-mask bias is per query head. doge loads them into
its own model with ``config.small_doge_legacy = True`` (see ``modeling.is_legacy``), which drops the
q/k norms and gives each query head its own copy of its kv head, so every attention backend runs them
unchanged. Decision: such a model runs in doge (eval, chat, generation) but is never written out:
transformers' Doge cannot express it, so :func:`save_pretrained` refuses it, and training refuses it
as a starting point (``allow_legacy=False``) because its result could not be exported. The old
multi-head product-key CDMoE (``feed_forward.queries`` / ``keys``) is refused too.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import DogeConfig, GenerationConfig

from doge_cli.errors import DogeError
from doge_cli.io import atomic_dir
from doge_cli.model.modeling import DogeForCausalLM, is_legacy

LEGACY_KEY_MAP: dict[str, str] = {
    r"^model\.word_embed\.": "model.embed_tokens.",
    r"\.pre_layernorm\.": ".input_layernorm.",
    r"\.pre_residual\.weight$": ".input_residual",
    r"\.post_layernorm\.": ".post_attention_layernorm.",
    r"\.post_residual\.weight$": ".post_attention_residual",
    r"\.feed_forward\.": ".mlp.",
    r"^model\.final_layernorm\.": "model.norm.",
}
# Config fields that only the old small-doge code knew; dropped once their meaning is carried over.
LEGACY_CONFIG_FIELDS = ("hidden_bias", "dynamic_mask_ratio", "expert_retrieval_size", "num_cdmoe_experts",
                        "num_cdmoe_heads", "num_cdmoe_experts_per_head", "auto_map", "architectures")
NO_KEEP_WINDOW = 2**31 - 1  # the 2024-25 code had no top-k keep window: no sequence is this long


def save_pretrained(model: DogeForCausalLM, out_dir: str | os.PathLike, tokenizer=None,
                    extra_files: dict[str, str] | None = None) -> Path:
    """Write ``out_dir`` as a transformers Doge folder (config.json, model.safetensors, generation_config).

    ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads it natively, no ``trust_remote_code``.
    The folder is written through ``doge_cli.io.atomic_dir``: under a temporary name and renamed into
    place, so a crash never leaves half a folder; an existing ``out_dir`` is replaced only when doge wrote
    it (or it is empty). A ``tokenizer`` is saved into it too, and ``extra_files`` (name -> text).
    """
    if is_legacy(model.config):
        raise DogeError("this model was loaded from an old small-doge checkpoint (no q/k norms, a per-query-head "
                        "mask), which transformers' Doge cannot express, so doge does not save it; doge can still "
                        "evaluate and chat with the original folder")
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, kind="model") as tmp:
        config = DogeConfig.from_dict(model.config.to_dict())
        config.architectures = ["DogeForCausalLM"]
        config.save_pretrained(tmp)
        GenerationConfig.from_model_config(config).save_pretrained(tmp)
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # safetensors refuses shared tensors; transformers re-ties
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text.rstrip("\n") + "\n", encoding="utf-8")
    return out_dir


def _resolve(path_or_id: str) -> Path:
    """A local folder, or a hub id downloaded (or found in the cache) with huggingface_hub."""
    path = Path(path_or_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise DogeError(f"{path} is a file; pass the model folder that holds config.json")
        return path
    looks_like_id = path_or_id.count("/") == 1 and not path_or_id.startswith((".", "/", "~"))
    if not looks_like_id:
        raise DogeError(f"model folder {path_or_id} does not exist; pass a model folder or a hub id (owner/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(path_or_id, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.model",
                                                                  "*.txt", "*.jinja"]))
    except LocalEntryNotFoundError as err:
        raise DogeError(f"{path_or_id} is not in the local hub cache and the hub cannot be reached (offline: "
                        f"HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}); download it once online or "
                        "pass a local folder") from err
    except (HfHubHTTPError, OSError, ValueError) as err:
        raise DogeError(f"could not fetch {path_or_id} from the hub: {err}") from err


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    try:
        if files:
            state: dict[str, torch.Tensor] = {}
            for f in files:
                state.update(load_file(f))
            return state
        bins = sorted(folder.glob("pytorch_model*.bin"))
        if bins:
            state = {}
            for f in bins:
                state.update(torch.load(f, map_location="cpu", weights_only=True))
            return state
    except (SafetensorError, OSError, RuntimeError, EOFError) as err:
        raise DogeError(f"the weights in {folder} are corrupt or unreadable ({err}); re-download or re-save them") from err
    raise DogeError(f"{folder} has no weights (model.safetensors or pytorch_model.bin)")


def legacy_layout(state: dict[str, torch.Tensor]) -> str | None:
    """Which old small-doge layout a state_dict has, or None for a native Doge one."""
    if any(re.search(pattern, key) for key in state for pattern in LEGACY_KEY_MAP):
        return "2024-25 names"
    if any(".self_attn.q_proj." in k for k in state) and not any(".self_attn.q_norm." in k for k in state):
        return "transformers-style names without q/k norms"
    return None


def _legacy_config_and_state(folder: Path, raw: dict, state: dict[str, torch.Tensor], layout: str):
    """The DogeConfig (``small_doge_legacy=True``) and renamed weights of an old small-doge checkpoint."""
    renamed = {}
    for key, value in state.items():
        if "rotary_emb." in key:
            continue  # RoPE buffers some versions saved; doge recomputes them
        for pattern, replacement in LEGACY_KEY_MAP.items():
            key = re.sub(pattern, replacement, key)
        renamed[key] = value
    if any(k.endswith((".mlp.queries.weight", ".mlp.keys")) for k in renamed):
        raise DogeError(f"{folder} is an old small-doge CDMoE checkpoint with multi-head product-key experts "
                        "(feed_forward.queries / keys); doge loads only dense or router_gate CDMoE small-doge models")
    for key in [k for k in renamed if k.endswith(".mlp.router_gate.bias")]:
        if renamed[key].abs().max() > 0:
            raise DogeError(f"{folder} has a router_gate bias ({key}), which Doge's CDMoE does not have; "
                            "doge cannot load this small-doge checkpoint")
        del renamed[key]
    ratio = raw.get("dynamic_mask_ratio") or 0.0
    if 0.0 < ratio < 1.0:
        raise DogeError(f"{folder} uses dynamic_mask_ratio={ratio}, an old small-doge masking rule doge does not "
                        "reproduce; only checkpoints with dynamic_mask_ratio 0 load")
    fields = {k: v for k, v in raw.items() if k not in LEGACY_CONFIG_FIELDS}
    fields["attention_bias"] = any(k.endswith(".self_attn.q_proj.bias") for k in renamed)
    fields["mlp_bias"] = any(k.endswith(".mlp.gate_proj.bias") for k in renamed)
    if layout == "2024-25 names" and "keep_window_size" not in raw:
        fields["keep_window_size"] = NO_KEEP_WINDOW
    if fields.get("num_key_value_heads") is None:
        fields["num_key_value_heads"] = fields.get("num_attention_heads")
    fields["small_doge_legacy"] = True
    try:
        config = DogeConfig(**fields)
    except (ValueError, TypeError, StrictDataclassError) as err:
        raise DogeError(f"{folder / 'config.json'} is not a valid small-doge config ({err})") from err
    return config, renamed


def load_model(path_or_id: str | os.PathLike, attn_implementation: str = "auto", dtype: torch.dtype | None = None,
               device: str | torch.device | None = None, allow_legacy: bool = True) -> DogeForCausalLM:
    """Load a native Doge folder (doge- or transformers-written), an old small-doge folder, or a hub id.

    The hub is used only when ``path_or_id`` is not a local path and looks like ``owner/name``.
    Old small-doge checkpoints load with their own attention math (module docstring); with
    ``allow_legacy=False`` (training starts) they are refused, since the result could not be exported.
    Bad paths, non-Doge folders and corrupt or mismatched weights raise DogeError.
    """
    folder = _resolve(str(path_or_id))
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise DogeError(f"{folder} has no config.json; it is not a Hugging Face model folder")
    try:
        raw = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DogeError(f"{config_file} is not valid JSON ({err}); re-save the model") from err
    if raw.get("model_type") != "doge":
        raise DogeError(f"{folder} holds a {raw.get('model_type')!r} model, not a Doge (model_type 'doge')")
    state = _read_weights(folder)
    layout = legacy_layout(state)
    if layout is not None:
        if not allow_legacy:
            raise DogeError(f"{folder} is an old small-doge checkpoint ({layout}); doge can evaluate and chat with "
                            "it but not train from it, because the result could not be saved in transformers' Doge "
                            "format (no q/k norms, a per-query-head mask); start from a native Doge checkpoint")
        config, state = _legacy_config_and_state(folder, raw, state, layout)
    else:
        try:
            config = DogeConfig.from_pretrained(folder)
        except (ValueError, TypeError, StrictDataclassError) as err:
            raise DogeError(f"{config_file} is not a valid Doge config ({err})") from err
    with torch.device("meta"):
        model = DogeForCausalLM(config, attn_implementation=attn_implementation)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    expected = set(model.state_dict()) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise DogeError(f"weights in {folder} do not match its config: missing {sorted(missing)[:3]}, "
                        f"unexpected {sorted(unexpected)[:3]}")
    try:
        model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as err:  # shape mismatches between config.json and the weights
        raise DogeError(f"weights in {folder} do not fit its config.json: {str(err).splitlines()[-1].strip()}") from err
    # Non-persistent buffers (RoPE frequencies) were built on meta; rebuild them for real.
    model.model.rotary_emb = type(model.model.rotary_emb)(config)
    model.tie_weights()
    if dtype is not None:
        model = model.to(dtype)
    if device is not None:
        model = model.to(device)
    return model.eval()
