"""Named presets: model sizes (with their per-stage hyper-parameters) and hardware.

Sizes come from the SmallDoge training guide's tables (Doge-20M/60M/160M/320M, pretrained on one
RTX 4090 for 4B/16B/32B/64B tokens) plus two tiny CPU sizes for the quickstart and tests.
A preset is a partial config (nested dict) merged under the YAML recipe and the command line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


def _post_training(stage: str, epochs: int, **extra: Any) -> dict[str, Any]:
    """The seed's Instruct and R1 recipes: cosine to 10% with 10% warmup, 128 sequences per optimizer
    step, checkpoints and evaluation every 100 steps; ``extra`` merges keys into those sections."""
    layer: dict[str, Any] = {
        "output_dir": f"./runs/{stage}",
        "data": {"path": f"./datasets/merged/{stage}"},
        "schedule": {"name": "cosine_with_min_lr", "warmup_ratio": 0.1, "min_lr_rate": 0.1},
        "train": {"max_steps": None, "num_epochs": epochs, "global_batch_size": 128},
        "checkpoint": {"every": 100},
        "logging": {"eval_every": 100},
    }
    for section, values in extra.items():
        layer[section] = {**layer[section], **values}
    return layer


# Per-stage defaults that differ from the schema's (which are pretraining's).
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "pt": {"output_dir": "./runs/pt", "data": {"path": "./datasets/merged/pt"}},
    "sft": _post_training("sft", epochs=2),
    "dpo": _post_training("dpo", epochs=2, data={"max_length": 1024}),
    "grpo": _post_training("grpo", epochs=1, data={"max_length": 1536}, logging={"log_every": 1}),
}


@dataclass(frozen=True)
class SizePreset:
    """One named model size: its shape and its per-stage hyper-parameters.

    The shape fields are those of ``ModelConfig`` (and transformers' ``DogeConfig``); ``max_len`` is both
    the context (``max_position_embeddings``, ``keep_window_size``) and the pretraining block length.
    """

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    pt_steps: int
    pt_batch: int
    pt_lr: float
    sft_lr: float
    dpo_lr: float
    vocab: int = 32768
    max_len: int = 2048

    @property
    def model(self) -> dict[str, Any]:
        """The ``model`` config section of this size."""
        return {
            "vocab_size": self.vocab,
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "max_position_embeddings": self.max_len,
            "keep_window_size": self.max_len,
            "tie_word_embeddings": True,
        }

    def stage_layer(self, stage: str) -> dict[str, Any]:
        """What this size sets for ``stage`` beyond the model shape."""
        if stage == "pt":
            return {
                "train": {"max_steps": self.pt_steps, "global_batch_size": self.pt_batch},
                "optim": {"lr": self.pt_lr, "weight_decay": 0.01},
                "schedule": {"name": "warmup_stable_decay", "warmup_ratio": 0.1, "decay_ratio": 0.1,
                             "min_lr_rate": 0.0},
                "data": {"max_length": self.max_len},
            }
        # The seed's GRPO recipes reuse the SFT learning rates.
        return {"optim": {"lr": {"sft": self.sft_lr, "dpo": self.dpo_lr, "grpo": self.sft_lr}[stage]}}


# Doge-20M..320M: the seed's model table and pretraining hyper-parameters (micro-batch 1 ×
# accumulation 256/512/768/1024 on one GPU = that many 2048-token sequences per step;
# 8k/16k/24k/32k steps ≈ 4B/16B/32B/64B tokens; parameters 13M / 54M / 152M / 335M).
# SFT lr 8e-4..2e-4, DPO lr 8e-5..2e-5.
# "1M" and "5M" are tiny CPU sizes (parameter counts at the quickstart's 4096-token vocabulary).
SIZES: dict[str, SizePreset] = {
    "1M": SizePreset(layers=4, hidden=128, intermediate=256, heads=4, kv_heads=2, pt_steps=300, pt_batch=8,
                     pt_lr=3e-3, sft_lr=1e-3, dpo_lr=1e-4, vocab=4096, max_len=256),
    "5M": SizePreset(layers=5, hidden=256, intermediate=768, heads=4, kv_heads=2, pt_steps=1000, pt_batch=16,
                     pt_lr=3e-3, sft_lr=1e-3, dpo_lr=1e-4, vocab=4096, max_len=512),
    "20M": SizePreset(layers=8, hidden=256, intermediate=512, heads=2, kv_heads=1, pt_steps=8000, pt_batch=256,
                      pt_lr=8e-3, sft_lr=8e-4, dpo_lr=8e-5),
    "60M": SizePreset(layers=16, hidden=512, intermediate=1024, heads=4, kv_heads=2, pt_steps=16000, pt_batch=512,
                      pt_lr=6e-3, sft_lr=6e-4, dpo_lr=6e-5),
    "160M": SizePreset(layers=24, hidden=768, intermediate=1536, heads=6, kv_heads=3, pt_steps=24000, pt_batch=768,
                       pt_lr=4e-3, sft_lr=4e-4, dpo_lr=4e-5),
    "320M": SizePreset(layers=32, hidden=1024, intermediate=2048, heads=8, kv_heads=4, pt_steps=32000,
                       pt_batch=1024, pt_lr=2e-3, sft_lr=2e-4, dpo_lr=2e-5),
}


def normalize_size(name: str) -> str | None:
    """Accept '20M', '20m', 'Doge-20M'; return the registry key or None."""
    key = name.strip()
    if key.lower().startswith("doge-"):
        key = key[5:]
    key = key.upper()
    return key if key in SIZES else None


@dataclass(frozen=True)
class HardwarePreset:
    """What a machine can do; the micro batch is derived from its memory and the model."""

    description: str
    memory_gb: float | None
    """Accelerator memory; None for CPU (micro batch fixed by ``cpu_micro_batch``)."""
    precision: str = "bf16"
    attn_implementation: str = "auto"
    compile: bool = False
    dataloader_workers: int = 2
    device: str = "cuda"
    cpu_micro_batch: int = 4
    max_micro_batch: int = 64
    notes: list[str] = field(default_factory=list)


# torch.compile stays off by default everywhere: it has not yet been benchmarked against our
# kernels on every card; turn it on with runtime.compile=true.
HARDWARE: dict[str, HardwarePreset] = {
    "cpu": HardwarePreset("CPU only (fp32; bf16 needs AMX/AVX512-BF16 to pay off)", None, precision="fp32",
                          dataloader_workers=0, device="cpu"),
    "rtx4090": HardwarePreset("NVIDIA RTX 4090, 24 GB", 24),
    "a100-40gb": HardwarePreset("NVIDIA A100, 40 GB", 40),
    "a100-80gb": HardwarePreset("NVIDIA A100, 80 GB", 80),
    "h100": HardwarePreset("NVIDIA H100, 80 GB", 80),
    "h200": HardwarePreset("NVIDIA H200, 141 GB", 141),
}
HARDWARE_NAMES = [*HARDWARE, "auto"]


def activation_bytes_per_sequence(model: dict[str, Any], seq_len: int, checkpointing: bool) -> float:
    """Estimated training activation memory of one sequence in 16-bit precision.

    Per layer ~ s·h·34 bytes (Korthikanti et al. 2022, "Reducing Activation Recomputation",
    eq. 2, without the 5·a·s/h term that fused attention removes), plus the fp32 logits and
    their gradient (2 × 4 bytes × s × vocab) that dominate small models. With gradient
    checkpointing only each layer's input (2·s·h bytes) is kept.
    """
    h = model["hidden_size"]
    per_layer = 2 * seq_len * h if checkpointing else 34 * seq_len * h
    logits = 8 * seq_len * model["vocab_size"]
    return model["num_hidden_layers"] * per_layer + logits


def parameter_estimate(model: dict[str, Any]) -> int:
    """Rough parameter count (no bias terms) used only for memory planning; a CDMoE model adds
    2·E·H (the experts' two embeddings) + 2·√E·H (the product-key router) per layer."""
    h, ff, layers = model["hidden_size"], model["intermediate_size"], model["num_hidden_layers"]
    kv = h // model["num_attention_heads"] * model["num_key_value_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * ff
    if model.get("is_moe"):
        experts = model["num_experts"]
        per_layer += 2 * experts * h + 2 * math.isqrt(experts) * h
    emb = model["vocab_size"] * h * (1 if model.get("tie_word_embeddings", True) else 2)
    return layers * per_layer + emb


def micro_batch_for(preset: HardwarePreset, model: dict[str, Any], seq_len: int, global_batch: int,
                    checkpointing: bool = False) -> int:
    """Largest power-of-two micro batch that fits in ~75% of the card after weights, gradients
    and AdamW state (16 bytes per parameter), capped by the global batch."""
    if preset.memory_gb is None:
        cap = preset.cpu_micro_batch
    else:
        budget = 0.75 * preset.memory_gb * 2**30 - 16 * parameter_estimate(model)
        per_seq = activation_bytes_per_sequence(model, seq_len, checkpointing)
        cap = max(1, int(budget // per_seq)) if budget > 0 else 1
    cap = min(cap, preset.max_micro_batch, global_batch)
    micro = 2 ** int(math.log2(cap))
    while global_batch % micro:
        micro //= 2
    return max(micro, 1)


def detect_hardware() -> str:
    """Pick the preset for the machine at hand (imports torch; call only when needed)."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name(0).lower()
    mem_gb = torch.cuda.get_device_properties(0).total_memory / 2**30
    if "h200" in name:
        return "h200"
    if "h100" in name:
        return "h100"
    if "a100" in name:
        return "a100-80gb" if mem_gb > 50 else "a100-40gb"
    if "4090" in name:
        return "rtx4090"
    # Unknown card: the preset with the most memory that still fits in it.
    fitting = [(p.memory_gb, k) for k, p in HARDWARE.items() if p.memory_gb and p.memory_gb <= mem_gb + 1]
    return max(fitting)[1] if fitting else "rtx4090"


def check_hardware(name: str, device: str) -> str | None:
    """Whether this machine can run a config made for hardware preset ``name`` on ``device`` (its
    ``runtime.device``). A CUDA device on a machine without one is refused (``ValueError`` with the
    one-line reason, naming what was found); a GPU preset on a different card than the one found is
    allowed and returns a note to say once (the micro batch was sized for the preset's memory)."""
    import torch

    if device != "cuda":
        return None
    if not torch.cuda.is_available():
        found = "a torch build without CUDA" if not torch.backends.cuda.is_built() else "no usable CUDA GPU"
        # A GPU preset asks for the GPU; with the cpu preset it is an explicit runtime.device=cuda.
        gpu_preset = name in HARDWARE and HARDWARE[name].memory_gb is not None
        what = f"hardware preset {name} ({HARDWARE[name].description})" if gpu_preset else "runtime.device=cuda"
        raise ValueError(f"{what} needs a CUDA GPU, but this machine has {found}; use --hardware cpu, or --hardware "
                         "auto to detect the machine")
    preset = HARDWARE.get(name)
    if preset is None or preset.memory_gb is None:
        return None
    card = torch.cuda.get_device_name(0)
    memory_gb = torch.cuda.get_device_properties(0).total_memory / 2**30
    if detect_hardware() == name:
        return None
    size = "smaller" if preset.memory_gb < memory_gb - 1 else "larger" if preset.memory_gb > memory_gb + 1 else "another"
    return (f"hardware preset {name} is for {preset.description}; this is {card} ({memory_gb:.0f} GB), so the preset "
            f"is for a {size} card and the micro batch was sized for {preset.memory_gb:g} GB (--hardware auto "
            "picks the preset for this card)")
