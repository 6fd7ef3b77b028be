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
                         device: str | None = None) -> dict:
    """``{"loss", "perplexity", "tokens", "rows"}`` of ``model`` on an SFT split.

    ``model`` is a folder, hub id or loaded :class:`~doge_cli.model.DogeForCausalLM`; ``data`` is a
    saved DatasetDict (e.g. ``datasets/merged/sft``), a saved Dataset, or one in memory, with
    ``input_ids`` and ``labels`` (-100 outside replies) and optionally ``position_ids`` (packed rows).
    """
    import torch

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
    model.eval()
    with torch.no_grad():
        for start in range(0, len(ds), batch_size):
            rows = ds[start:start + batch_size]
            width = max(len(x) for x in rows["input_ids"])
            ids = torch.zeros(len(rows["input_ids"]), width, dtype=torch.long)
            labels = torch.full_like(ids, -100)
            pos = torch.zeros_like(ids)
            for i, (x, y) in enumerate(zip(rows["input_ids"], rows["labels"])):
                ids[i, :len(x)] = torch.tensor(x)
                labels[i, :len(y)] = torch.tensor(y)
                # Right padding continues the positions, so the pads never start a new document.
                p = rows["position_ids"][i] if has_pos else list(range(len(x)))
                pos[i, :len(x)] = torch.tensor(p)
                pos[i, len(x):] = torch.arange(p[-1] + 1, p[-1] + 1 + width - len(x)) if len(x) else 0
            ids, labels, pos = ids.to(model.device), labels.to(model.device), pos.to(model.device)
            logits = model(ids, position_ids=pos).logits.float()
            target = labels[:, 1:]
            mask = target != -100
            losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), target.clamp(min=0),
                                                       reduction="none")
            total += float(losses[mask].sum())
            count += int(mask.sum())
    if count == 0:
        raise DogeError("the SFT split has no assistant tokens (every label is -100)")
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count, "rows": len(ds)}
