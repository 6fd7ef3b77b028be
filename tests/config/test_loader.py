import pytest

from doge_cli.config import ConfigError, gradient_accumulation_steps, resolve_config
from doge_cli.config.loader import load_yaml, parse_overrides, to_yaml


def write(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_seed_20m_rtx4090_matches_the_guide():
    cfg = resolve_config("pt", size="20M", hardware="rtx4090")
    m = cfg.model
    assert (m.num_hidden_layers, m.hidden_size, m.intermediate_size, m.num_attention_heads, m.num_key_value_heads) == (
        8, 256, 512, 2, 1)
    assert m.vocab_size == 32768 and m.tie_word_embeddings
    assert cfg.optim.lr == 8e-3 and cfg.schedule.name == "warmup_stable_decay"
    assert cfg.train.max_steps == 8000
    assert cfg.train.global_batch_size == 256 and cfg.data.max_length == 2048
    micro = cfg.runtime.micro_batch_size
    assert micro * gradient_accumulation_steps(cfg) == 256
    assert cfg.runtime.precision == "bf16"


def test_precedence_defaults_size_hardware_recipe_cli(tmp_path):
    # schema default lr is overridden by the size preset ...
    assert resolve_config("pt", size="60M", hardware="cpu").optim.lr == 6e-3
    # ... the hardware preset overrides the schema's precision default ...
    assert resolve_config("pt", size="60M", hardware="h100").runtime.precision == "bf16"
    # ... the recipe overrides both ...
    recipe = write(tmp_path, "optim: {lr: 1.0e-3}\nruntime: {precision: fp32}\n")
    cfg = resolve_config("pt", size="60M", hardware="h100", recipe=recipe)
    assert cfg.optim.lr == 1e-3 and cfg.runtime.precision == "fp32"
    # ... and the command line overrides the recipe.
    cfg = resolve_config("pt", size="60M", hardware="h100", recipe=recipe, overrides=["optim.lr=2e-4"])
    assert cfg.optim.lr == 2e-4 and cfg.runtime.precision == "fp32"


def test_cli_size_wins_over_recipe_size(tmp_path):
    recipe = write(tmp_path, "size: 320M\n")
    assert resolve_config("pt", hardware="cpu", recipe=recipe).model.hidden_size == 1024
    assert resolve_config("pt", size="20M", hardware="cpu", recipe=recipe).model.hidden_size == 256


def test_hardware_keeps_global_batch():
    for hw in ("cpu", "rtx4090", "a100-40gb", "a100-80gb", "h100", "h200"):
        for size in ("20M", "320M"):
            cfg = resolve_config("pt", size=size, hardware=hw)
            assert cfg.runtime.micro_batch_size * gradient_accumulation_steps(cfg) == cfg.train.global_batch_size
    small = resolve_config("pt", size="320M", hardware="rtx4090").runtime.micro_batch_size
    big = resolve_config("pt", size="320M", hardware="h200").runtime.micro_batch_size
    assert big > small


def test_user_micro_batch_wins_over_preset():
    cfg = resolve_config("pt", size="20M", hardware="h100", overrides=["runtime.micro_batch_size=2"])
    assert cfg.runtime.micro_batch_size == 2 and gradient_accumulation_steps(cfg) == 128
    assert gradient_accumulation_steps(cfg, world_size=4) == 32


def test_indivisible_batch_is_an_error():
    with pytest.raises(ConfigError, match="not a multiple"):
        resolve_config("pt", size="20M", hardware="cpu", overrides=["runtime.micro_batch_size=3"])


def test_typo_gets_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr' \(from the command line\); did you mean 'optim.lr'"):
        resolve_config("pt", hardware="cpu", overrides=["optim.lrr=1e-3"])


def test_unknown_section_in_recipe_names_the_recipe(tmp_path):
    recipe = write(tmp_path, "optimizer:\n  lr: 1.0\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'optimizer' \(from recipe .*recipe.yaml\); did you mean 'optim'"):
        resolve_config("pt", hardware="cpu", recipe=recipe)


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("optim.lr=abc", r"'optim.lr' = 'abc'.*valid number"),
        ("optim.lr=-1", r"'optim.lr' = -1.*greater than 0"),
        ("schedule.name=linear", r"'schedule.name' = 'linear'.*'warmup_stable_decay'"),
        ("runtime.precision=fp8", r"'runtime.precision' = 'fp8'.*'fp32', 'bf16' or 'fp16'"),
        ("train.max_steps=[1]", r"'train.max_steps'"),
    ],
)
def test_bad_values_name_key_value_and_allowed(override, pattern):
    with pytest.raises(ConfigError, match=pattern) as info:
        resolve_config("pt", hardware="cpu", overrides=[override])
    assert "\n" not in str(info.value)


def test_cross_field_validation():
    with pytest.raises(ConfigError, match="divisible by num_attention_heads"):
        resolve_config("pt", hardware="cpu", overrides=["model.num_attention_heads=3"])
    with pytest.raises(ConfigError, match="perfect square"):
        resolve_config("pt", hardware="cpu", overrides=["model.is_moe=true", "model.num_experts=10"])


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("optim: [1, 2\n", "not valid YAML at line"),
        ("", "is empty"),
        ("# only a comment\n", "is empty"),
        ("- a\n- b\n", "must contain a mapping"),
        ("just a string\n", "must contain a mapping"),
    ],
)
def test_bad_yaml(tmp_path, text, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_yaml(write(tmp_path, text))


def test_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is a folder"):
        load_yaml(tmp_path)
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("optim: {lr: 1}\n# caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_yaml(bad)


def test_recipe_for_another_stage(tmp_path):
    with pytest.raises(ConfigError, match="recipe is for stage 'sft'"):
        resolve_config("pt", hardware="cpu", recipe=write(tmp_path, "stage: sft\n"))


def test_overrides_parse_yaml_scalars():
    assert parse_overrides(["a.b=1", "a.c=true", "d=null", "e=[1, 2]", "f.g.h=x"]) == {
        "a": {"b": 1, "c": True}, "d": None, "e": [1, 2], "f": {"g": {"h": "x"}}}
    for bad in ("novalue", "=3", "a..b=1"):
        with pytest.raises(ConfigError, match="section.key=value"):
            parse_overrides([bad])


def test_stage_defaults_differ_where_the_seed_does():
    sft = resolve_config("sft", size="20M", hardware="cpu")
    assert sft.optim.lr == 8e-4 and sft.schedule.name == "cosine_with_min_lr" and sft.schedule.min_lr_rate == 0.1
    assert sft.train.num_epochs == 2 and sft.train.global_batch_size == 128
    dpo = resolve_config("dpo", size="320M", hardware="cpu")
    assert dpo.optim.lr == 2e-5 and dpo.dpo.max_length == 1024 and dpo.dpo.max_prompt_length == 512
    grpo = resolve_config("grpo", size="20M", hardware="cpu")
    assert grpo.grpo.max_completion_length == 1024 and [r.name for r in grpo.grpo.rewards] == ["accuracy", "format"]


def test_yaml_round_trip(tmp_path):
    cfg = resolve_config("dpo", size="60M", hardware="a100-80gb", overrides=["dpo.beta=0.5"])
    path = write(tmp_path, to_yaml(cfg), "resolved.yaml")
    again = resolve_config("dpo", recipe=path, hardware="a100-80gb")
    assert again == cfg


def test_explain_documents_every_key():
    text = to_yaml(resolve_config("grpo", size="20M", hardware="cpu"), explain=True)
    assert "# Peak learning rate (of AdamW's tensors, with optim.name muon)." in text
    assert "# Completions sampled per prompt (the group)." in text
    keys = [ln for ln in text.splitlines() if ln.strip() and not ln.strip().startswith(("#", "-"))]
    lines = text.splitlines()
    for key_line in keys:
        i = lines.index(key_line)
        if lines[i - 1].strip().startswith("- ") or key_line.startswith("  " * 3):
            continue  # items inside a list of rewards
        assert lines[i - 1].lstrip().startswith("#"), key_line


@pytest.mark.parametrize("override", ["optim.lr=.inf", "optim.lr=nan", "optim.max_grad_norm=inf",
                                      "schedule.warmup_ratio=.nan", "model.rope_scaling={factor: .inf}"])
def test_non_finite_numbers_are_refused(override):
    with pytest.raises(ConfigError, match="finite"):
        resolve_config("pt", hardware="cpu", overrides=[override])


def test_non_finite_reward_weight_is_refused(tmp_path):
    recipe = tmp_path / "grpo.yaml"
    recipe.write_text("grpo:\n  rewards:\n    - {name: accuracy, weight: .inf}\n")
    with pytest.raises(ConfigError, match="grpo.rewards.0.weight.*finite"):
        resolve_config("grpo", hardware="cpu", recipe=recipe)


def test_one_list_of_training_stages_everywhere():
    from doge_cli.config.presets import STAGE_DEFAULTS
    from doge_cli.config.schema import TRAINING_STAGES
    from doge_cli.data.schema import DATA_STAGES, TRAINED_BY
    from doge_cli.train.objectives import REGISTRY

    assert TRAINING_STAGES == ("pt", "sft", "dpo", "grpo")
    assert tuple(REGISTRY) == tuple(STAGE_DEFAULTS) == TRAINING_STAGES
    assert set(DATA_STAGES) == {*TRAINING_STAGES, "r1"} and set(TRAINED_BY.values()) == set(TRAINING_STAGES)
