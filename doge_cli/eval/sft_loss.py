"""Held-out assistant-token loss: how well a model predicts the replies of an SFT test split.

The number the quickstart demo compares before and after SFT: mean cross-entropy (nats) over the
tokens whose label is not -100, i.e. the assistant replies, with every token weighted equally
(sum of losses / number of label tokens, not a mean of per-row means).
"""

from __future__ import annotations

import math
from pathlib import Path

from doge_cli.errors import DogeError


def _load_split(data, split: str):
    import datasets

    if isinstance(data, datasets.Dataset):
        return data
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise DogeError(f"the SFT dataset has no {split!r} split (it has {', '.join(data)})")
        return data[split]
    path = Path(data)
    if not path.exists():
        raise DogeError(f"SFT dataset {path} does not exist; run `doge data tokenize` and `doge data merge "
                        "--stage sft` first")
    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as err:
        raise DogeError(f"{path} is not a saved dataset (no dataset_dict.json or state.json)") from err
    return _load_split(loaded, split)


def assistant_token_loss(model, data, *, split: str = "test", batch_size: int = 8, max_rows: int | None = None,
                         device: str | None = None, per_row: bool = False) -> dict:
    """``{"loss", "perplexity", "tokens", "rows"}`` of ``model`` on an SFT split.

    With ``per_row`` each conversation is its own batch and ``row_sums``/``row_tokens`` (each row's
    summed loss and assistant-token count, for a standard error) come with it; the figures are the same.

    ``model`` is a folder, hub id or loaded :class:`~doge_cli.model.DogeForCausalLM`; ``data`` is a
    saved DatasetDict (e.g. ``datasets/merged/sft``), a saved Dataset, or one in memory, with
    ``input_ids`` and ``labels`` (-100 outside replies) and optionally ``position_ids`` (packed rows).
    The loss is SFT's own: each batch is packed into one padding-free row as the SFT objective packs it
    (positions restart per conversation), targets come from its label rule (``sft.shift_labels``) and
    the sum from the training loss (``lm.causal_lm_loss_sum``).
    """
    import torch

    from doge_cli.train.objectives.lm import causal_lm_loss_sum
    from doge_cli.train.objectives.sft import shift_labels

    if isinstance(model, str | Path):
        from doge_cli.chat.loading import pick_device
        from doge_cli.model import load_model

        model = load_model(str(model), device=pick_device(device))
    ds = _load_split(data, split)
    missing = {"input_ids", "labels"} - set(ds.column_names)
    if missing:
        raise DogeError(f"the SFT split lacks {sorted(missing)}; pass a tokenized SFT dataset (datasets/merged/sft)")
    if max_rows is not None:
        ds = ds.select(range(min(max_rows, len(ds))))
    has_pos = "position_ids" in ds.column_names
    total, count = 0.0, 0
    row_sums: list[float] = []
    row_tokens: list[int] = []
    if per_row:
        batch_size = 1
    model.eval()
    with torch.no_grad():
        for start in range(0, len(ds), batch_size):
            rows = ds[start:start + batch_size]
            ids = sum((list(x) for x in rows["input_ids"]), [])
            labels = sum((list(y) for y in rows["labels"]), [])
            pos = sum((list(p) for p in rows["position_ids"]) if has_pos
                      else (list(range(len(x))) for x in rows["input_ids"]), [])
            batch = {"input_ids": torch.tensor([ids], device=model.device),
                     "position_ids": torch.tensor([pos], device=model.device)}
            targets = shift_labels(torch.tensor([labels], device=model.device), batch["position_ids"])
            part, n = float(causal_lm_loss_sum(model, batch, targets).loss_sum), int((targets != -100).sum())
            total += part
            count += n
            row_sums.append(part)
            row_tokens.append(n)
    if count == 0:
        raise DogeError("the SFT split has no assistant tokens (every label is -100)")
    loss = total / count
    out = {"loss": loss, "perplexity": math.exp(loss), "tokens": count, "rows": len(ds)}
    if per_row:
        out.update(row_sums=row_sums, row_tokens=row_tokens)
    return out
