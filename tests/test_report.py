"""doge report: the card for a fixture of run folders equals a golden file; missing stages and figures
show "—"; the HTML page opens in a real browser."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from doge_cli.errors import DogeError
from doge_cli.report import build, plot_eval_tasks, render_markdown, write_report
from tests.cli.helpers import run_doge

GOLDEN = Path(__file__).parent / "golden" / "report.md"
ENV = {"started": "2026-11-30T10:00:00+0000", "python": "3.11.7", "doge": "0.1.0", "torch": "2.13.0",
       "transformers": "5.3.0", "git": {"commit": "0123456789abcdef0123", "dirty": True}, "device": "cpu",
       "hardware": "Test CPU (2 cores)", "processes": 1}


def make_run(root: Path, name: str, stage: str, records: list[dict], *, final: bool, init_from=None) -> Path:
    run = root / "runs" / name
    run.mkdir(parents=True)
    (run / "doge_run.json").write_text(json.dumps({"stage": stage, "doge_version": "0.1.0", "environment": ENV}))
    config = {"stage": stage, "size": "1M", "hardware": "cpu", "init_from": init_from,
              "model": {"num_hidden_layers": 4, "hidden_size": 128, "num_attention_heads": 4,
                        "num_key_value_heads": 2, "is_moe": False},
              "optim": {"lr": 0.003}, "schedule": {"name": "warmup_stable_decay"},
              "train": {"max_steps": records[-1]["step"], "global_batch_size": 8},
              "data": {"max_length": 256}, "runtime": {"precision": "fp32", "attn_implementation": "auto"}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if final:
        (run / "final").mkdir()
        (run / "final" / "config.json").write_text("{}")
        save_file({"a": torch.zeros(1000, 100), "b": torch.zeros(2345)}, str(run / "final" / "model.safetensors"))
    return run


def records(steps: list[int], loss0: float, *, mfu: bool = True) -> list[dict]:
    out = []
    for i, step in enumerate(steps):
        r = {"step": step, "loss": loss0 - i, "lr": 0.003, "tokens_per_s": 1000.0 * (i + 1), "mem_gb": 0.5 + i / 10,
             "tokens": 20_000, "time_s": 30.0}
        if mfu:
            r["mfu"] = 0.1 * (i + 1)
        if i == 0:
            r["attention"] = "sdpa"
        out.append(r)
    out[-1]["eval_loss"] = loss0 - len(steps) + 0.5
    return out


@pytest.fixture
def pipeline(tmp_path):
    pt = make_run(tmp_path, "pt", "pt", records([10, 20, 30], 7.0), final=True)
    sft = make_run(tmp_path, "sft", "sft", records([5, 10], 4.0, mfu=False), final=False, init_from="runs/pt/final")
    evals = tmp_path / "eval"
    evals.mkdir()
    (evals / "pt.json").write_text(json.dumps({"model": "./runs/pt/final", "tasks": {
        "heldout-ppl": {"word_perplexity": 410.123, "word_perplexity_stderr": 3.0}, "arithmetic": {"em": 0.25}}}))
    (evals / "hub.json").write_text(json.dumps({"model": "SmallDoge/Doge-20M", "tasks": {"arithmetic": {"em": 0.5}}}))
    (evals / "compare.json").write_text(json.dumps({"rows": []}))  # not an eval result: ignored
    return tmp_path, [pt, sft, tmp_path / "runs" / "dpo"], evals


def test_the_report_equals_the_golden_file(pipeline):
    root, runs, evals = pipeline
    text = render_markdown(build(runs, [evals]), "report_loss.png", "CREATED")
    if os.environ.get("DOGE_UPDATE_GOLDEN") == "1":  # regenerate after an intended change, then review the diff
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()


def test_missing_stages_and_figures_are_dashes(pipeline):
    root, runs, evals = pipeline
    text = render_markdown(build(runs, [evals]), None, "CREATED")
    stages = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
              for line in text.split("## Stages")[1].split("## Evaluation")[0].splitlines() if line.startswith("| ")}
    assert stages[""] == ["runs/pt", "runs/sft", "runs/dpo"] and stages["stage"] == ["pt", "sft", "—"]
    assert stages["wall time"] == ["1m30s", "1m00s", "—"] and stages["tokens"] == ["60.00k", "40.00k", "—"]
    assert stages["MFU (median)"] == ["25.0%", "—", "—"]  # median over the windows after the first
    assert stages["status"] == ["finished", "unfinished (no final/)", "—"]
    assert stages["model"][0] == "4 layers x 128, 4/2 heads, 102.34k parameters"
    assert all(row[2] == "—" for label, row in stages.items() if label)  # dpo was not run
    assert "## Loss curves" not in text


def test_the_command_writes_markdown_png_and_html_and_replaces_only_its_own(pipeline, capsys):
    root, runs, evals = pipeline
    out = root / "report.md"
    code, stdout, err = run_doge(capsys, "report", *map(str, runs), "--eval", str(evals), "--out", str(out), "--html")
    assert code == 0, err
    assert stdout.split() == ["wrote", str(out), "wrote", str(root / "report_loss.png"), "wrote",
                              str(root / "report.html")]
    assert out.read_text().startswith("# doge report") and "![loss curves](report_loss.png)" in out.read_text()
    assert (root / "report_loss.png").read_bytes()[:4] == b"\x89PNG"
    code, _, err = run_doge(capsys, "report", *map(str, runs), "--out", str(out))  # its own report: replaced
    assert code == 0, err
    mine = root / "notes.md"
    mine.write_text("my notes")
    code, _, err = run_doge(capsys, "report", *map(str, runs), "--out", str(mine))
    assert code == 2 and "already exists and is not one doge wrote" in err and mine.read_text() == "my notes"


def test_bad_report_input_is_one_line(pipeline, tmp_path):
    root, runs, evals = pipeline
    with pytest.raises(DogeError, match="none of the run folders exist"):
        build([tmp_path / "nothing"], [])
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    with pytest.raises(DogeError, match="is not a doge run folder"):
        build([foreign], [])
    with pytest.raises(DogeError, match="must end in .md"):
        write_report(runs, tmp_path / "report.txt")
    (runs[0] / "metrics.jsonl").write_text("{not json\n")
    with pytest.raises(DogeError, match="line 1 is not JSON"):
        build(runs, [])


def test_the_html_page_opens_in_a_browser_without_errors(pipeline):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("DOGE_REQUIRE_BROWSER") == "1":
            pytest.fail("chromium is not installed (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    root, runs, evals = pipeline
    write_report(runs, root / "report.md", eval_paths=[evals], as_html=True)
    errors = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto((root / "report.html").as_uri())
            assert page.title() == "doge report"
            assert page.locator("table").count() == 3
            assert page.evaluate("document.querySelector('img').naturalWidth") > 100  # the inlined PNG decodes
            assert "SmallDoge/Doge-20M" in page.inner_text("body")  # an eval of another model: its own column
        finally:
            browser.close()
    assert errors == []


def test_evals_go_to_the_run_they_evaluated_even_when_paths_end_alike(tmp_path, monkeypatch):
    from doge_cli.eval.run import model_path, model_slug

    one = make_run(tmp_path / "exp1", "sft", "sft", records([5, 10], 4.0, mfu=False), final=True)
    two = make_run(tmp_path / "exp2", "sft", "sft", records([5, 10], 3.0, mfu=False), final=True)
    assert model_slug(str(one / "final")) != model_slug(str(two / "final"))  # two results files, not one
    monkeypatch.chdir(two)  # `doge eval --model final` typed in each run's folder
    evals = tmp_path / "eval"
    evals.mkdir()
    for run, em in ((one, 0.25), (two, 0.75)):
        (evals / f"{model_slug(str(run / 'final'))}.json").write_text(json.dumps(
            {"model": "final", "model_path": model_path(str(run / "final")), "tasks": {"arithmetic": {"em": em}}}))
    built = build([one, two], [evals])
    assert [r.evals["arithmetic"]["em"] for r in built[:2]] == [0.25, 0.75] and len(built) == 2
    # An older result (no model_path) whose path's tail fits both runs is refused, not guessed.
    (evals / "old.json").write_text(json.dumps({"model": "runs/sft/final", "tasks": {"arithmetic": {"em": 0.5}}}))
    with pytest.raises(DogeError, match="could be .*exp1.* or .*exp2"):
        build([one, two], [evals])


@pytest.mark.parametrize("what, damage", [
    ("marker", lambda run, evals: (run / "doge_run.json").write_text("[1, 2]")),
    ("config", lambda run, evals: (run / "config.yaml").write_text("- a list\n")),
    ("metrics", lambda run, evals: (run / "metrics.jsonl").write_text('{"step": 1}\n[3]\n')),
    ("eval tasks", lambda run, evals: (evals / "pt.json").write_text(json.dumps({"model": "x", "tasks": [1]}))),
    ("eval metrics", lambda run, evals: (evals / "pt.json").write_text(json.dumps({"model": "x", "tasks": {"a": 1}}))),
])
def test_valid_json_of_the_wrong_shape_is_one_line_not_a_traceback(pipeline, capsys, what, damage):
    root, runs, evals = pipeline
    damage(runs[0], evals)
    code, _, err = run_doge(capsys, "report", *map(str, runs), "--eval", str(evals), "--out", str(root / "r.md"))
    assert code == 2 and "Traceback" not in err, err[-2000:]
    assert err.strip().startswith("doge: error: ") and len(err.strip().splitlines()) == 1, err
    assert not (root / "r.md").exists()


def test_the_html_page_shows_markup_from_runs_and_evals_as_text(pipeline):
    """Names and values come from files anyone can edit (a run's environment, an eval's model and tasks): on
    the page they are text, never markup (parsed back: no element but the report's own)."""
    from html.parser import HTMLParser

    root, runs, evals = pipeline
    for run in runs[:2]:  # the page shows the environment of the last run
        marker = json.loads((run / "doge_run.json").read_text())
        marker["environment"]["hardware"] = "<script>alert('hw')</script> & co"
        (run / "doge_run.json").write_text(json.dumps(marker))
    (evals / "odd.json").write_text(json.dumps({"model": "<img src=x onerror=alert(1)>", "tasks": {
        "<b>task</b>": {"<i>metric</i>": 0.5}}}))
    write_report(runs, root / "report.md", eval_paths=[evals], as_html=True)
    page = (root / "report.html").read_text()
    tags: list[str] = []

    class Tags(HTMLParser):
        def handle_starttag(self, tag, attrs):
            tags.append(tag)

    Tags().feed(page)
    assert not {"script", "b", "i"} & set(tags) and tags.count("img") == 1  # only the loss-curve image
    text = page.replace("&#x27;", "'")
    for shown in ("&lt;script&gt;alert('hw')&lt;/script&gt; &amp; co", "&lt;b&gt;task&lt;/b&gt;",
                  "&lt;i&gt;metric&lt;/i&gt;"):
        assert shown in text, shown


def test_in_training_task_figures_get_a_curve_each_and_their_last_value(pipeline, capsys):
    """logging.eval_tasks logs eval/<task>/<metric> at some steps: one panel per metric, a line per run that
    logged it, and the last value in the stages table."""
    root, runs, evals = pipeline
    for run, figures in ((runs[0], {10: 0.0, 30: 0.5}), (runs[1], {10: 0.25})):
        logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        for record in logged:
            if record["step"] in figures:
                record.update({"eval/arithmetic/em": figures[record["step"]], "eval_tasks_s": 1.5})
                if run == runs[0]:
                    record["eval/heldout-ppl/bits_per_byte"] = 3.0 - record["step"] / 100
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in logged))
    out = root / "report.md"
    code, stdout, err = run_doge(capsys, "report", *map(str, runs), "--out", str(out), "--html")
    assert code == 0, err
    curves = root / "report_eval_tasks.png"
    assert f"wrote {curves}" in stdout and curves.read_bytes()[:4] == b"\x89PNG"
    text = out.read_text()
    assert "## Evaluation during training" in text and "![in-training evaluation](report_eval_tasks.png)" in text
    stages = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
              for line in text.split("## Stages")[1].split("## Evaluation")[0].splitlines() if line.startswith("| ")}
    assert stages["in-training arithmetic em (last)"] == ["0.5", "0.25", "—"]
    assert stages["in-training heldout-ppl bits_per_byte (last)"] == ["2.7", "—", "—"]
    assert (root / "report.html").read_text().count("data:image/png;base64,") == 2
    assert not plot_eval_tasks(build(runs, [])[2:], root / "none.png") and not (root / "none.png").exists()
