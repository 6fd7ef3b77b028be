"""optim.name muon: which tensor gets Muon and which AdamW, the combined step against torch's own two
optimizers, its state through a checkpoint, exact resume of a training run, DDP against one process,
and the launchers it refuses."""

from __future__ import annotations

import copy
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from doge_cli.config.schema import OptimConfig
from doge_cli.errors import DogeError
from doge_cli.model import DogeForCausalLM
from doge_cli.train.optim import MuonAdamW, build_optimizer, check_launcher, parameter_groups
from tests.model.doge_twin import tiny_config

from .conftest import ROOT, launch_train, tiny_overrides

MUON = OptimConfig(name="muon", lr=3e-3, muon_lr=0.02, weight_decay=0.1)


def model(seed=0, **config):
    torch.manual_seed(seed)
    return DogeForCausalLM(tiny_config(**config), attn_implementation="eager")


def expected_kind(name: str, param) -> str:
    """The documented split (doge_cli/train/optim.py), written out independently."""
    muon = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "gate_proj.weight",
            "up_proj.weight", "down_proj.weight")
    if name.startswith("model.layers.") and name.endswith(muon):
        return "muon"
    if param.ndim < 2 or name.endswith(".A") or "residual" in name or "norm" in name:
        return "no_decay"
    return "decay"


@pytest.mark.parametrize("config", [dict(), dict(tie_word_embeddings=True, attention_bias=True),
                                    dict(is_moe=True, num_experts=16, num_experts_per_tok=4)],
                         ids=["dense", "tied-bias", "moe"])
def test_every_parameter_is_in_exactly_the_documented_group(config):
    m = model(**config)
    groups = parameter_groups(m, muon=True)
    seen = [id(p) for kind in groups for _, p in groups[kind]]
    assert len(seen) == len(set(seen)) == len([p for p in m.parameters() if p.requires_grad])
    for kind, members in groups.items():
        for name, param in members:
            assert expected_kind(name, param) == kind, (name, kind)
    names = {kind: {n for n, _ in members} for kind, members in groups.items()}
    # What stays on AdamW: embeddings, the head, the dynamic mask, the router and expert tables.
    adamw = names["decay"] | names["no_decay"]
    assert "model.embed_tokens.weight" in adamw
    assert any(n.endswith("dt_proj.weight") for n in adamw) and any(n.endswith(".A") for n in adamw)
    assert not any("dt_proj" in n or "embed" in n or "lm_head" in n or "router" in n for n in names["muon"])
    if config.get("is_moe"):
        assert any("router_gate" in n for n in adamw) and any("down_embed" in n for n in adamw)
    if not config.get("tie_word_embeddings"):
        assert "lm_head.weight" in names["decay"]
    assert all(p.ndim == 2 for _, p in groups["muon"])
    # AdamW alone keeps the same decay split, with the Muon matrices decayed.
    plain = parameter_groups(m, muon=False)
    assert not plain["muon"] and {n for n, _ in plain["no_decay"]} == names["no_decay"]


def steps_by_torch(m, optim, lrs, batches):
    """The oracle: torch.optim.Muon and torch.optim.AdamW, each on its own tensors."""
    groups = parameter_groups(m, muon=True)
    muon = torch.optim.Muon([p for _, p in groups["muon"]], lr=optim.muon_lr, weight_decay=optim.weight_decay,
                            momentum=optim.muon_momentum, nesterov=True, ns_steps=5, adjust_lr_fn="original")
    adamw = torch.optim.AdamW([{"params": [p for _, p in groups["decay"]], "weight_decay": optim.weight_decay},
                               {"params": [p for _, p in groups["no_decay"]], "weight_decay": 0.0}],
                              lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps)
    for mult, batch in zip(lrs, batches):
        for group in muon.param_groups:
            group["lr"] = optim.muon_lr * mult
        for group in adamw.param_groups:
            group["lr"] = optim.lr * mult
        m(batch, labels=batch).loss.backward()
        muon.step()
        adamw.step()
        muon.zero_grad()
        adamw.zero_grad()


def steps_by_doge(m, opt, peaks, lrs, batches):
    for mult, batch in zip(lrs, batches):
        for group, peak in zip(opt.param_groups, peaks):
            group["lr"] = peak * mult
        m(batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_one_muon_adamw_step_is_torchs_muon_plus_torchs_adamw():
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(3, 128, (2, 16), generator=gen) for _ in range(4)]
    lrs = [0.25, 1.0, 0.5, 0.1]
    ours, oracle = model(is_moe=True, num_experts=16, num_experts_per_tok=4), None
    oracle = copy.deepcopy(ours)
    opt = build_optimizer(ours, MUON, device_type="cpu")
    assert isinstance(opt, MuonAdamW)
    peaks = [g["peak_lr"] for g in opt.param_groups]
    assert sorted(set(peaks)) == [MUON.lr, MUON.muon_lr]
    assert opt.muon.ns_dtype == torch.float32  # on a CPU; torch's Muon (and doge on a GPU) iterates in bf16:
    opt.muon.ns_dtype = torch.bfloat16
    steps_by_doge(ours, opt, peaks, lrs, batches)
    steps_by_torch(oracle, MUON, lrs, batches)
    a, b = dict(ours.named_parameters()), dict(oracle.named_parameters())
    start = dict(model(is_moe=True, num_experts=16, num_experts_per_tok=4).named_parameters())
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # and every tensor moved (the router and expert tables included)
    assert all(not torch.equal(a[n], start[n]) for n in a if "A" != n.rsplit(".", 1)[-1]), \
        [n for n in a if torch.equal(a[n], start[n])]


def test_state_through_a_checkpoint_continues_exactly():
    gen = torch.Generator().manual_seed(2)
    batches = [torch.randint(3, 128, (2, 16), generator=gen) for _ in range(5)]
    lrs = [0.5, 1.0, 1.0, 0.7, 0.2]
    straight = model()
    opt = build_optimizer(straight, MUON, device_type="cpu")
    peaks = [g["peak_lr"] for g in opt.param_groups]
    steps_by_doge(straight, opt, peaks, lrs, batches)

    first = model()
    opt1 = build_optimizer(first, MUON, device_type="cpu")
    steps_by_doge(first, opt1, peaks, lrs[:3], batches[:3])
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": opt1.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # what a checkpoint's optimizer.pt must allow
    second = model(seed=5)
    second.load_state_dict(saved["model"])
    opt2 = build_optimizer(second, MUON, device_type="cpu")
    opt2.load_state_dict(saved["optimizer"])
    assert len(opt2.muon.state) == len(opt1.muon.state) > 0
    steps_by_doge(second, opt2, peaks, lrs[3:], batches[3:])
    for (name, a), b in zip(straight.named_parameters(), second.parameters()):
        assert torch.equal(a, b), name


def test_an_adamw_state_is_not_taken_for_a_muon_one():
    m = model()
    adamw = build_optimizer(m, OptimConfig(), device_type="cpu")
    muon = build_optimizer(m, MUON, device_type="cpu")
    with pytest.raises(ValueError, match="not Muon"):
        muon.load_state_dict(adamw.state_dict())


def test_deepspeed_and_fsdp_are_refused():
    from accelerate.utils import DistributedType

    for kind, said in ((DistributedType.DEEPSPEED, "DeepSpeed"), (DistributedType.FSDP, "FSDP")):
        with pytest.raises(DogeError, match=f"optim.name muon needs every weight matrix whole.*{said}"):
            check_launcher(kind)
    check_launcher(DistributedType.MULTI_CPU)
    check_launcher(DistributedType.NO)


def run_pt(pt_data, out, steps, **extra):
    from doge_cli.config import resolve_config
    from doge_cli.train.core import train
    from doge_cli.train.objectives import objective_for

    over = tiny_overrides(pt_data, out, steps=steps, **{"optim.name": "muon", **extra})
    cfg = resolve_config("pt", hardware="cpu", overrides=over)
    return train(cfg, objective_for(cfg))


def records(run_dir):
    return [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_muon_pretraining_learns_and_logs_both_rates(pt_data, tmp_path, capsys):
    run_pt(pt_data, tmp_path / "run", steps=30)
    logged = records(tmp_path / "run")
    curve = [r["loss"] for r in logged]
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 0.5
    assert all("muon_lr" in r for r in logged)
    peak = max(r["muon_lr"] for r in logged)
    assert peak == pytest.approx(0.02) and max(r["lr"] for r in logged) == pytest.approx(3e-3)
    said = capsys.readouterr().out
    assert "optimizer Muon on 14 hidden matrices" in said and "at muon_lr 0.02, AdamW on the other" in said


ENV = {**os.environ, "DOGE_PLAIN_LOGS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def test_two_ddp_processes_match_one_with_muon(pt_data, tmp_path):
    settings = {"runtime.micro_batch_size": 1, "optim.name": "muon", "optim.max_grad_norm": 0.05}
    one = launch_train("pt", tiny_overrides(pt_data, tmp_path / "one", steps=4, **settings), tmp_path / "one")[1]
    stdout, two = launch_train("pt", tiny_overrides(pt_data, tmp_path / "two", steps=4, **settings),
                               tmp_path / "two", "ddp_cpu.yaml")
    assert "x 2 processes" in stdout and "optimizer Muon" in stdout
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-4)
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    for key in a:
        # Newton-Schulz runs in bf16: two processes' reduced gradients differ in the last bits
        assert torch.allclose(a[key], b[key], rtol=1e-2, atol=1e-3), key


def test_muon_under_zero2_is_refused_before_anything_is_written(pt_data, tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "doge_cli", "train", "pt", "--hardware", "cpu",
            *tiny_overrides(pt_data, out, steps=2, **{"optim.name": "muon"}),
            "--accelerate-config", str(ROOT / "configs" / "accelerate" / "zero2.yaml")]
    result = subprocess.run(args, env=ENV, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "optim.name muon needs every weight matrix whole on each process, which DeepSpeed" in result.stderr
    assert not out.exists()


def test_the_newton_schulz_iteration_is_torchs_in_bf16_and_float32_on_a_cpu():
    """bf16: bit for bit torch.optim.Muon's own iteration; float32 (what a CPU run uses: bf16 products are
    emulated on CPUs without AVX512-BF16/AMX, ~9x slower at the 1M shape) follows the float64 iteration
    closely, and it orthogonalises: of singular values spread over >100x, the bulk is pulled to ~1, none past 1.3."""
    from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, EPS, _zeropower_via_newtonschulz

    from doge_cli.train.optim import newton_schulz

    coefficients = (DEFAULT_A, DEFAULT_B, DEFAULT_C)
    gen = torch.Generator().manual_seed(4)
    for shape in ((24, 40), (40, 24), (32, 32)):
        g = torch.randn(*shape, generator=gen) * torch.logspace(-2, 1, shape[1])  # column scales 0.01 .. 10
        assert torch.equal(newton_schulz(g, coefficients, 5, EPS, torch.bfloat16),
                           _zeropower_via_newtonschulz(g, coefficients, 5, EPS))
        single = newton_schulz(g, coefficients, 5, EPS, torch.float32)
        double = newton_schulz(g.double(), coefficients, 5, EPS, torch.float64)
        assert single.dtype == torch.float32 and single.shape == g.shape
        assert torch.allclose(single.double(), double, atol=1e-5, rtol=0)
        spread = torch.linalg.svdvals(g)
        assert spread.max() / spread.min() > 100
        s = torch.linalg.svdvals(single)
        assert s.max() < 1.3 and 0.6 < s.median() < 1.3, s  # the bulk pulled to ~1 from a >100x spread


def test_muon_on_a_cpu_steps_in_float32_and_on_a_gpu_in_bf16():
    m = model()
    assert build_optimizer(m, MUON, device_type="cpu").muon.ns_dtype == torch.float32
    assert build_optimizer(m, MUON.model_copy(update={"fused": False}), device_type="cuda").muon.ns_dtype == \
        torch.bfloat16
