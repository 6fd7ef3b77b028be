"""Checkpoint averaging: the weights of several checkpoints of one run as one model.

A warmup-stable-decay run leaves many stable-phase checkpoints; averaging the last few often gives a
model as good as (or better than) the decayed end, for free ("pre-trained model averaging", Li et al.
2025, arXiv 2505.12082). Three weightings of the N sources, taken oldest first (i = 1..N):

- ``sma``: the plain mean, every source 1/N;
- ``ema``: the paper's exponential moving average, ``M_1 = W_1`` and ``M_i = alpha·W_i + (1-alpha)·M_(i-1)``
  over the sources oldest first: source i > 1 weighs ``alpha·(1-alpha)^(N-i)`` and the oldest
  ``(1-alpha)^(N-1)``, which sum to 1;
- ``wma``: linearly increasing, source i weighs ``i / (1 + 2 + ... + N)``.

Sources are checkpoint folders (``RUN/checkpoints/step-N``, whose weights one process held whole:
``model.safetensors``; taken in step order) or model folders (``config.json`` + ``model.safetensors``;
taken in the order given). They must hold the
same tensor names and shapes. The sum runs in float64 and is cast back to each tensor's dtype, so N
identical sources average to themselves bit for bit.

The result is a Hugging Face model folder written like a run's ``final/`` (config, generation config,
tokenizer and chat template taken from a template model folder: the run's ``final/`` for checkpoints,
the first source for model folders, or ``--template``), plus ``averaging.json`` naming the sources and
their weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from doge_cli.errors import DogeError

METHODS = ("sma", "ema", "wma")
WEIGHTS_FILE = "model.safetensors"


def weights_for(method: str, n: int, alpha: float = 0.2) -> list[float]:
    """The weight of each of ``n`` sources, oldest first; they sum to 1."""
    if n < 1:
        raise DogeError("averaging needs at least one checkpoint")
    if method == "sma":
        raw = [1.0] * n
    elif method == "ema":
        if not 0 < alpha <= 1:
            raise DogeError(f"--alpha {alpha} must be in (0, 1]")
        # The recursion M_1 = W_1, M_i = alpha W_i + (1 - alpha) M_(i-1), unrolled: the oldest starts it.
        raw = [(1 - alpha) ** (n - 1)] + [alpha * (1 - alpha) ** (n - i) for i in range(2, n + 1)]
    elif method == "wma":
        raw = [float(i) for i in range(1, n + 1)]
    else:
        raise DogeError(f"unknown --method {method!r}; choose one of {', '.join(METHODS)}")
    total = sum(raw)
    return [w / total for w in raw]


def is_checkpoint(path: Path) -> bool:
    return (path / "state.json").is_file() and path.parent.name == "checkpoints"


def sources_of_run(run_dir: Path, last: int) -> list[Path]:
    """The last ``last`` complete checkpoints of a run, oldest first."""
    from doge_cli.train.checkpoint import list_checkpoints

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DogeError(f"run folder {run_dir} does not exist")
    found = list_checkpoints(run_dir)
    if not found:
        raise DogeError(f"run {run_dir} has no complete checkpoints (RUN/checkpoints/step-N); train with "
                        "checkpoint.every=N to keep some")
    if last < 1:
        raise DogeError(f"--last {last} must be at least 1")
    if last > len(found):
        raise DogeError(f"--last {last} asks for more checkpoints than run {run_dir} has ({len(found)}); "
                        f"use --last {len(found)} or fewer")
    return found[-last:]


def check_source(path: Path) -> Path:
    """The weights file of a source folder; a one-line DogeError when it has none we can average."""
    path = Path(path)
    if not path.is_dir():
        raise DogeError(f"{path} is not a folder; give checkpoint folders (RUN/checkpoints/step-N) or model folders")
    weights = path / WEIGHTS_FILE
    if weights.is_file():
        return weights
    if is_checkpoint(path):
        raise DogeError(f"checkpoint {path} holds sharded weights (DeepSpeed or FSDP wrote it), not one "
                        f"{WEIGHTS_FILE}; average the runs' exported models instead, or checkpoints of a "
                        "one-process or DDP run")
    raise DogeError(f"{path} has no {WEIGHTS_FILE}; give checkpoint folders (RUN/checkpoints/step-N) or model folders")


def template_for(sources: list[Path], template: str | None) -> Path:
    """The model folder whose config and tokenizer the averaged model gets."""
    if template is not None:
        path = Path(template)
        if not (path / "config.json").is_file():
            raise DogeError(f"--template {path} is not a model folder (no config.json)")
        return path
    first = Path(sources[0])
    if (first / "config.json").is_file():
        return first
    final = first.parent.parent / "final"
    if (final / "config.json").is_file():
        return final
    raise DogeError(f"run {first.parent.parent} has no final/ model yet, which gives the averaged model its config "
                    "and tokenizer; pass --template MODEL_DIR (a model folder of the same shape, e.g. the one the "
                    "run started from)")


def _read(weights: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise DogeError(f"cannot read {weights} ({' '.join(str(err).split())[:160]}); it is damaged or not a "
                        "safetensors file") from None


def average_state(paths: list[Path], weights: list[float]) -> dict[str, torch.Tensor]:
    """The weighted sum of the sources' tensors (float64 sum, cast back); refuses mismatched sources."""
    total: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    reference: dict[str, tuple] = {}
    for index, (path, weight) in enumerate(zip(paths, weights)):
        state = _read(check_source(path))
        if index == 0:
            reference = {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
            dtypes = {k: v.dtype for k, v in state.items()}
        else:
            missing, extra = sorted(set(reference) - set(state)), sorted(set(state) - set(reference))
            if missing or extra:
                what = f"lacks {missing[0]}" if missing else f"has {extra[0]}, which {paths[0]} lacks"
                raise DogeError(f"{path} does not match {paths[0]}: it {what}; average checkpoints of one model")
            for key, (shape, _) in reference.items():
                if tuple(state[key].shape) != shape:
                    raise DogeError(f"{path} does not match {paths[0]}: {key} is {tuple(state[key].shape)}, not "
                                    f"{shape}; average checkpoints of one model")
        for key, tensor in state.items():
            if not tensor.is_floating_point():
                if index and not torch.equal(tensor, total[key]):
                    raise DogeError(f"{path} does not match {paths[0]}: its integer tensor {key} differs")
                total.setdefault(key, tensor)
                continue
            term = tensor.double() * weight
            total[key] = term if index == 0 else total[key] + term
    return {k: v.to(dtypes[k]) if v.is_floating_point() else v for k, v in total.items()}


def average(sources: list[Path], method: str, out: Path, *, alpha: float = 0.2, template: str | None = None) -> Path:
    """Average ``sources`` (oldest first) into the model folder ``out``; returns it."""
    from transformers import AutoTokenizer, DogeConfig

    from doge_cli.io import check_apart, check_replaceable
    from doge_cli.model import DogeForCausalLM, save_pretrained
    from doge_cli.train.checkpoint import load_weights_strictly

    sources = [Path(p) for p in sources]
    for path in sources:
        check_source(path)
    if all(is_checkpoint(p) for p in sources):  # checkpoints are put in step order, whatever order given
        from doge_cli.train.checkpoint import checkpoint_step

        sources.sort(key=checkpoint_step)
    weights = weights_for(method, len(sources), alpha)
    model_dir = template_for(sources, template)
    runs = {f"run {p.parent.parent}": p.parent.parent for p in sources if is_checkpoint(p)}  # the checkpoints' runs
    check_apart(out, {**{f"source {i + 1}": p for i, p in enumerate(sources)}, "template": model_dir, **runs})
    check_replaceable(out, "--out")
    state = average_state(sources, weights)
    try:
        config = DogeConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as err:
        raise DogeError(f"cannot read {model_dir / 'config.json'} ({' '.join(str(err).split())[:160]})") from None
    model = DogeForCausalLM(config, attn_implementation="eager")
    dtype = next(v.dtype for v in state.values() if v.is_floating_point())
    model = model.to(dtype)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # the head is the embedding: tied again on load
    load_weights_strictly(model, state, where=f"the average of {len(sources)} sources (template {model_dir})")
    tokenizer = None
    if (model_dir / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    record = {"method": method, "alpha": alpha if method == "ema" else None, "template": str(model_dir),
              "sources": [{"path": str(p), "weight": w} for p, w in zip(sources, weights)]}
    return save_pretrained(model, out, tokenizer=tokenizer, extra_files={"averaging.json": json.dumps(record, indent=2)})
