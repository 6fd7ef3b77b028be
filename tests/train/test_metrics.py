"""Metrics: the console line, metrics.jsonl on resume, the loss-curve picture."""

import json

from doge_cli.train.metrics import MetricsLogger, format_line, plot_loss_curve


def test_console_line_shows_the_figures_worth_a_glance():
    line = format_line({"step": 3, "loss": 2.5, "lr": 1e-3, "tokens_per_s": 12345.6, "reward": 0.25,
                        "sample": "text is not shown"})
    assert line == "loss 2.5000 lr 1.00e-03 tokens_per_s 12,346 reward 0.25"


def test_resume_drops_lines_after_the_checkpoint(tmp_path, capsys):
    log = MetricsLogger(tmp_path, enabled=True, tensorboard=False, total_steps=6)
    for step in range(1, 7):
        log.log({"step": step, "loss": float(step)})
    log.close()
    MetricsLogger(tmp_path, enabled=True, tensorboard=False, total_steps=6, resume_step=4).close()
    assert [json.loads(ln)["step"] for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    MetricsLogger(tmp_path, enabled=True, tensorboard=False, total_steps=6).close()  # a fresh start
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_process_that_is_not_the_main_one_writes_nothing(tmp_path):
    log = MetricsLogger(tmp_path / "run", enabled=False, tensorboard=False, total_steps=2)
    log.log({"step": 1, "loss": 1.0})
    assert not (tmp_path / "run").exists()


def test_loss_curve_is_a_png_written_whole(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "loss": 3.0 / s}) + "\n" for s in range(1, 6)))
    out = plot_loss_curve(metrics, tmp_path / "loss.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "metrics.jsonl"]
    assert plot_loss_curve(tmp_path / "none.jsonl", tmp_path / "x.png") is None
