"""Results of one or more ``doge eval`` runs as one rich table, models side by side.

Built to fit a 100-column terminal with several models: each task is a heading row with its metrics
indented under it (full metric names), a model's column is headed by a short label (the parts of its
path that differ from the other models', e.g. ``pt``/``dpo`` for ``runs/quickstart/{pt,dpo}/final``)
and a value shows its standard error compactly (``0.449±0.051``). The JSON files keep everything.
"""

from __future__ import annotations

from pathlib import PurePosixPath

from rich import box
from rich.table import Table


def _fmt(metrics: dict, key: str) -> str:
    if key not in metrics:
        return "—"
    value = metrics[key]
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) >= 1000):
        return f"{int(value):,}"
    stderr = metrics.get(f"{key}_stderr")
    if abs(value) >= 1000:
        text = f"{value:.4g}"
        if stderr:
            return f"{value:,.0f}±{stderr:,.0f}"
    elif stderr:
        digits = 1 if abs(value) >= 10 else 3
        return f"{value:.{digits}f}±{stderr:.{digits}f}"
    else:
        text = f"{value:.4f}"
    return f"{text}±{stderr:.3f}" if stderr else text


def _parts(model: str) -> list[str]:
    parts = [p for p in PurePosixPath(str(model).replace("\\", "/")).parts if p not in (".", "/")]
    return parts or [str(model)]


def short_labels(models: list[str]) -> list[str]:
    """A short, distinct column label per model: the path parts that differ between the models (a common
    leading folder and a common trailing ``final`` dropped); one model is named by its run folder."""
    paths = [_parts(m) for m in models]
    if len({tuple(p) for p in paths}) == 1:
        parts = paths[0]
        name = parts[-2] if parts[-1] == "final" and len(parts) > 1 else parts[-1]
        return [name] + [f"{name} ({i})" for i in range(2, len(paths) + 1)]
    lead = 0
    while all(len(p) > lead + 1 for p in paths) and len({p[lead] for p in paths}) == 1:
        lead += 1
    tail = 0
    while all(len(p) > lead + tail + 1 for p in paths) and len({p[-1 - tail] for p in paths}) == 1:
        tail += 1
    labels = ["/".join(p[lead:len(p) - tail]) for p in paths]
    out: list[str] = []
    for label in labels:
        out.append(label if label not in out else f"{label} ({len(out) + 1})")
    return out


def results_table(runs: list[dict]) -> Table:
    """Tasks as heading rows with their metrics under them, runs as columns; the unigram baseline of
    held-out perplexity gets its own rows. The caption maps each label to its model."""
    labels = short_labels([str(run.get("model", "?")) for run in runs])
    table = Table(title="doge eval", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("task / metric", no_wrap=True)
    for label in labels:
        table.add_column(label, justify="right", no_wrap=True)
    mapping = [f"{label} = {run.get('model', '?')}" for label, run in zip(labels, runs)
               if label != str(run.get("model", "?"))]
    if mapping:
        table.caption = "; ".join(mapping)
    tasks: list[str] = []
    for run in runs:
        tasks += [t for t in run["tasks"] if t not in tasks]
    for task in tasks:
        table.add_row(f"[bold]{task}[/]", *("" for _ in runs))
        keys: list[str] = []
        for run in runs:
            keys += [k for k in run["tasks"].get(task, {}) if not k.endswith("_stderr") and k not in keys]
        for key in keys:
            table.add_row(f"  {key}", *(_fmt(run["tasks"].get(task, {}), key) for run in runs))
        baselines = [run.get("baselines", {}).get(task, {}).get("unigram") for run in runs]
        if any(baselines):
            for key in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
                table.add_row(f"  unigram {key}", *(_fmt(b or {}, key) for b in baselines))
    return table
