"""The optimizers ``optim.name`` picks: AdamW, or Muon for the hidden matrices with AdamW for the rest.

Which tensor gets what (``optim.name: muon``):

- **Muon** (orthogonalised momentum: ``torch.optim.Muon``'s algorithm and state, with its Newton-Schulz
  iteration in float32 on a CPU, see :class:`Muon`): the hidden weight matrices of every block,
  the attention projections ``q_proj``/``k_proj``/``v_proj``/``o_proj`` and the MLP's
  ``gate_proj``/``up_proj``/``down_proj`` (the shared dense path of a CDMoE block too). These are the
  matrices that map hidden features to hidden features, where an update with equal singular values is
  what Muon is for.
- **AdamW**, at ``optim.lr``:
  - ``embed_tokens`` and ``lm_head`` (tied or not): a lookup table and the classifier see very uneven
    per-row gradients; the field (modded-nanogpt, nanochat, Moonlight) keeps both on Adam.
  - the dynamic-mask parameters ``dt_proj`` (a thin hidden→heads matrix whose output is a gate, not a
    hidden feature) and ``A``; the MoE ``router_gate`` (a router: its scores' scale matters, which
    orthogonalisation would flatten); the expert embeddings ``down_embed``/``up_embed`` (lookup tables,
    only the chosen rows get gradient);
  - every vector: norms, residual weights, biases.
- Weight decay (decoupled, ``optim.weight_decay``) applies to the Muon matrices and to AdamW's
  matrices (the embeddings, the head, ``dt_proj``, ``router_gate``, the expert tables), never to norms,
  residual weights, biases or ``A``: the same split as ``optim.name: adamw``.

One optimizer object holds both parts so that accelerate wraps it as usual (gradient accumulation
skips its steps, a GradScaler unscales all its groups) and a checkpoint's ``optimizer.pt`` holds both
states. Muon needs each matrix whole on each process: one process and DDP (which all-reduce the
gradient before the step) are right; DeepSpeed and FSDP shard or flatten tensors and are refused
(:func:`check_launcher`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from doge_cli.errors import DogeError

MUON_MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Linear layers inside the blocks whose weight Muon updates."""


def is_muon_matrix(name: str, param: torch.Tensor) -> bool:
    """Whether Muon updates this parameter (see the module docstring)."""
    parts = name.split(".")
    return (param.ndim == 2 and len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in MUON_MATRICES
            and "layers" in parts)


def _no_decay(name: str, param: torch.Tensor) -> bool:
    return param.ndim < 2 or name.endswith(".A") or "residual" in name or "norm" in name


def parameter_groups(model: torch.nn.Module, *, muon: bool) -> dict[str, list[tuple[str, Any]]]:
    """The trainable parameters by group, as ``(name, parameter)`` pairs: ``muon`` (empty unless ``muon``),
    ``decay`` and ``no_decay`` (AdamW). Every trainable parameter is in exactly one group."""
    groups: dict[str, list[tuple[str, Any]]] = {"muon": [], "decay": [], "no_decay": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if muon and is_muon_matrix(name, param):
            groups["muon"].append((name, param))
        elif _no_decay(name, param):
            groups["no_decay"].append((name, param))
        else:
            groups["decay"].append((name, param))
    return groups


def newton_schulz(update: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """Muon's orthogonalisation of a 2-D ``update``: ``steps`` quintic Newton-Schulz iterations with
    ``coefficients`` (a, b, c), computed in ``dtype``; the same iteration as ``torch.optim.Muon``'s, which
    always computes in bfloat16 (bit for bit the same there; tested)."""
    x = update.to(dtype)
    wide = x.size(0) <= x.size(1)
    if not wide:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    a, b, c = coefficients
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x if wide else x.T


def _adjusted_lr(lr: float, rule: str | None, shape: torch.Size) -> float:
    """``torch.optim.Muon``'s per-matrix rate: sqrt(max(1, rows/cols)) ("original") or 0.2 sqrt(max(rows, cols))."""
    rows, cols = shape[:2]
    if rule == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr * math.sqrt(max(1, rows / cols))


class Muon(torch.optim.Muon):
    """``torch.optim.Muon`` (its settings, checks and state: a ``momentum_buffer`` per matrix) with the
    Newton-Schulz iteration in ``ns_dtype``. torch computes it in bfloat16, right on a GPU; on a CPU
    without native bfloat16 (AVX2 machines: no AVX512-BF16 or AMX) bfloat16 matrix products are emulated,
    and at the quickstart's 1M-parameter shape that made the iteration 760 ms of a 1.8 s training step on a
    2-core AMD EPYC against 85 ms in float32. doge passes float32 on a CPU, bfloat16 elsewhere."""

    def __init__(self, params, *, ns_dtype: torch.dtype = torch.bfloat16, **settings):
        super().__init__(params, **settings)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, buffers = [], [], []
            self._init_group(group, params, grads, buffers)
            lr, decay, momentum = float(group["lr"]), group["weight_decay"], group["momentum"]
            for param, grad, buffer in zip(params, grads, buffers):
                buffer.lerp_(grad, 1 - momentum)
                update = grad.lerp(buffer, momentum) if group["nesterov"] else buffer
                update = newton_schulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"],
                                       self.ns_dtype)
                param.mul_(1 - lr * decay)
                param.add_(update, alpha=-_adjusted_lr(lr, group["adjust_lr_fn"], param.shape))
        return loss


class MuonAdamW(torch.optim.Optimizer):
    """:class:`Muon` (torch's, Newton-Schulz in float32 on a CPU) on the groups marked ``muon`` and
    ``torch.optim.AdamW`` on the others, as one
    optimizer. Its ``param_groups`` are what the trainer sets learning rates on (each group keeps its
    peak in ``peak_lr``); each step hands the current rates to the two inner optimizers."""

    def __init__(self, groups: list[dict[str, Any]], *, betas: tuple[float, float], eps: float, fused: bool,
                 momentum: float, nesterov: bool, ns_steps: int, adjust_lr_fn: str,
                 ns_dtype: torch.dtype = torch.bfloat16):
        if not any(g["params"] for g in groups if g["kind"] == "muon"):
            raise DogeError("optim.name muon found no hidden matrices to update in this model")
        super().__init__(groups, {"lr": 0.0, "weight_decay": 0.0, "kind": "adamw"})
        self._muon_groups = [g for g in self.param_groups if g["kind"] == "muon"]
        self._adamw_groups = [g for g in self.param_groups if g["kind"] != "muon"]
        self.muon = Muon(
            [{"params": g["params"], "lr": g["lr"], "weight_decay": g["weight_decay"]} for g in self._muon_groups],
            momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn, ns_dtype=ns_dtype)
        self.adamw = torch.optim.AdamW(
            [{"params": g["params"], "lr": g["lr"], "weight_decay": g["weight_decay"]} for g in self._adamw_groups],
            betas=betas, eps=eps, fused=fused)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for inner, outer in ((self.muon, self._muon_groups), (self.adamw, self._adamw_groups)):
            for to, source in zip(inner.param_groups, outer):
                to["lr"], to["weight_decay"] = source["lr"], source["weight_decay"]
            inner.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict(),
                "groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if set(state_dict) != {"muon", "adamw", "groups"}:
            raise ValueError("this optimizer state is not Muon+AdamW (optim.name muon)")
        groups = state_dict["groups"]
        if len(groups) != len(self.param_groups) or [g.get("kind") for g in groups] != \
                [g["kind"] for g in self.param_groups]:
            raise ValueError("its parameter groups differ from this model's")
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])
        for group, saved in zip(self.param_groups, groups):
            group.update({k: v for k, v in saved.items() if k in ("lr", "weight_decay", "peak_lr")})


def check_launcher(distributed_type) -> None:
    """Refuse Muon under DeepSpeed and FSDP, which shard or flatten the matrices it orthogonalises."""
    from accelerate.utils import DistributedType

    if distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        kind = "DeepSpeed" if distributed_type == DistributedType.DEEPSPEED else "FSDP"
        raise DogeError(f"optim.name muon needs every weight matrix whole on each process, which {kind} does not "
                        "give; train with one process or DDP (configs/accelerate/ddp.yaml), or use optim.name adamw")


def build_optimizer(model: torch.nn.Module, optim, *, device_type: str, distributed_type=None):
    """The optimizer ``optim`` (an OptimConfig) asks for, over ``model``'s trainable parameters. Each param
    group carries ``peak_lr``: the rate the schedule's multiplier scales."""
    fused = optim.fused if optim.fused is not None else device_type == "cuda"
    muon = optim.name == "muon"
    if muon and distributed_type is not None:
        check_launcher(distributed_type)
    by_kind = parameter_groups(model, muon=muon)
    groups = []
    if muon:
        groups.append({"params": [p for _, p in by_kind["muon"]], "kind": "muon", "lr": optim.muon_lr,
                       "peak_lr": optim.muon_lr, "weight_decay": optim.weight_decay})
    groups += [{"params": [p for _, p in by_kind["decay"]], "kind": "adamw", "lr": optim.lr, "peak_lr": optim.lr,
                "weight_decay": optim.weight_decay},
               {"params": [p for _, p in by_kind["no_decay"]], "kind": "adamw", "lr": optim.lr,
                "peak_lr": optim.lr, "weight_decay": 0.0}]
    betas = (optim.beta1, optim.beta2)
    if not muon:
        return torch.optim.AdamW(groups, lr=optim.lr, betas=betas, eps=optim.eps, fused=fused)
    return MuonAdamW(groups, betas=betas, eps=optim.eps, fused=fused, momentum=optim.muon_momentum,
                     nesterov=optim.muon_nesterov, ns_steps=optim.muon_ns_steps, adjust_lr_fn=optim.muon_adjust_lr,
                     ns_dtype=torch.float32 if device_type == "cpu" else torch.bfloat16)


def describe_optimizer(model: torch.nn.Module, optim) -> str:
    """One line for the run's log: the optimizer and, with Muon, how the parameters split."""
    if optim.name != "muon":
        return f"optimizer AdamW at lr {optim.lr:g}"
    by_kind = parameter_groups(model, muon=True)
    muon = sum(p.numel() for _, p in by_kind["muon"])
    adamw = sum(p.numel() for kind in ("decay", "no_decay") for _, p in by_kind[kind])
    return (f"optimizer Muon on {len(by_kind['muon'])} hidden matrices ({muon / 1e6:.2f}M parameters) at "
            f"muon_lr {optim.muon_lr:g}, AdamW on the other {adamw / 1e6:.2f}M at lr {optim.lr:g}")
