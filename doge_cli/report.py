"""``doge report``: one report card for a pipeline of runs (or a single run).

Read from what the runs left behind, nothing re-computed: ``doge_run.json`` (stage, environment),
``config.yaml`` (the resolved config), ``metrics.jsonl`` (per logged window: loss, tokens, seconds,
tokens/s, MFU, memory; eval loss; the ``eval/<task>/<metric>`` figures of ``logging.eval_tasks``), ``final/`` (the exported model: parameter count from its weights'
header) and the JSON files ``doge eval --output-dir`` writes. Stages are columns in the order given; a
run folder that does not exist (a stage not run yet) is a column of "—", as is any figure a run did
not record.

Models that only an eval file names (a hub model evaluated beside the runs) get a column in the
evaluation table, not in the stages table.

Figures: wall time and tokens are sums over the logged windows (``time_s``, ``tokens``), so a resumed
run counts each step once; tokens/s, MFU and memory are medians over the windows after the first (which
holds start-up and compilation); the losses are the last logged ones. An eval file belongs to a run when
its ``model`` path ends in that run's ``final`` folder; other eval files get columns of their own.

The report is Markdown (``--out``, default ``report.md``) with one PNG of every stage's loss curves
beside it (``<out stem>_loss.png``) and, when a run evaluated tasks while it trained (``logging.eval_tasks``),
one of their curves (``<out stem>_eval_tasks.png``: a panel per task metric, a line per run), whose last
values are rows of the stages table; ``--html`` also writes a self-contained HTML page (the images inlined)
next to it.
"""

from __future__ import annotations

import base64
import html
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from doge_cli.errors import DogeError

DASH = "—"


@dataclass
class Run:
    path: Path
    label: str
    exists: bool = False
    marker: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)
    params: int | None = None
    evals: dict[str, dict[str, float]] = field(default_factory=dict)  # task -> metric -> value
    given: bool = True  # a run folder the user named (False: a model only an eval file knows)


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DogeError(f"{what} {path} cannot be read ({' '.join(str(err).split())[:120]}); it is damaged") from None


def _param_count(final: Path) -> int | None:
    weights = final / "model.safetensors"
    if not weights.is_file():
        return None
    from safetensors import safe_open

    total = 0
    with safe_open(str(weights), framework="pt") as fh:
        for key in fh.keys():
            total += math.prod(fh.get_slice(key).get_shape())
    return total


def load_run(path: Path, label: str) -> Run:
    import yaml

    run = Run(Path(path), label)
    if not run.path.exists():
        return run
    if not run.path.is_dir() or not (run.path / "doge_run.json").is_file():
        raise DogeError(f"{run.path} is not a doge run folder (no doge_run.json); give the folders `doge train` "
                        "wrote (output_dir)")
    run.exists = True
    run.marker = _read_json(run.path / "doge_run.json", "run marker")
    if not isinstance(run.marker, dict) or not isinstance(run.marker.get("environment", {}), dict):
        raise DogeError(f"run marker {run.path / 'doge_run.json'} is not what doge train writes (an object with the "
                        "stage and environment); it was changed or damaged")
    if (run.path / "config.yaml").is_file():
        try:
            run.config = yaml.safe_load((run.path / "config.yaml").read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as err:
            raise DogeError(f"{run.path / 'config.yaml'} cannot be read ({' '.join(str(err).split())[:120]})") from None
        if not isinstance(run.config, dict):
            raise DogeError(f"{run.path / 'config.yaml'} is not a configuration (a mapping of sections); it was "
                            "changed or damaged")
    metrics = run.path / "metrics.jsonl"
    if metrics.is_file():
        for number, line in enumerate(metrics.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except ValueError:
                    raise DogeError(f"{metrics} line {number} is not JSON; the file is damaged") from None
                if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                    raise DogeError(f"{metrics} line {number} is not a metrics record (an object with a step); the "
                                    "file is damaged")
                run.records.append(record)
    run.params = _param_count(run.path / "final")
    return run


def attach_evals(runs: list[Run], eval_paths: list[Path]) -> list[Run]:
    """Give each eval result to the run whose final/ it evaluated; the others become columns of their own."""
    files: list[Path] = []
    for path in eval_paths:
        path = Path(path)
        if path.is_dir():
            files += sorted(path.glob("*.json"))
        elif path.is_file():
            files.append(path)
        else:
            raise DogeError(f"--eval {path} does not exist; give doge eval's --output-dir or its JSON files")
    extra: list[Run] = []
    for file in files:
        result = _read_json(file, "eval result")
        if not isinstance(result, dict) or "tasks" not in result or "model" not in result:
            continue  # not a doge eval result (e.g. a comparison file)
        tasks = result["tasks"]
        if not isinstance(tasks, dict) or not all(isinstance(m, dict) for m in tasks.values()):
            raise DogeError(f"eval result {file} is not what doge eval writes (its tasks are not task -> metric -> "
                            "value); re-run doge eval or leave the file out")
        model = Path(str(result["model"]))
        owner = _owner(runs, result, file)
        if owner is None:
            owner = Run(model, _short(model), exists=False, given=False)
            extra.append(owner)
        for task, metrics in tasks.items():
            owner.evals.setdefault(task, {}).update(
                {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not k.endswith("_stderr")})
    return runs + extra


def _owner(runs: list[Run], result: dict, file: Path) -> Run | None:
    """The run whose final/ an eval result evaluated: by the resolved path doge eval records; for results
    from before it did, by the path's trailing parts, refusing a match that more than one run shares."""
    recorded = result.get("model_path")
    if isinstance(recorded, str):
        return next((r for r in runs if r.exists and (r.path / "final").resolve() == Path(recorded)), None)
    matches = [r for r in runs if r.exists and _same_tail(Path(str(result["model"])), r.path / "final")]
    if len(matches) > 1:
        raise DogeError(f"eval result {file} names model {result['model']}, which could be "
                        f"{' or '.join(str(r.path / 'final') for r in matches)}; evaluate again with this doge (it "
                        "records the full path) or leave the file out")
    return matches[0] if matches else None


def _same_tail(a: Path, b: Path) -> bool:
    """Whether two paths name the same folder, compared by their trailing parts (eval files keep the path
    as it was typed, relative to wherever doge eval ran)."""
    pa = [p for p in a.parts if p not in (".", "")]
    pb = [p for p in b.resolve().parts]
    n = min(len(pa), len(pb), 3)
    return n > 0 and pa[-n:] == pb[-n:]


def _short(path: Path) -> str:
    parts = [p for p in Path(path).parts if p not in (".", "/")]
    if parts and parts[-1] == "final":
        parts = parts[:-1]
    return "/".join(parts[-2:]) or str(path)


# ------------------------------------------------------------------------------------------- figures


def task_keys(runs: list[Run]) -> list[str]:
    """The ``eval/<task>/<metric>`` figures any run logged while it trained (logging.eval_tasks), sorted."""
    return sorted({k for run in runs for r in run.records for k, v in r.items()
                   if k.startswith("eval/") and isinstance(v, (int, float))})


def _task_label(key: str) -> str:
    """``eval/arithmetic/em`` -> ``arithmetic em``."""
    return " ".join(key.removeprefix("eval/").split("/", 1))


def _later(records: list[dict], key: str) -> list[float]:
    values = [r[key] for r in records if isinstance(r.get(key), (int, float))]
    return values[1:] or values


def _fmt_seconds(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _fmt_count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def _get(config: dict, dotted: str):
    value: Any = config
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def stage_rows(runs: list[Run]) -> list[tuple[str, list[str]]]:
    """(row label, one cell per run) for the stages table."""
    def cell(run: Run, fn) -> str:
        if not run.exists:
            return DASH
        try:
            value = fn(run)
        except (KeyError, TypeError, ValueError, statistics.StatisticsError):
            value = None
        return DASH if value is None or value == "" else str(value)

    def steps(run: Run):
        total = _get(run.config, "train.max_steps")
        done = run.records[-1]["step"] if run.records else None
        if done is None:
            return None
        return f"{done:,}" + (f" / {total:,}" if total else "")

    def status(run: Run):
        return "finished" if (run.path / "final" / "config.json").is_file() else "unfinished (no final/)"

    def median(key: str, fmt: str):
        return lambda run: fmt.format(statistics.median(_later(run.records, key))) if _later(run.records, key) else None

    def last(key: str):
        def get(run: Run):
            values = [r[key] for r in run.records if isinstance(r.get(key), (int, float))]
            return f"{values[-1]:.4f}" if values else None
        return get

    def model(run: Run):
        m = run.config.get("model", {})
        shape = (f"{m['num_hidden_layers']} layers x {m['hidden_size']}, {m['num_attention_heads']}/"
                 f"{m['num_key_value_heads']} heads" + (", CDMoE" if m.get("is_moe") else ""))
        return shape + (f", {_fmt_count(run.params)} parameters" if run.params else "")

    rows = [
        ("stage", lambda r: r.marker.get("stage")),
        ("status", status),
        ("size / hardware", lambda r: f"{run_value(r, 'size')} / {run_value(r, 'hardware')}"),
        ("model", model),
        ("steps", steps),
        ("wall time", lambda r: _fmt_seconds(sum(x.get("time_s", 0) for x in r.records))
         if any("time_s" in x for x in r.records) else None),
        ("tokens", lambda r: _fmt_count(sum(x.get("tokens", 0) for x in r.records))
         if any("tokens" in x for x in r.records) else None),
        ("tokens/s (median)", median("tokens_per_s", "{:,.0f}")),
        ("MFU (median)", lambda r: f"{statistics.median(_later(r.records, 'mfu')):.1%}" if _later(r.records, "mfu")
         else None),
        ("peak memory GB", lambda r: f"{max(x.get('mem_gb') or 0 for x in r.records):.2f}" if r.records else None),
        ("final train loss", last("loss")),
        ("final eval loss", last("eval_loss")),
        ("learning rate / schedule", lambda r: f"{_get(r.config, 'optim.lr')} / {_get(r.config, 'schedule.name')}"),
        ("global batch x length", lambda r: f"{_get(r.config, 'train.global_batch_size')} x "
         f"{_get(r.config, 'data.max_length')}"),
        ("precision / attention", lambda r: f"{_get(r.config, 'runtime.precision')} / "
         f"{next((x['attention'] for x in r.records if 'attention' in x), _get(r.config, 'runtime.attn_implementation'))}"),
        ("started from", lambda r: _get(r.config, "init_from")),
    ]

    def last_figure(key: str):
        def get(run: Run):
            values = [r[key] for r in run.records if isinstance(r.get(key), (int, float))]
            return f"{values[-1]:.4g}" if values else None
        return get

    rows += [(f"in-training {_task_label(key)} (last)", last_figure(key)) for key in task_keys(runs)]
    return [(label, [cell(run, fn) for run in runs]) for label, fn in rows]


def run_value(run: Run, key: str):
    return run.config.get(key) or DASH


def eval_rows(runs: list[Run]) -> list[tuple[str, list[str]]]:
    keys = sorted({(task, metric) for run in runs for task, metrics in run.evals.items() for metric in metrics})
    rows = []
    for task, metric in keys:
        cells = []
        for run in runs:
            value = run.evals.get(task, {}).get(metric)
            cells.append(DASH if value is None else f"{value:.4g}")
        rows.append((f"{task} {metric}", cells))
    return rows


def environment_rows(runs: list[Run]) -> list[tuple[str, str]]:
    envs = [r.marker.get("environment") for r in runs if r.exists and r.marker.get("environment")]
    if not envs:
        return [("environment", "not recorded (runs written before doge recorded it)")]
    env = envs[-1]
    git = env.get("git")
    commit = f"{git['commit'][:12]}{' (uncommitted changes)' if git['dirty'] else ''}" if git else "not a git checkout"
    distinct = sorted({(e.get("git") or {}).get("commit", "")[:12] for e in envs} - {""})
    if len(distinct) > 1:
        commit += f"; the runs span commits {', '.join(distinct)}"
    return [("doge", f"{env.get('doge')} (git {commit})"), ("torch / transformers",
            f"{env.get('torch')} / {env.get('transformers')}"), ("python", env.get("python")),
            ("hardware", f"{env.get('hardware')} ({env.get('device')}, {env.get('processes')} "
             f"process{'es' if env.get('processes', 1) > 1 else ''})")]


# ------------------------------------------------------------------------------------------- output


def _panels(n: int):
    """A figure with ``n`` panels, three to a row (the unused ones hidden)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, axes


def _save(fig, out_png: Path) -> None:
    import matplotlib.pyplot as plt

    from doge_cli.io import atomic_file

    fig.tight_layout()
    with atomic_file(out_png) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def plot_losses(runs: list[Run], out_png: Path) -> bool:
    """One panel per run with its train and eval loss; False when no run logged anything."""
    shown = [r for r in runs if r.records]
    if not shown:
        return False
    fig, axes = _panels(len(shown))
    for ax, run in zip(axes.flat, shown):
        train = [(r["step"], r["loss"]) for r in run.records if isinstance(r.get("loss"), (int, float))]
        evals = [(r["step"], r["eval_loss"]) for r in run.records if isinstance(r.get("eval_loss"), (int, float))]
        if train:
            ax.plot(*zip(*train), label="train")
        if evals:
            ax.plot(*zip(*evals), marker="o", label="eval")
        ax.set_title(run.label, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.set_ylabel("loss")
    axes[0][0].legend(fontsize=8)
    _save(fig, out_png)
    return True


def plot_eval_tasks(runs: list[Run], out_png: Path) -> bool:
    """One panel per in-training task metric (logging.eval_tasks), a line per run that logged it; False when
    no run did."""
    keys = task_keys(runs)
    if not keys:
        return False
    fig, axes = _panels(len(keys))
    for ax, key in zip(axes.flat, keys):
        for run in runs:
            points = [(r["step"], r[key]) for r in run.records if isinstance(r.get(key), (int, float))]
            if points:
                ax.plot(*zip(*points), marker="o", label=run.label)
        ax.set_title(_task_label(key), fontsize=9)
        if "perplexity" in key:
            ax.set_yscale("log")  # word perplexity spans orders of magnitude early in a run
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, out_png)
    return True


def build(run_dirs: list[Path], eval_paths: list[Path], labels: list[str] | None = None) -> list[Run]:
    if not run_dirs:
        raise DogeError("give at least one run folder, e.g. doge report runs/pt runs/sft")
    labels = labels or [_short(Path(p)) for p in run_dirs]
    runs = [load_run(Path(p), label) for p, label in zip(run_dirs, labels)]
    if not any(r.exists for r in runs):
        raise DogeError(f"none of the run folders exist ({', '.join(str(p) for p in run_dirs)})")
    return attach_evals(runs, eval_paths)


def _md_table(header: list[str], rows: list[tuple[str, list[str]]]) -> list[str]:
    def esc(text: str) -> str:
        return str(text).replace("|", "\\|")
    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join([esc(label), *(esc(c) for c in cells)]) + " |" for label, cells in rows]
    return lines


def render_markdown(runs: list[Run], image: str | None, created: str, tasks_image: str | None = None) -> str:
    given = [r for r in runs if r.given]
    header = ["", *(r.label for r in given)]
    lines = ["# doge report", "", f"Written {created} from {len([r for r in runs if r.exists])} run folder(s).", "",
             "## Environment", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in environment_rows(runs)]
    lines += ["", "## Stages", ""] + _md_table(header, stage_rows(given))
    evals = eval_rows(runs)
    lines += ["", "## Evaluation", ""]
    lines += _md_table(["task metric", *(r.label for r in runs)], evals) if evals else \
        ["No `doge eval` results were given (`--eval DIR`)."]
    if image:
        lines += ["", "## Loss curves", "", f"![loss curves]({image})"]
    if tasks_image:
        lines += ["", "## Evaluation during training", "", f"![in-training evaluation]({tasks_image})"]
    return "\n".join(lines) + "\n"


def render_html(runs: list[Run], png: Path | None, created: str, tasks_png: Path | None = None) -> str:
    def table(header: list[str], rows) -> str:
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    parts = [f"<h1>doge report</h1><p>Written {html.escape(created)} from "
             f"{len([r for r in runs if r.exists])} run folder(s).</p>",
             "<h2>Environment</h2>", table(["", ""], environment_rows(runs)),
             "<h2>Stages</h2>", table(["", *(r.label for r in runs if r.given)],
                                      [[k, *v] for k, v in stage_rows([r for r in runs if r.given])])]
    evals = eval_rows(runs)
    parts.append("<h2>Evaluation</h2>")
    parts.append(table(["task metric", *(r.label for r in runs)], [[k, *v] for k, v in evals]) if evals
                 else "<p>No <code>doge eval</code> results were given (<code>--eval DIR</code>).</p>")
    if png is not None:
        data = base64.b64encode(png.read_bytes()).decode()
        parts.append(f'<h2>Loss curves</h2><img alt="loss curves" src="data:image/png;base64,{data}">')
    if tasks_png is not None:
        data = base64.b64encode(tasks_png.read_bytes()).decode()
        parts.append('<h2>Evaluation during training</h2><img alt="in-training evaluation" '
                     f'src="data:image/png;base64,{data}">')
    style = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:80em}table{border-collapse:collapse;"
             "margin:1em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}th{background:#f3f3f3}"
             "img{max-width:100%}")
    return (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>doge report</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")


def write_report(run_dirs: list[Path], out: Path, *, eval_paths: list[Path] = (), as_html: bool = False,
                 labels: list[str] | None = None) -> list[Path]:
    """Write the report (and its PNG, and the HTML page when asked); returns the files written."""
    from doge_cli.io import check_apart, check_file_target, write_text_atomic

    out = Path(out)
    if out.suffix != ".md":
        raise DogeError(f"--out {out} must end in .md (the HTML page, with --html, goes beside it)")
    # Inside a run folder the report would be a file doge's run does not list (and --overwrite refuses).
    check_apart(out, {f"run {p}": p for p in run_dirs})

    def ours(path: Path) -> bool:  # a report doge wrote earlier may be replaced, nothing else
        if path.suffix == ".png":
            return ours(out) if out.is_file() else False
        text = path.read_text(encoding="utf-8", errors="replace")
        return text.startswith("# doge report") if path.suffix == ".md" else "<title>doge report</title>" in text

    png, page = out.with_name(out.stem + "_loss.png"), out.with_suffix(".html")
    tasks_png = out.with_name(out.stem + "_eval_tasks.png")
    for target in (out, png, tasks_png, *([page] if as_html else [])):
        check_file_target(target, is_ours=ours, what="report file")
    runs = build(run_dirs, list(eval_paths), labels)
    created = time.strftime("%Y-%m-%d %H:%M %Z")
    written = []
    has_png = plot_losses(runs, png)
    if has_png:
        written.append(png)
    has_tasks = plot_eval_tasks(runs, tasks_png)
    if has_tasks:
        written.append(tasks_png)
    write_text_atomic(out, render_markdown(runs, png.name if has_png else None, created,
                                           tasks_png.name if has_tasks else None))
    written.insert(0, out)
    if as_html:
        write_text_atomic(page, render_html(runs, png if has_png else None, created,
                                            tasks_png if has_tasks else None))
        written.append(page)
    return written
