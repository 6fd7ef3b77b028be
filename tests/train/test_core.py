"""The training core on a tiny model: learning, exact resume, accumulation invariance, export."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from doge_cli.config import resolve_config
from doge_cli.errors import DogeError
from doge_cli.train.core import train
from doge_cli.train.objectives import objective_for

from .conftest import tiny_overrides

ENV = {**os.environ, "DOGE_PLAIN_LOGS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run(pt_data, out, steps=20, resume=None, overwrite=False, stop_after=None, **extra):
    cfg = resolve_config("pt", hardware="cpu", overrides=tiny_overrides(pt_data, out, steps=steps, **extra))
    return train(cfg, objective_for(cfg), resume=resume, overwrite=overwrite, stop_after=stop_after)


def losses(run_dir):
    return [json.loads(ln)["loss"] for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def weights(folder):
    return load_file(str(Path(folder) / "model.safetensors"))


def test_loss_falls_and_final_loads_in_transformers(pt_data, tmp_path):
    result = run(pt_data, tmp_path / "run", steps=30, **{"logging.eval_every": 10})
    curve = losses(tmp_path / "run")
    assert len(curve) == 30
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 0.5
    assert result.eval_loss is not None and result.eval_loss < curve[0]
    assert (tmp_path / "run" / "loss_curve.png").stat().st_size > 1000

    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    final = result.final_dir
    hf = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    gen = GenerationConfig.from_pretrained(final)
    assert type(hf).__name__ == "DogeForCausalLM" and hf.config.vocab_size == len(tok)
    assert tok.eos_token_id in ([gen.eos_token_id] if isinstance(gen.eos_token_id, int) else gen.eos_token_id)
    ids = tok("The", return_tensors="pt").input_ids
    out = hf.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5 or tok.eos_token_id in out[0].tolist()


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_equals_straight_run(pt_any, tmp_path, optimizer):
    run(pt_any, tmp_path / "straight", steps=20, **{"optim.name": optimizer})
    part = run(pt_any, tmp_path / "resumed", steps=20, stop_after=10, **{"checkpoint.every": 5, "optim.name": optimizer})
    assert part.final_dir is None and part.steps == 10
    done = run(pt_any, tmp_path / "resumed", steps=20, resume="auto", **{"checkpoint.every": 5, "optim.name": optimizer})
    assert done.steps == 20
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")
    a, b = weights(tmp_path / "straight" / "final"), weights(tmp_path / "resumed" / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_accumulation_invariance(pt_data, tmp_path):
    one = run(pt_data, tmp_path / "m1", steps=3, **{"train.global_batch_size": 8, "runtime.micro_batch_size": 1})
    eight = run(pt_data, tmp_path / "m8", steps=3, **{"train.global_batch_size": 8, "runtime.micro_batch_size": 8})
    la, lb = losses(tmp_path / "m1"), losses(tmp_path / "m8")
    assert la == pytest.approx(lb, rel=1e-5)
    a, b = weights(one.final_dir), weights(eight.final_dir)
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-6), key


def test_sigkill_then_resume_auto_matches(pt_any, tmp_path):
    """Kill -9 a real `doge train pt` mid-run (possibly mid-checkpoint), then --resume auto."""
    sigkill_then_resume(pt_any, tmp_path)


def test_sigkill_then_resume_auto_matches_with_muon(pt_data, tmp_path):
    sigkill_then_resume(pt_data, tmp_path, **{"optim.name": "muon"})


def sigkill_then_resume(pt_any, tmp_path, **extra):
    straight = run(pt_any, tmp_path / "straight", steps=16, **extra)
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "doge_cli", "train", "pt", "--hardware", "cpu",
            *tiny_overrides(pt_any, out, steps=16, **{"checkpoint.every": 2, **extra})]
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "checkpoints" / "step-000006").exists():
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # a half-written checkpoint must be invisible to --resume auto
    (out / "checkpoints" / ".tmp-step-000099").mkdir(parents=True, exist_ok=True)
    result = subprocess.run([*args, "--resume", "auto"], env=ENV, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resumed from" in result.stdout
    a, b = weights(straight.final_dir), weights(out / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "straight") == losses(out)


def test_keep_last_checkpoints(pt_data, tmp_path):
    run(pt_data, tmp_path / "run", steps=8, stop_after=8, **{"checkpoint.every": 2, "checkpoint.keep_last": 2})
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["step-000006", "step-000008"]


def test_output_dir_guards(pt_data, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    for overwrite in (False, True):  # never replaced, even with --overwrite
        with pytest.raises(DogeError, match="not a doge run.*never replaces"):
            run(pt_data, foreign, steps=2, overwrite=overwrite)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    run(pt_data, tmp_path / "again", steps=2)
    with pytest.raises(DogeError, match="--resume auto"):
        run(pt_data, tmp_path / "again", steps=2)
    run(pt_data, tmp_path / "again", steps=2, overwrite=True)  # an earlier doge run is replaced
    assert (tmp_path / "again" / "final").is_dir()
    # ... unless the user put something of theirs in it: notes, an edited model card, an eval folder
    for placed in ("NOTES.md", "final/README.md", "eval_results/final.json", "checkpoints/mine.txt"):
        (tmp_path / "again" / placed).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "again" / placed).write_text("mine")
        with pytest.raises(DogeError, match=f"holds {placed.split('/')[0] if placed.startswith('eval') else placed}, "
                                            "which doge did not write there"):
            run(pt_data, tmp_path / "again", steps=2, overwrite=True)
        assert (tmp_path / "again" / placed).read_text() == "mine"
        (tmp_path / "again" / placed).unlink()
        if placed.startswith("eval_results"):
            (tmp_path / "again" / "eval_results").rmdir()


def test_a_failed_start_writes_nothing(pt_data, tmp_path):
    """Bad data, a bad start model or an unusable backend are found before the run folder exists, so
    the corrected command is not refused as an 'earlier run'."""
    out = tmp_path / "run"
    with pytest.raises(DogeError, match="doge data"):
        run(tmp_path / "no-data", out, steps=2)
    with pytest.raises(DogeError, match="does not exist"):
        run(pt_data, out, steps=2, init_from=str(tmp_path / "no-model"))
    with pytest.raises(DogeError, match="'triton' cannot run on cpu"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("TRITON_INTERPRET", "0")
            run(pt_data, out, steps=2, **{"runtime.attn_implementation": "triton"})
    assert not out.exists()
    run(pt_data, out, steps=2)


def test_logged_losses_after_resume_equal_a_straight_run_whatever_the_intervals(pt_data, tmp_path):
    """checkpoint.every (2) is not a multiple of log_every (3), and the run stops between two logging
    steps: the unlogged sums travel in the checkpoint, so the resumed log is the straight one."""
    extra = {"logging.log_every": 3, "checkpoint.every": 2}
    run(pt_data, tmp_path / "straight", steps=12, **extra)
    run(pt_data, tmp_path / "resumed", steps=12, stop_after=5, **extra)
    assert max(json.loads(ln)["step"] for ln in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()) == 3
    run(pt_data, tmp_path / "resumed", steps=12, resume="auto", **extra)
    records = [json.loads(ln) for ln in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 6, 9, 12]
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")
    a, b = weights(tmp_path / "straight" / "final"), weights(tmp_path / "resumed" / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("piece, damage, named", [
    ("model.safetensors", _truncate, "model.safetensors"),
    ("optimizer.pt", _truncate, "optimizer.pt"),
    ("rank-00000.pt", lambda p: p.write_bytes(b""), "rank-00000.pt"),
    ("state.json", lambda p: p.write_text("{"), "state.json"),
    ("model.safetensors", lambda p: p.unlink(), "lacks model.safetensors"),
])
def test_resume_auto_passes_over_a_broken_checkpoint(pt_data, tmp_path, capsys, piece, damage, named):
    extra = {"checkpoint.every": 2}
    run(pt_data, tmp_path / "straight", steps=8, **extra)
    out = tmp_path / "run"
    run(pt_data, out, steps=8, stop_after=6, **extra)
    damage(out / "checkpoints" / "step-000006" / piece)
    with pytest.raises(DogeError, match=f"step-000006.*{named}"):  # named, when asked for by path
        run(pt_data, out, steps=8, resume=str(out / "checkpoints" / "step-000006"), **extra)
    capsys.readouterr()
    result = run(pt_data, out, steps=8, resume="auto", **extra)
    said = capsys.readouterr().out
    assert "passing over step-000006" in said and named in said and "resumed from" in said and "step-000004" in said
    assert result.steps == 8
    a, b = weights(tmp_path / "straight" / "final"), weights(out / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _zero_page(path):
    data = bytearray(path.read_bytes())
    at = (len(data) // 2) // 4096 * 4096
    data[at:at + 4096] = bytes(len(data[at:at + 4096]))
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_flip_byte, _zero_page], ids=["one-flipped-byte", "a-zeroed-4k-page"])
def test_silent_damage_to_any_checkpoint_file_is_found_by_its_checksum(pt_data, tmp_path, capsys, damage):
    """A flipped byte or a zeroed page (what a power loss or a bad disk leaves) would still load; the
    checksums recorded at save time find it in every file, and --resume auto falls back past it."""
    extra = {"checkpoint.every": 2}
    run(pt_data, tmp_path / "straight", steps=6, **extra)
    out = tmp_path / "run"
    run(pt_data, out, steps=6, stop_after=4, **extra)
    newest = out / "checkpoints" / "step-000004"
    state = json.loads((newest / "state.json").read_text())
    names = sorted(state["files"])
    assert set(names) == {p.name for p in newest.iterdir()} - {"state.json"}
    for name in names:
        saved = (newest / name).read_bytes()
        damage(newest / name)
        if (newest / name).read_bytes() == saved:  # a page of zeros in a file of zeros there
            continue
        with pytest.raises(DogeError, match=f"step-000004: {name} does not match the checksum"):
            run(pt_data, out, steps=6, resume=str(newest), **extra)
        (newest / name).write_bytes(saved)
    damage(newest / "model.safetensors")
    capsys.readouterr()
    run(pt_data, out, steps=6, resume="auto", **extra)
    said = capsys.readouterr().out
    assert "passing over step-000004" in said and "checksum" in said and "step-000002" in said
    a, b = weights(tmp_path / "straight" / "final"), weights(out / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_auto_with_only_broken_checkpoints_is_one_error(pt_data, tmp_path):
    out = tmp_path / "run"
    run(pt_data, out, steps=8, stop_after=2, **{"checkpoint.every": 2})
    _truncate(out / "checkpoints" / "step-000002" / "model.safetensors")
    with pytest.raises(DogeError, match="no checkpoint .* can be resumed .*--overwrite"):
        run(pt_data, out, steps=8, resume="auto", **{"checkpoint.every": 2})


def test_compiled_model_exports_and_checkpoints_its_trained_weights(pt_data, tmp_path, monkeypatch):
    """runtime.compile=true: the compile wrapper must not rename (and so drop) the trained weights."""
    import functools

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))  # fast, same wrapper
    plain = run(pt_data, tmp_path / "plain", steps=3, **{"checkpoint.every": 3})
    compiled = run(pt_data, tmp_path / "compiled", steps=3, **{"checkpoint.every": 3, "runtime.compile": True})
    a, b = weights(plain.final_dir), weights(compiled.final_dir)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-6), key
    saved = weights(tmp_path / "compiled" / "checkpoints" / "step-000003")
    assert not any("_orig_mod" in k for k in saved)


def test_background_workers_build_the_same_batches(pt_any, tmp_path):
    run(pt_any, tmp_path / "sync", steps=6)
    run(pt_any, tmp_path / "workers", steps=6, **{"runtime.dataloader_workers": 2})
    assert losses(tmp_path / "sync") == losses(tmp_path / "workers")
    a, b = weights(tmp_path / "sync" / "final"), weights(tmp_path / "workers" / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_samples_are_logged_every_sample_every_steps(pt_data, tmp_path):
    run(pt_data, tmp_path / "run", steps=4, **{"logging.sample_every": 2, "logging.sample_prompt": "The"})
    records = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    sampled = [r["step"] for r in records if "sample" in r]
    assert sampled == [2, 4] and all(isinstance(r["sample"], str) and r["sample"] for r in records if "sample" in r)


def test_start_models_are_trained_in_fp32_whatever_their_dtype(pt_data, tmp_path):
    from doge_cli.model import DogeForCausalLM, save_pretrained
    from doge_cli.train.objectives.pt import PretrainObjective

    cfg = resolve_config("pt", hardware="cpu", overrides=tiny_overrides(pt_data, tmp_path / "run", steps=2))
    obj = PretrainObjective(cfg)
    obj.setup()
    fresh = obj.build_model()
    save_pretrained(fresh.to(torch.bfloat16), tmp_path / "bf16", tokenizer=obj.tokenizer)
    cfg.init_from = str(tmp_path / "bf16")
    assert {p.dtype for p in obj.build_model().parameters()} == {torch.float32}
    del DogeForCausalLM


def test_resume_with_changed_config_is_refused(pt_data, tmp_path):
    run(pt_data, tmp_path / "run", steps=10, stop_after=4, **{"checkpoint.every": 2})
    with pytest.raises(DogeError, match="config changed.*optim.lr"):
        run(pt_data, tmp_path / "run", steps=10, resume="auto", **{"checkpoint.every": 2, "optim.lr": 1e-2})


def test_missing_dataset_names_the_data_command(tmp_path):
    with pytest.raises(DogeError, match="doge data"):
        run(tmp_path / "nothing", tmp_path / "run", steps=2)


def test_divergence_stops_with_a_message(pt_data, tmp_path):
    with pytest.raises(DogeError, match="NaN or infinite"):
        run(pt_data, tmp_path / "run", steps=6, **{"optim.lr": 1e30, "optim.max_grad_norm": 0})


def test_init_from_with_a_smaller_vocabulary_is_refused(pt_data, tmp_path):
    from transformers import DogeConfig

    from doge_cli.model import DogeForCausalLM, save_pretrained

    small = DogeConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, router_aux_loss_coef=0.0)
    save_pretrained(DogeForCausalLM(small, attn_implementation="eager"), tmp_path / "small")
    with pytest.raises(DogeError, match="vocabulary of 100"):
        run(pt_data, tmp_path / "run", steps=2, init_from=str(tmp_path / "small"))


def test_a_cpu_run_logs_no_deepspeed_accelerator_warning(pt_data, tmp_path):
    """DeepSpeed's "Setting accelerator to CPU ..." came once per training command (7 times in a demo)."""
    env = {k: v for k, v in ENV.items() if k != "DS_ACCELERATOR"}
    args = [sys.executable, "-m", "doge_cli", "train", "pt", "--hardware", "cpu",
            *tiny_overrides(pt_data, tmp_path / "run", steps=2)]
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Setting accelerator" not in result.stdout + result.stderr


def test_throughput_leaves_out_evaluation_sampling_and_checkpoints(pt_data, tmp_path, monkeypatch):
    """A fake clock: every training step takes 1 s, every evaluation 50 s, every sample 20 s and every
    checkpoint 100 s. Tokens/s must be the steps' (tokens over 1 s a step), wall time everything."""
    import types

    from doge_cli.train import core

    clock = [0.0]
    monkeypatch.setattr(core, "time", types.SimpleNamespace(perf_counter=lambda: clock[0], time=time.time,
                                                             sleep=time.sleep, strftime=time.strftime))

    def slow(method, seconds):
        def wrapped(self, *args, **kwargs):
            clock[0] += seconds
            return method(self, *args, **kwargs)
        return wrapped

    monkeypatch.setattr(core.Loop, "train_step", slow(core.Loop.train_step, 1.0))
    monkeypatch.setattr(core.Loop, "evaluate", slow(core.Loop.evaluate, 50.0))
    monkeypatch.setattr(core.Loop, "sample", slow(core.Loop.sample, 20.0))
    monkeypatch.setattr(core.Loop, "_save", slow(core.Loop._save, 100.0))
    run(pt_data, tmp_path / "run", steps=6, **{"logging.log_every": 2, "logging.eval_every": 2,
                                                 "logging.sample_every": 4, "checkpoint.every": 3})
    records = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        assert r["train_s"] == pytest.approx(2.0)  # two steps a window
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / 2.0)
    # Wall time keeps the rest: up to the last record, 6 steps, the evaluations after steps 2 and 4, the sample
    # after step 4 and the checkpoint of step 3 (step 6's evaluation and checkpoint come after its record).
    assert [r["time_s"] for r in records] == pytest.approx([2.0, 2 + 50 + 100, 2 + 50 + 20])
