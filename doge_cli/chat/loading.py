"""Load a Doge model folder (or hub id) together with its tokenizer, with one-line errors.

Shared by ``doge chat`` (which needs a chat template) and ``doge eval`` (which does not).
"""

from __future__ import annotations

from pathlib import Path

from doge_cli.errors import DogeError


def pick_device(device: str | None = None) -> str:
    """``device`` checked (cpu, cuda, cuda:N, mps or auto), or for auto the first GPU torch sees, else cpu."""
    import re

    import torch

    if not device or device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    match = re.fullmatch(r"(cpu|cuda|mps)(?::(\d+))?", device)
    if not match or (match.group(2) is not None and match.group(1) != "cuda"):
        raise DogeError(f"unknown --device {device!r}; choose auto, cpu, cuda, cuda:N or mps")
    kind, index = match.group(1), match.group(2)
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise DogeError(f"--device {device}: torch sees no CUDA GPU here; use --device cpu (or auto)")
        if index is not None and int(index) >= torch.cuda.device_count():
            raise DogeError(f"--device {device}: there are only {torch.cuda.device_count()} CUDA device(s) "
                            f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise DogeError("--device mps: the MPS backend is not available here; use --device cpu (or auto)")
    return device


PRECISIONS = ("auto", "fp32", "bf16")  # --dtype: the model's own (as saved), or cast to fp32 / bf16
QUANTIZATIONS = ("int8",)  # --quantize: weight-only int8 linear layers (doge_cli.model.quantize), CPU only


def check_precision(dtype: str, quantize: str | None, device: str | None) -> None:
    """One-line errors for ``--device``, ``--dtype`` and ``--quantize``, before any file is read or model loaded."""
    where = pick_device(device)
    if dtype not in PRECISIONS:
        raise DogeError(f"unknown --dtype {dtype!r}; choose {', '.join(PRECISIONS)} (auto keeps the model's own)")
    if quantize is not None:
        if quantize not in QUANTIZATIONS:
            raise DogeError(f"unknown --quantize {quantize!r}; choose {', '.join(QUANTIZATIONS)} or leave it out")
        if where != "cpu":
            raise DogeError(f"--quantize {quantize} runs on the CPU only (torch's int8 kernel); add --device cpu, "
                            "or use --dtype bf16 on a GPU")


def describe_precision(model) -> str:
    """What the weights are, for logs and results: ``int8`` (weight-only), else the float dtype's short name."""
    if getattr(model, "quantized", None):
        return model.quantized
    return {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}.get(str(model.dtype),
                                                                                             str(model.dtype))


def _has_tokenizer_files(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()


def load_model_and_tokenizer(model: str, *, tokenizer: str | None = None, device: str | None = None,
                             need_chat_template: bool = False, dtype: str = "auto", quantize: str | None = None):
    """``(model, tokenizer)`` for a Doge folder or hub id.

    The tokenizer comes from ``tokenizer`` when given, else from the model folder (doge's
    ``RUN/final`` holds it). ``dtype`` (auto, fp32, bf16) casts the weights (auto: as saved);
    ``quantize="int8"`` then makes the linear layers weight-only int8 (CPU). Raises DogeError for a
    missing or non-Doge model, a folder without a tokenizer, and (with ``need_chat_template``) a
    tokenizer without a chat template.
    """
    import torch

    from doge_cli.data.tokenizer import load_tokenizer
    from doge_cli.model import load_model

    check_precision(dtype, quantize, device)
    cast = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    # The model first: its errors (missing folder, not a Doge, offline hub id) are the likelier ones.
    lm = load_model(model, device=pick_device(device), dtype=cast)
    if quantize == "int8":
        from doge_cli.model.quantize import quantize_int8

        quantize_int8(lm)
    source = tokenizer or model
    local = Path(source).expanduser()
    if tokenizer is None and local.is_dir() and not _has_tokenizer_files(local):
        raise DogeError(f"{local} holds a model but no tokenizer; copy the tokenizer it was trained with into the "
                        "folder (doge's RUN/final has one) or pass --tokenizer DIR")
    tok = load_tokenizer(str(local) if local.exists() else source)
    if need_chat_template and not tok.chat_template:
        raise DogeError(f"the tokenizer of {source} has no chat template, so turns cannot be rendered; use a "
                        "tokenizer from `doge data train-tokenizer` (it has one) via --tokenizer DIR")
    if len(tok) > lm.config.vocab_size:
        raise DogeError(f"the tokenizer of {source} has {len(tok)} tokens but the model only {lm.config.vocab_size}; "
                        "pass the tokenizer the model was trained with (--tokenizer DIR)")
    return lm, tok
