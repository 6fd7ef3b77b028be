import glob
from pathlib import Path

import pytest

from doge_cli.config import HARDWARE, SIZES, STAGES, resolve_config
from doge_cli.config.presets import micro_batch_for, normalize_size

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("hardware", list(HARDWARE))
@pytest.mark.parametrize("stage", list(STAGES))
def test_every_preset_combination_validates(size, hardware, stage):
    cfg = resolve_config(stage, size=size, hardware=hardware)
    assert cfg.size == size and cfg.hardware == hardware


RECIPES = sorted(glob.glob(str(ROOT / "configs" / "**" / "*.yaml"), recursive=True))


def test_recipes_exist():
    assert any("Doge-20M/pt.yaml" in r for r in RECIPES)


@pytest.mark.parametrize("recipe", [r for r in RECIPES if "/accelerate/" not in r], ids=lambda p: Path(p).relative_to(ROOT).as_posix())
def test_every_shipped_recipe_validates(recipe):
    import yaml

    stage = yaml.safe_load(Path(recipe).read_text())["stage"]
    resolve_config(stage, recipe=recipe, hardware="cpu")


def test_seed_size_table():
    table = {"20M": (8, 256, 512, 2, 1, 8000, 256, 8e-3), "60M": (16, 512, 1024, 4, 2, 16000, 512, 6e-3),
             "160M": (24, 768, 1536, 6, 3, 24000, 768, 4e-3), "320M": (32, 1024, 2048, 8, 4, 32000, 1024, 2e-3)}
    for name, (layers, hidden, ff, heads, kv, steps, batch, lr) in table.items():
        cfg = resolve_config("pt", size=name, hardware="cpu")
        m = cfg.model
        assert (m.num_hidden_layers, m.hidden_size, m.intermediate_size, m.num_attention_heads,
                m.num_key_value_heads) == (layers, hidden, ff, heads, kv)
        assert (cfg.train.max_steps, cfg.train.global_batch_size, cfg.optim.lr) == (steps, batch, lr)
        assert cfg.schedule.warmup_ratio == 0.1 and cfg.schedule.decay_ratio == 0.1 and cfg.schedule.min_lr_rate == 0
        assert cfg.optim.weight_decay == 0.01


def test_size_names_are_forgiving():
    assert normalize_size("Doge-20M") == "20M" and normalize_size("160m") == "160M" and normalize_size("7B") is None


def test_micro_batch_fits_memory_and_divides_the_batch():
    model = SIZES["320M"].model
    small = micro_batch_for(HARDWARE["rtx4090"], model, 2048, 1024)
    big = micro_batch_for(HARDWARE["h200"], model, 2048, 1024)
    assert 1 <= small < big and 1024 % small == 0 and 1024 % big == 0
    assert micro_batch_for(HARDWARE["h200"], SIZES["1M"].model, 256, 8) == 8  # capped by the global batch
    ckpt = micro_batch_for(HARDWARE["rtx4090"], model, 2048, 1024, checkpointing=True)
    assert ckpt >= small


def test_auto_hardware_on_this_machine():
    import torch

    cfg = resolve_config("pt", size="20M", hardware="auto")
    assert cfg.hardware == ("cpu" if not torch.cuda.is_available() else cfg.hardware)


def test_a_gpu_preset_without_a_gpu_is_refused_in_one_line(monkeypatch):
    import pytest
    import torch

    from doge_cli.config.presets import check_hardware

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError) as err:
        check_hardware("rtx4090", "cuda")
    message = str(err.value)
    assert "\n" not in message and message.startswith("hardware preset rtx4090 (NVIDIA RTX 4090, 24 GB) needs a CUDA GPU")
    assert message.endswith("use --hardware cpu, or --hardware auto to detect the machine")
    with pytest.raises(ValueError, match="^runtime.device=cuda needs a CUDA GPU"):
        check_hardware("auto", "cuda")
    assert check_hardware("cpu", "cpu") is None


def test_a_preset_for_another_card_is_said_once(monkeypatch):
    import torch

    from doge_cli.config.presets import check_hardware

    class Props:
        total_memory = 80 * 2**30

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=0: Props())
    assert check_hardware("h100", "cuda") is None
    note = check_hardware("rtx4090", "cuda")
    assert "this is NVIDIA H100 80GB HBM3 (80 GB)" in note and "for a smaller card" in note and "24 GB" in note
    assert "for a larger card" in check_hardware("h200", "cuda")
