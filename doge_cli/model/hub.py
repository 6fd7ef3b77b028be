"""Hugging Face interop: save folders transformers loads natively, load native / hub checkpoints.

Old small-doge checkpoints (the SmallDoge repos that needed ``trust_remote_code``) are detected by
their key names and refused with a clear message. Decision: their math differs from transformers'
Doge in ways a key rename cannot express — no q/k RMS norms, and ``A`` / ``dt_proj`` sized by the
query heads (a bias per query head, not per kv head) — and their CDMoE has a different structure.
Loading them "converted" would silently give a different model. The renamable part of the map is
kept in :data:`LEGACY_KEY_MAP` so the detection and the message name exactly what differs:

    model.word_embed            -> model.embed_tokens
    layers.N.pre_layernorm      -> layers.N.input_layernorm
    layers.N.pre_residual       -> layers.N.input_residual
    layers.N.post_layernorm     -> layers.N.post_attention_layernorm
    layers.N.post_residual      -> layers.N.post_attention_residual
    layers.N.feed_forward       -> layers.N.mlp           (dense SwiGLU only)
    model.final_layernorm       -> model.norm
    (no counterpart)            -> self_attn.q_norm, self_attn.k_norm
    self_attn.A (Hq), dt_proj (Hq out) -> self_attn.A (Hkv), dt_proj (Hkv out)   shapes differ
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import DogeConfig, GenerationConfig

from doge_cli.errors import DogeError
from doge_cli.model.modeling import DogeForCausalLM

LEGACY_KEY_MAP = {
    "model.word_embed.": "model.embed_tokens.",
    ".pre_layernorm.": ".input_layernorm.",
    ".pre_residual.weight": ".input_residual",
    ".post_layernorm.": ".post_attention_layernorm.",
    ".post_residual.weight": ".post_attention_residual",
    ".feed_forward.": ".mlp.",
    "model.final_layernorm.": "model.norm.",
}


def save_pretrained(model: DogeForCausalLM, out_dir: str | os.PathLike, tokenizer=None) -> Path:
    """Write ``out_dir`` as a transformers Doge folder (config.json, model.safetensors, generation_config).

    ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads it natively, no ``trust_remote_code``.
    The folder is written under a temporary name beside it and renamed into place, so a crash never
    leaves half a folder; an existing ``out_dir`` is replaced. A ``tokenizer`` is saved into it too.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
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
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
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


def _is_legacy(state: dict[str, torch.Tensor]) -> bool:
    return any(old in key for key in state for old in ("word_embed", "pre_layernorm", "feed_forward"))


def load_model(path_or_id: str | os.PathLike, attn_implementation: str = "auto", dtype: torch.dtype | None = None,
               device: str | torch.device | None = None) -> DogeForCausalLM:
    """Load a native Doge folder (doge- or transformers-written) or hub id into :class:`DogeForCausalLM`.

    The hub is used only when ``path_or_id`` is not a local path and looks like ``owner/name``.
    Bad paths, non-Doge folders, corrupt weights and old small-doge checkpoints raise DogeError.
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
    if _is_legacy(state):
        raise DogeError(f"{folder} is an old small-doge checkpoint (pre-transformers names); its attention has no "
                        "q/k norms and a per-query-head dynamic mask, which transformers' Doge cannot express, so "
                        "doge refuses to convert it; use a native Doge checkpoint (e.g. SmallDoge/Doge-20M)")
    try:
        config = DogeConfig.from_pretrained(folder)
    except (ValueError, TypeError) as err:
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
