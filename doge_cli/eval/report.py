"""Results of one or more ``doge eval`` runs as one rich table, models side by side."""

from __future__ import annotations

from rich.table import Table


def _fmt(metrics: dict, key: str) -> str:
    if key not in metrics:
        return "—"
    value = metrics[key]
    text = f"{value:.4g}" if abs(value) >= 1000 else f"{value:.4f}"
    stderr = metrics.get(f"{key}_stderr")
    return f"{text} ± {stderr:.4f}" if stderr else text


def results_table(runs: list[dict]) -> Table:
    """Rows are (task, metric), columns are runs; the unigram baseline of held-out perplexity gets its own rows."""
    labels = []
    for run in runs:
        label = str(run.get("model", "?"))
        labels.append(label if labels.count(label) == 0 else f"{label} ({len(labels) + 1})")
    table = Table(title="doge eval", show_lines=False)
    table.add_column("task", style="bold")
    table.add_column("metric")
    for label in labels:
        table.add_column(label, justify="right", overflow="fold")
    tasks: list[str] = []
    for run in runs:
        tasks += [t for t in run["tasks"] if t not in tasks]
    for task in tasks:
        keys: list[str] = []
        for run in runs:
            keys += [k for k in run["tasks"].get(task, {}) if not k.endswith("_stderr") and k not in keys]
        for key in keys:
            table.add_row(task, key, *(_fmt(run["tasks"].get(task, {}), key) for run in runs))
        baselines = [run.get("baselines", {}).get(task, {}).get("unigram") for run in runs]
        if any(baselines):
            for key in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
                table.add_row("", f"{key} [dim](unigram baseline)[/]", *(_fmt(b or {}, key) for b in baselines))
    return table
