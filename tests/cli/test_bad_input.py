"""Bad input across every command, tried as a new user would: each case must end with exit code 2, at
most two lines on stderr (``doge: error: ...``, and for usage errors a pointer to --help), no traceback,
every file it could have touched unchanged (hashes before and after) and no run folder left behind.

Each case also names the message it must show (a substring of the error line, or a regex searched in it),
so a case answered by some other, earlier check than the one it is about fails instead of passing.

The cases share one small world (builtin data, a tokenizer, tokenized and merged stages, a model, a
finished run) built once; each case gets its own scratch folder for the outputs it names.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from doge_cli.cli.main import run

TINY = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=1",
        "model.num_attention_heads=2", "model.num_key_value_heads=1", "data.max_length=64",
        "model.max_position_embeddings=64", "model.keep_window_size=64", "train.max_steps=2",
        "train.global_batch_size=2", "runtime.micro_batch_size=1", "checkpoint.every=0", "logging.eval_every=0",
        "runtime.attn_implementation=sdpa"]


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """The shared world; cases must leave it exactly as it is."""
    from transformers import DogeConfig

    from doge_cli.config import resolve_config
    from doge_cli.data.download import download_recipe
    from doge_cli.data.merge import merge_stage
    from doge_cli.data.tokenization import tokenize_stages
    from doge_cli.data.tokenizer import train_tokenizer
    from doge_cli.model import DogeForCausalLM, save_pretrained
    from doge_cli.train.core import train
    from doge_cli.train.objectives import objective_for

    root = tmp_path_factory.mktemp("world")
    ds, tok_dir = root / "datasets", root / "tokenizer"
    download_recipe("quickstart", ds, max_examples=60)
    train_tokenizer(tok_dir, datasets_dir=ds, vocab_size=400)
    tokenize_stages(str(tok_dir), ds, ["pt"], 64, progress=False)
    tokenize_stages(str(tok_dir), ds, ["sft", "dpo"], 256, progress=False)
    tokenize_stages(str(tok_dir), ds, ["grpo"], 2048, progress=False)  # the R1 system prompt is long
    for stage in ("pt", "sft", "dpo", "grpo"):
        merge_stage(ds, stage, train_examples=None, test_examples=4)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    config = DogeConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                        keep_window_size=256, router_aux_loss_coef=0.0, tie_word_embeddings=True,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    save_pretrained(DogeForCausalLM(config, attn_implementation="eager"), root / "model", tokenizer=tok)
    save_pretrained(DogeForCausalLM(config, attn_implementation="eager"), root / "model-no-tokenizer")
    small = DogeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, router_aux_loss_coef=0.0)
    save_pretrained(DogeForCausalLM(small, attn_implementation="eager"), root / "model-small-vocab")
    # A finished run with checkpoints at steps 1 and 2.
    cfg = resolve_config("pt", hardware="cpu", overrides=[*TINY, f"data.path={ds / 'merged/pt'}",
                                                          f"output_dir={root / 'run'}", "checkpoint.every=1"])
    train(cfg, objective_for(cfg))
    results = root / "results.json"
    results.write_text(json.dumps({"model": "x", "tasks": {"t": {"acc": 0.5}}}))
    return SimpleNamespace(root=root, ds=ds, tok=tok_dir, model=root / "model", run=root / "run",
                           pt=ds / "merged/pt", sft=ds / "merged/sft", dpo=ds / "merged/dpo", grpo=ds / "merged/grpo",
                           results=results)


def _foreign(t: Path, name: str = "mine") -> Path:
    folder = t / name
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    return folder


def _file(t: Path, name: str, text: str) -> Path:
    path = t / name
    path.write_text(text)
    return path


def _model_copy(w, t: Path, name: str = "m") -> Path:
    dest = t / name
    shutil.copytree(w.model, dest)
    return dest


def _pt(w, t, *extra):
    return ["train", "pt", "--hardware", "cpu", *TINY, f"data.path={w.pt}", f"output_dir={t / 'run'}", *extra]


def _post(stage, w, t, *extra, model=None):
    data = {"sft": w.sft, "dpo": w.dpo, "grpo": w.grpo}[stage]
    args = ["train", stage, "--hardware", "cpu", *TINY, "data.max_length=256", "model.max_position_embeddings=256",
            f"data.path={data}", f"output_dir={t / 'run'}", *extra]
    return args + (["--model", str(model)] if model is not None else [])


def _bad_weights(w, t: Path) -> Path:
    m = _model_copy(w, t)
    data = (m / "model.safetensors").read_bytes()
    (m / "model.safetensors").write_bytes(data[: len(data) // 3])
    return m


def _not_doge(w, t: Path) -> Path:
    m = _model_copy(w, t)
    config = json.loads((m / "config.json").read_text())
    config["model_type"] = "llama"
    (m / "config.json").write_text(json.dumps(config))
    return m


def _run_copy(w, t: Path, damage=None) -> Path:
    run_dir = t / "run"
    shutil.copytree(w.run, run_dir)
    if damage:
        for ckpt in sorted((run_dir / "checkpoints").iterdir()):
            damage(ckpt)
    return run_dir


def _without_weights(w, t: Path) -> Path:
    m = _model_copy(w, t)
    (m / "model.safetensors").unlink()
    return m


# Hub access allowed and a token, at an endpoint where nothing listens: a push that got past the local
# checks would end at "cannot reach the hub", never on the network.
_ONLINE = {"HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0",
           "HF_TOKEN": "hf_test_token", "HF_ENDPOINT": "http://127.0.0.1:9"}


def _moe(w, t: Path) -> Path:
    from doge_cli.model.upcycle import upcycle

    return upcycle(str(w.model), t / "moe", num_experts=16, experts_per_token=4)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _bytes(t: Path, name: str, data: bytes) -> Path:
    path = t / name
    path.write_bytes(data)
    return path


def _foreign_source(t: Path) -> Path:
    """A datasets folder whose pt/mine is someone else's folder."""
    save_dir = t / "ds"
    (save_dir / "pt").mkdir(parents=True)
    _foreign(save_dir / "pt")
    return save_dir


def _foreign_results(t: Path) -> Path:
    """An output folder where the results file of a model copied to t/m would go is someone else's file."""
    from doge_cli.eval.run import model_slug

    out = t / "results"
    out.mkdir()
    (out / f"{model_slug(str(t / 'm'))}.json").write_text("my notes")
    return out


def _accelerate(t: Path, text: str) -> Path:
    return _file(t, "launcher.yaml", text)


def _tokenized_pt(t: Path, *, shard: str | None = None, old: bool = False) -> Path:
    """A datasets folder whose tokenized pt source is one shard of two (``shard``), or the former
    int32-column format (``old``)."""
    import json

    import datasets

    folder = t / "ds" / "tokenized" / "pt" / "x"
    if old:
        datasets.Dataset.from_dict({"input_ids": [[1, 2]], "position_ids": [[0, 1]]}).save_to_disk(str(folder))
    else:
        (folder / shard).mkdir(parents=True)
        (folder / shard / "manifest.json").write_text(json.dumps({
            "format": "doge-token-stream", "version": 1, "dtype": "<u2", "max_length": 64, "pad_id": 0, "tokens": 3,
            "documents": 1, "cache_key": {"tokenizer": "t"}, "build_id": "b"}))
    return t / "ds"


def _index_without_source(t: Path) -> Path:
    """A merged pt index whose tokenized source folder is gone."""
    import json

    merged = t / "merged-pt"
    merged.mkdir()
    (merged / "manifest.json").write_text(json.dumps({"format": "doge-block-index", "version": 1, "stage": "pt",
                                                      "sources": {"x": {"path": "../gone", "build_ids": ["b"]}}}))
    return merged


def _jsonl(t: Path, lines: list[str], name: str = "data.jsonl") -> Path:
    return _file(t, name, "\n".join(lines) + "\n")


# (id, expected, case): case(w, t) prepares the scratch folder t if needed and returns the argv, or (argv, env);
# expected is what the error line must show, a substring (str) or a pattern searched in it (re.compile).
CASES = [
    # -- usage errors found by Typer: one line plus a pointer to --help ------------------------------
    ("usage-unknown-option-train", "No such option: --bogus",
     lambda w, t: ["train", "pt", "--bogus"]),
    ("usage-unknown-option-data", "No such option: --everything",
     lambda w, t: ["data", "download", "--everything"]),
    ("usage-unknown-option-eval", "No such option: --modle",
     lambda w, t: ["eval", "--modle", "x"]),
    ("usage-unknown-option-chat", "No such option: --tempreature",
     lambda w, t: ["chat", str(w.model), "--tempreature", "1"]),
    ("usage-unknown-command", "No such command 'trian'",
     lambda w, t: ["trian"]),
    ("usage-unknown-subcommand", "No such command 'fetch'",
     lambda w, t: ["data", "fetch"]),
    ("usage-text-for-int-max-length", "Invalid value for '--max-length'",
     lambda w, t: ["data", "tokenize", "--max-length", "long"]),
    ("usage-text-for-int-vocab", "Invalid value for '--vocab-size'",
     lambda w, t: ["data", "train-tokenizer", "--vocab-size", "big"]),
    ("usage-text-for-int-batch", "Invalid value for '--batch-size'",
     lambda w, t: ["eval", "--model", "x", "--batch-size", "eight"]),
    ("usage-text-for-float-temperature", "Invalid value for '--temperature'",
     lambda w, t: ["chat", str(w.model), "--temperature", "warm"]),
    ("usage-text-for-int-train-examples", "Invalid value for '--train-examples'",
     lambda w, t: ["data", "merge", "--train-examples", "many"]),
    ("usage-missing-argument-chat", "Missing argument 'model'",
     lambda w, t: ["chat"]),
    ("usage-missing-argument-config", "Missing argument 'stage'",
     lambda w, t: ["config", "show"]),
    ("usage-option-needs-value", "Option '--recipe' requires an argument",
     lambda w, t: ["data", "download", "--recipe"]),
    # -- config: keys, values, recipes, overrides --------------------------------------------------------
    ("config-unknown-key", "unknown config key 'optim.lrr'",
     lambda w, t: _pt(w, t, "optim.lrr=1e-3")),
    ("config-unknown-section", "unknown config key 'optimizer'",
     lambda w, t: _pt(w, t, "optimizer.lr=1e-3")),
    ("config-wrong-type", re.compile(r"'train\.max_steps' = 'many' .*valid integer"),
     lambda w, t: _pt(w, t, "train.max_steps=many")),
    ("config-negative-lr", "'optim.lr' = -1 (from the command line): Input should be greater than 0",
     lambda w, t: _pt(w, t, "optim.lr=-1")),
    ("config-infinite-lr", "'optim.lr' = inf (from the command line): Input should be a finite number",
     lambda w, t: _pt(w, t, "optim.lr=.inf")),
    ("config-nan-lr", "'optim.lr' = 'nan' (from the command line): Input should be a finite number",
     lambda w, t: _pt(w, t, "optim.lr=nan")),
    ("config-nan-grad-norm", "'optim.max_grad_norm' = nan (from the command line): Input should be a finite number",
     lambda w, t: _pt(w, t, "optim.max_grad_norm=.nan")),
    ("config-infinite-rope-scaling", "rope_scaling.factor must be a finite number",
     lambda w, t: _pt(w, t, "model.rope_scaling={factor: .inf}")),
    ("config-batch-not-multiple", "global_batch_size 3 is not a multiple of runtime.micro_batch_size 2",
     lambda w, t: _pt(w, t, "train.global_batch_size=3", "runtime.micro_batch_size=2")),
    ("config-heads-not-dividing", "hidden_size 32 must be divisible by num_attention_heads 3",
     lambda w, t: _pt(w, t, "model.num_attention_heads=3")),
    ("config-kv-heads", "num_attention_heads 2 must be a multiple of num_key_value_heads 3",
     lambda w, t: _pt(w, t, "model.num_key_value_heads=3", "model.num_attention_heads=2")),
    ("train-pt-index-of-a-missing-source", re.compile(r"indexes the tokenized source x at \S*/gone, which is missing"),
     lambda w, t: _pt(w, t, f"data.path={_index_without_source(t)}")),
    ("config-warmup-plus-decay", "warmup_ratio + decay_ratio must not exceed 1",
     lambda w, t: _pt(w, t, "schedule.warmup_ratio=0.8", "schedule.decay_ratio=0.5")),
    ("config-unknown-size", "unknown size '7B'",
     lambda w, t: ["train", "pt", "--size", "7B", "--hardware", "cpu"]),
    ("config-unknown-hardware", "unknown hardware 'tpu'",
     lambda w, t: ["train", "pt", "--hardware", "tpu"]),
    ("config-override-without-equals", "override 'optim.lr' is not of the form section.key=value",
     lambda w, t: _pt(w, t, "optim.lr", "oops=1")),
    ("config-recipe-missing", re.compile(r"config file \S*/nope\.yaml does not exist"),
     lambda w, t: ["train", "pt", str(t / "nope.yaml"), "--hardware", "cpu"]),
    ("config-recipe-is-folder", "is a folder; pass a .yaml file",
     lambda w, t: ["train", "pt", str(t), "--hardware", "cpu"]),
    ("config-recipe-broken-yaml", "r.yaml is not valid YAML at line 1",
     lambda w, t: ["train", "pt", str(_file(t, "r.yaml", "optim: [lr: 1")),
                   "--hardware", "cpu"]),
    ("config-recipe-empty", "r.yaml is empty",
     lambda w, t: ["train", "pt", str(_file(t, "r.yaml", "")), "--hardware", "cpu"]),
    ("config-recipe-a-list", "must contain a mapping of sections, not a list",
     lambda w, t: ["train", "pt", str(_file(t, "r.yaml", "- a\n- b\n")), "--hardware", "cpu"]),
    ("config-recipe-other-stage", "the recipe is for stage 'dpo' but you ran stage 'pt'",
     lambda w, t: ["train", "pt", str(_file(t, "r.yaml", "stage: dpo\n")),
                   "--hardware", "cpu"]),
    ("config-recipe-not-utf8", "r.yaml is not UTF-8 text",
     lambda w, t: ["train", "pt", str(_bytes(t, "r.yaml", b"optim:\n  lr: \xff\n")),
                   "--hardware", "cpu"]),
    ("config-dpo-prompt-longer-than-pair", "max_prompt_length 2048 must be below max_length 1024",
     lambda w, t: _post("dpo", w, t, "dpo.max_prompt_length=2048",
                        "dpo.max_length=1024", model=w.model)),
    ("config-grpo-group-of-one", re.compile(r"'grpo\.num_generations' = 1 .*greater than or equal to 2"),
     lambda w, t: _post("grpo", w, t, "grpo.num_generations=1", model=w.model)),
    ("config-show-unknown-stage", "unknown stage 'rl'; choose one of pt, sft, dpo, grpo",
     lambda w, t: ["config", "show", "rl"]),
    ("config-show-save-foreign-file", re.compile(r"--save file \S*/notes\.yaml already exists and is not one"),
     lambda w, t: ["config", "show", "pt", "--hardware", "cpu", "--save",
                   str(_file(t, "notes.yaml", "my notes"))]),
    ("config-show-save-folder", "is a folder; give a file path",
     lambda w, t: ["config", "show", "pt", "--hardware", "cpu", "--save", str(t)]),
    ("config-show-save-missing-folder", re.compile(r"folder \S*/no does not exist; create it first"),
     lambda w, t: ["config", "show", "pt", "--hardware", "cpu", "--save",
                   str(t / "no" / "c.yaml")]),
    # -- data download ----------------------------------------------------------------------------------
    ("download-unknown-recipe", "unknown recipe 'everything'",
     lambda w, t: ["data", "download", "--recipe", "everything", "--save-dir", str(t)]),
    ("download-no-recipe-nor-local", "give --recipe (pretrain, sft, dpo, r1, grpo or quickstart) or --local PATH",
     lambda w, t: ["data", "download", "--save-dir", str(t)]),
    ("download-hub-recipe-offline", "needs the Hugging Face hub, which is offline here",
     lambda w, t: ["data", "download", "--recipe", "sft", "--save-dir", str(t)]),
    ("download-unknown-source", "recipe quickstart has no source 'wiki'",
     lambda w, t: ["data", "download", "--recipe", "quickstart", "--source", "wiki",
                   "--save-dir", str(t)]),
    ("download-python-edu", "python-edu rows hold only Software Heritage blob ids",
     lambda w, t: ["data", "download", "--recipe", "pretrain", "--source", "python-edu",
                   "--save-dir", str(t)]),
    ("download-zero-examples", "--max-examples must be positive",
     lambda w, t: ["data", "download", "--recipe", "quickstart", "--max-examples", "0",
                   "--save-dir", str(t)]),
    ("download-into-foreign-folder", re.compile(r"source folder pt/mine \S+ holds files doge did not write"),
     lambda w, t: ["data", "download", "--local",
                   str(_jsonl(t, ['{"text": "hello"}'])), "--name", "mine",
                   "--save-dir", str(_foreign_source(t))]),
    ("local-missing", re.compile(r"input \S*/none\.jsonl does not exist"),
     lambda w, t: ["data", "download", "--local", str(t / "none.jsonl"), "--save-dir", str(t)]),
    ("local-empty-file", "e.jsonl is empty",
     lambda w, t: ["data", "download", "--local", str(_file(t, "e.jsonl", "")),
                   "--save-dir", str(t / "ds")]),
    ("local-unsupported-type", "unsupported file type '.docx'",
     lambda w, t: ["data", "download", "--local", str(_file(t, "a.docx", "x")),
                   "--save-dir", str(t / "ds")]),
    ("local-folder-without-data", "no jsonl, json, parquet, csv or txt files in",
     lambda w, t: ["data", "download", "--local", str(_foreign(t)),
                   "--save-dir", str(t / "ds")]),
    ("local-malformed-json-line", "data.jsonl:2: malformed JSON line",
     lambda w, t: ["data", "download", "--local",
                   str(_jsonl(t, ['{"text": "a"}', '{"text": '])),
                   "--save-dir", str(t / "ds")]),
    ("local-bare-array-line", "data.jsonl:1: each JSON line must be an object",
     lambda w, t: ["data", "download", "--local", str(_jsonl(t, ['["a", "b"]'])),
                   "--save-dir", str(t / "ds")]),
    ("local-number-text", "field 'text' (the text) holds int64 values, not text",
     lambda w, t: ["data", "download", "--local", str(_jsonl(t, ['{"text": 42}'])),
                   "--save-dir", str(t / "ds")]),
    ("local-list-text", "field 'text' (the text) holds list values, not text",
     lambda w, t: ["data", "download", "--local", str(_jsonl(t, ['{"text": ["a"]}'])),
                   "--save-dir", str(t / "ds")]),
    ("local-mixed-text", "field 'text' (the text) holds mixed (not only text) values, not text",
     lambda w, t: ["data", "download", "--local",
                   str(_jsonl(t, ['{"text": "a"}', '{"text": 3}'])), "--save-dir", str(t / "ds")]),
    ("local-not-utf8", "b.txt:1: text is not UTF-8",
     lambda w, t: ["data", "download", "--local", str(_bytes(t, "b.txt", b"caf\xe9\n")),
                   "--save-dir", str(t / "ds")]),
    ("local-missing-field", "no 'text' field for stage pt",
     lambda w, t: ["data", "download", "--local", str(_jsonl(t, ['{"body": "a"}'])),
                   "--save-dir", str(t / "ds")]),
    ("local-unknown-text-field", "no field 'body' (given for text)",
     lambda w, t: ["data", "download", "--local", str(_jsonl(t, ['{"text": "a"}'])),
                   "--text-field", "body", "--save-dir", str(t / "ds")]),
    ("local-unknown-stage", "unknown stage 'rl'; choose from",
     lambda w, t: ["data", "download", "--local", str(_jsonl(t, ['{"text": "a"}'])),
                   "--stage", "rl", "--save-dir", str(t / "ds")]),
    ("local-sft-messages-not-a-list", "expected a list of messages, got str",
     lambda w, t: ["data", "download", "--local",
                   str(_jsonl(t, ['{"messages": "hi"}'])), "--stage", "sft",
                   "--save-dir", str(t / "ds")]),
    ("local-name-escapes", "--name '../../escaped' must be a plain name",
     lambda w, t: ["data", "download", "--local", str(_jsonl(t, ['{"text": "a"}'])),
                   "--name", "../../escaped", "--save-dir", str(t / "ds")]),
    ("local-name-absolute", re.compile(r"--name '\S*/abs' must be a plain name"),
     lambda w, t: ["data", "download", "--local", str(_jsonl(t, ['{"text": "a"}'])),
                   "--name", str(t / "abs"), "--save-dir", str(t / "ds")]),
    ("local-name-dotdot", "--name '..' must be a plain name",
     lambda w, t: ["data", "download", "--local", str(_jsonl(t, ['{"text": "a"}'])),
                   "--name", "..", "--save-dir", str(t / "ds")]),
    # -- train-tokenizer --------------------------------------------------------------------------------
    ("tokenizer-out-is-a-file", re.compile(r"--out \S*/tok exists and is not a folder doge wrote"),
     lambda w, t: ["data", "train-tokenizer", "--out", str(_file(t, "tok", "mine")),
                   "--datasets-dir", str(w.ds), "--vocab-size", "400"]),
    ("tokenizer-out-foreign-folder", re.compile(r"--out \S*/mine holds files doge did not write"),
     lambda w, t: ["data", "train-tokenizer", "--out", str(_foreign(t)),
                   "--datasets-dir", str(w.ds), "--vocab-size", "400"]),
    ("tokenizer-vocab-too-small", "--vocab-size must be at least 300",
     lambda w, t: ["data", "train-tokenizer", "--out", str(t / "tok"),
                   "--datasets-dir", str(w.ds), "--vocab-size", "10"]),
    ("tokenizer-vocab-absurd", "--vocab-size 1,000,000,000,000 is beyond any Doge size",
     lambda w, t: ["data", "train-tokenizer", "--out", str(t / "tok"),
                   "--datasets-dir", str(w.ds), "--vocab-size", "1000000000000"]),
    ("tokenizer-no-datasets", re.compile(r"no datasets under \S*/none"),
     lambda w, t: ["data", "train-tokenizer", "--out", str(t / "tok"),
                   "--datasets-dir", str(t / "none")]),
    ("tokenizer-from-missing", re.compile(r"unknown tokenizer '\S*/none': no such folder"),
     lambda w, t: ["data", "train-tokenizer", "--out", str(t / "tok"),
                   "--datasets-dir", str(w.ds), "--from", str(t / "none")]),
    ("tokenizer-from-hub-offline", "tokenizer 'SmallDoge/Doge-tokenizer' is a hub id but the hub is offline",
     lambda w, t: ["data", "train-tokenizer", "--out", str(t / "tok"),
                   "--datasets-dir", str(w.ds), "--from", "SmallDoge/Doge-tokenizer"]),
    # -- tokenize ---------------------------------------------------------------------------------------
    ("tokenize-missing-tokenizer", re.compile(r"unknown tokenizer '\S*/none': no such folder"),
     lambda w, t: ["data", "tokenize", "--tokenizer", str(t / "none"),
                   "--datasets-dir", str(w.ds)]),
    ("tokenize-folder-not-a-tokenizer", "is not a tokenizer folder (no tokenizer.json)",
     lambda w, t: ["data", "tokenize", "--tokenizer", str(_foreign(t)),
                   "--datasets-dir", str(w.ds)]),
    ("tokenize-hub-id-offline", "tokenizer 'SmallDoge/Doge-tokenizer' is a hub id but the hub is offline",
     lambda w, t: ["data", "tokenize", "--tokenizer", "SmallDoge/Doge-tokenizer",
                   "--datasets-dir", str(w.ds)]),
    ("tokenize-max-length-zero", "--max-length must be at least 16",
     lambda w, t: ["data", "tokenize", "--tokenizer", str(w.tok), "--datasets-dir",
                   str(w.ds), "--max-length", "0"]),
    ("tokenize-max-length-absurd", "--max-length 99,999,999,999 is beyond any Doge context",
     lambda w, t: ["data", "tokenize", "--tokenizer", str(w.tok), "--datasets-dir",
                   str(w.ds), "--max-length", "99999999999"]),
    ("tokenize-unknown-stage", "unknown stage 'rl'; choose from",
     lambda w, t: ["data", "tokenize", "--tokenizer", str(w.tok), "--datasets-dir",
                   str(w.ds), "--stage", "rl"]),
    ("tokenize-unknown-source", "no source 'wiki' under",
     lambda w, t: ["data", "tokenize", "--tokenizer", str(w.tok), "--datasets-dir",
                   str(w.ds), "--stage", "pt", "--source", "wiki"]),
    ("tokenize-no-stage-folders", "no stage folders under",
     lambda w, t: ["data", "tokenize", "--tokenizer", str(w.tok), "--datasets-dir",
                   str(t)]),
    ("tokenize-last-stage-empty", "sft/chatterbot: nothing left after tokenizing",
     lambda w, t: ["data", "tokenize", "--tokenizer", str(w.tok), "--datasets-dir",
                   str(w.ds), "--stage", "pt", "--stage", "sft", "--max-length", "16"]),
    ("tokenize-shard-out-of-range", "--shard 2/2: the index must be at least 0 and below the count",
     lambda w, t: ["data", "tokenize", "--tokenizer", str(w.tok), "--datasets-dir",
                   str(w.ds), "--stage", "pt", "--shard", "2/2"]),
    ("tokenize-shard-not-a-fraction", "bad --shard 'half'",
     lambda w, t: ["data", "tokenize", "--tokenizer", str(w.tok), "--datasets-dir",
                   str(w.ds), "--shard", "half"]),
    ("tokenize-shard-of-a-chat-stage", "--shard splits pretraining sources across machines",
     lambda w, t: ["data", "tokenize", "--tokenizer", str(w.tok),
                   "--datasets-dir", str(w.ds), "--stage", "sft", "--shard", "0/2"]),
    ("tokenize-zero-processes", "--num-proc must be at least 1",
     lambda w, t: ["data", "tokenize", "--tokenizer", str(w.tok), "--datasets-dir",
                   str(w.ds), "--stage", "pt", "--num-proc", "0"]),
    # -- merge ------------------------------------------------------------------------------------------
    ("merge-nothing-tokenized", "no tokenized pt data under",
     lambda w, t: ["data", "merge", "--datasets-dir", str(t)]),
    ("merge-pt-a-shard-missing", "lacks shard 1 of 2",
     lambda w, t: ["data", "merge", "--datasets-dir",
                   str(_tokenized_pt(t, shard="shard-00000-of-00002"))]),
    ("merge-pt-former-column-format", "holds pretraining data in the older int32 column format",
     lambda w, t: ["data", "merge", "--datasets-dir", str(_tokenized_pt(t, old=True))]),
    ("merge-bad-ratio", "bad --ratio 'bible-kjv';",
     lambda w, t: ["data", "merge", "--datasets-dir", str(w.ds), "--ratio", "bible-kjv"]),
    ("merge-nan-ratio", "bad --ratio 'bible-kjv=nan'",
     lambda w, t: ["data", "merge", "--datasets-dir", str(w.ds), "--ratio", "bible-kjv=nan"]),
    ("merge-inf-ratio", "bad --ratio 'bible-kjv=inf'",
     lambda w, t: ["data", "merge", "--datasets-dir", str(w.ds), "--ratio", "bible-kjv=inf"]),
    ("merge-negative-ratio", "bad --ratio 'bible-kjv=-2'",
     lambda w, t: ["data", "merge", "--datasets-dir", str(w.ds), "--ratio", "bible-kjv=-2"]),
    ("merge-unknown-source-ratio", "--ratio names 'wiki', not a tokenized pt source",
     lambda w, t: ["data", "merge", "--datasets-dir", str(w.ds), "--ratio", "wiki=1"]),
    ("merge-all-ratios-zero", "every ratio is 0",
     lambda w, t: ["data", "merge", "--datasets-dir", str(w.ds), "--ratio", "bible-kjv=0"]),
    ("merge-too-many-test-rows", re.compile(r"only [\d,]+ rows at these ratios; lower --test-examples"),
     lambda w, t: ["data", "merge", "--datasets-dir", str(w.ds), "--test-examples",
                   "100000"]),
    ("merge-zero-train", "--train-examples must be positive",
     lambda w, t: ["data", "merge", "--datasets-dir", str(w.ds), "--train-examples", "0"]),
    ("merge-absurd-train", "--train-examples 1,000,000,000,000 would repeat",
     lambda w, t: ["data", "merge", "--datasets-dir", str(w.ds), "--train-examples",
                   "1000000000000"]),
    ("merge-unknown-stage", "unknown stage 'rl'; choose from",
     lambda w, t: ["data", "merge", "--datasets-dir", str(w.ds), "--stage", "rl"]),
    # -- train: data, models, output folders, resume, launchers ---------------------------------------
    ("train-missing-data", re.compile(r"no dataset at \S*/none"),
     lambda w, t: _pt(w, t, f"data.path={t / 'none'}")),
    ("train-data-is-a-file", re.compile(r"/d\.txt is not a saved dataset"),
     lambda w, t: _pt(w, t, f"data.path={_file(t, 'd.txt', 'x')}")),
    ("train-data-not-a-dataset", re.compile(r"/mine is not a saved dataset"),
     lambda w, t: _pt(w, t, f"data.path={_foreign(t)}")),
    ("train-pt-on-sft-data", "was made for stage sft ('doge data merge --stage sft'), not for pt",
     lambda w, t: _pt(w, t, f"data.path={w.sft}")),
    ("train-length-mismatch", "holds 64-token blocks but data.max_length is 32",
     lambda w, t: _pt(w, t, "data.max_length=32")),
    ("train-no-tokenizer-anywhere", re.compile(r"unknown tokenizer '\S*/none': no such folder"),
     lambda w, t: _pt(w, t, f"data.tokenizer={t / 'none'}")),
    ("train-sft-without-model", "sft needs a model to start from",
     lambda w, t: _post("sft", w, t)),
    ("train-dpo-without-model", "dpo needs a model to start from",
     lambda w, t: _post("dpo", w, t)),
    ("train-grpo-without-model", "grpo needs a model to start from",
     lambda w, t: _post("grpo", w, t)),
    ("train-sft-model-missing", re.compile(r"model folder \S*/none does not exist"),
     lambda w, t: _post("sft", w, t, model=t / "none")),
    ("train-sft-model-no-config", "has no config.json; it is not a Hugging Face model folder",
     lambda w, t: _post("sft", w, t, model=_foreign(t))),
    ("train-sft-model-broken-config", "config.json is not valid JSON",
     lambda w, t: _post("sft", w, t, model=_bad_config(w, t))),
    ("train-sft-model-truncated-weights", "are corrupt or unreadable",
     lambda w, t: _post("sft", w, t, model=_bad_weights(w, t))),
    ("train-sft-model-not-doge", "holds a 'llama' model, not a Doge",
     lambda w, t: _post("sft", w, t, model=_not_doge(w, t))),
    ("train-sft-model-hub-offline", "SmallDoge/Doge-20M is not in the local hub cache and the hub cannot be reached",
     lambda w, t: _post("sft", w, t, model="SmallDoge/Doge-20M")),
    ("train-dpo-on-pt-data", "was made for stage pt ('doge data merge --stage pt'), not for dpo",
     lambda w, t: _post("dpo", w, t, f"data.path={w.pt}", model=w.model)),
    ("train-grpo-on-sft-data", "was made for stage sft ('doge data merge --stage sft'), not for grpo",
     lambda w, t: _post("grpo", w, t, f"data.path={w.sft}", model=w.model)),
    ("train-pt-small-vocab-init", re.compile(r"tokenizer has 400 tokens but model \S+ has a vocabulary of 64"),
     lambda w, t: _pt(w, t, f"init_from={w.root / 'model-small-vocab'}")),
    ("train-output-is-a-file", re.compile(r"output_dir \S*/out is a file"),
     lambda w, t: _pt(w, t, f"output_dir={_file(t, 'out', 'mine')}")),
    ("train-output-foreign", "holds files that are not a doge run",
     lambda w, t: _pt(w, t, f"output_dir={_foreign(t, 'run')}")),
    ("train-output-foreign-overwrite", "holds files that are not a doge run",
     lambda w, t: [*_pt(w, t, f"output_dir={_foreign(t, 'run')}"), "--overwrite"]),
    ("train-existing-run", "already holds a doge run; pass --resume auto",
     lambda w, t: _pt(w, t, f"output_dir={_run_copy(w, t)}")),
    ("train-resume-and-overwrite", "--resume and --overwrite contradict each other",
     lambda w, t: [*_pt(w, t), "--resume", "auto", "--overwrite"]),
    ("train-resume-not-a-checkpoint", re.compile(r"/mine is not a complete checkpoint folder"),
     lambda w, t: [*_pt(w, t), "--resume", str(_foreign(t))]),
    ("train-resume-all-weights-truncated", re.compile(r"can be resumed \(.*model\.safetensors has [\d,]+ bytes"),
     lambda w, t: [
        *_pt(w, t, f"output_dir={_run_copy(w, t, lambda c: _truncate(c / 'model.safetensors'))}",
             "checkpoint.every=1"), "--resume", "auto"]),
    ("train-resume-all-optimizers-damaged", re.compile(r"can be resumed \(.*optimizer\.pt has 4 bytes, not the"),
     lambda w, t: [
        *_pt(w, t, f"output_dir={_run_copy(w, t, lambda c: (c / 'optimizer.pt').write_bytes(b'junk'))}",
             "checkpoint.every=1"), "--resume", "auto"]),
    ("train-resume-all-states-empty", re.compile(r"can be resumed \(.*state\.json is unreadable"),
     lambda w, t: [
        *_pt(w, t, f"output_dir={_run_copy(w, t, lambda c: (c / 'state.json').write_text(''))}",
             "checkpoint.every=1"), "--resume", "auto"]),
    ("train-resume-all-rng-empty", re.compile(r"can be resumed \(.*rank-00000\.pt has 0 bytes, not the"),
     lambda w, t: [
        *_pt(w, t, f"output_dir={_run_copy(w, t, lambda c: (c / 'rank-00000.pt').write_bytes(b''))}",
             "checkpoint.every=1"), "--resume", "auto"]),
    ("train-resume-broken-checkpoint-by-path", re.compile(r"^doge: error: checkpoint \S+: model\.safetensors has "),
     lambda w, t: [
        *_pt(w, t, f"output_dir={_run_copy(w, t, lambda c: _truncate(c / 'model.safetensors'))}",
             "checkpoint.every=1"), "--resume", str(t / "run" / "checkpoints" / "step-000001")]),
    ("train-resume-changed-config", "the config changed (optim.lr: ",
     lambda w, t: [*_pt(w, t, f"output_dir={_run_copy(w, t)}", "checkpoint.every=1",
                        "optim.lr=0.1"), "--resume", "auto"]),
    ("train-hub-push-without-repo", "hub.push is true but hub.repo is not set",
     lambda w, t: _pt(w, t, "hub.push=true")),
    ("train-hub-push-offline", "pushing to the hub needs hub access, and HF_HUB_OFFLINE",
     lambda w, t: _pt(w, t, "hub.push=true", "hub.repo=me/doge-run")),
    ("train-hub-push-bad-repo", "hub.repo 'nope' is not a hub repo id",
     lambda w, t: _pt(w, t, "hub.push=true", "hub.repo=nope")),
    ("train-moe-warmup-on-a-dense-model", "train.moe_warmup_steps needs a CDMoE model",
     lambda w, t: _pt(w, t, "train.moe_warmup_steps=2")),
    ("train-unknown-tracker", "'logging.report_to.0' = 'mlflow'",
     lambda w, t: _pt(w, t, "logging.report_to=[mlflow]")),
    ("train-wandb-without-login", "wandb has no login here",
     lambda w, t: (_pt(w, t, "logging.report_to=[wandb]"),
                   {"HOME": str(t), "WANDB_API_KEY": "", "WANDB_MODE": "online"})),
    # -- upcycle ------------------------------------------------------------------------------------
    ("upcycle-not-square", "--num-experts 20 is not a perfect square",
     lambda w, t: ["upcycle", str(w.model), "--num-experts", "20", "--out", str(t / "moe")]),
    ("upcycle-topk-above-experts", "--experts-per-token 17 must be between 1 and --num-experts (16)",
     lambda w, t: ["upcycle", str(w.model), "--num-experts", "16",
                   "--experts-per-token", "17", "--out", str(t / "moe")]),
    ("upcycle-bad-init", "unknown --init 'kaiming'",
     lambda w, t: ["upcycle", str(w.model), "--num-experts", "16", "--experts-per-token", "4",
                   "--init", "kaiming", "--out", str(t / "moe")]),
    ("upcycle-missing-model", re.compile(r"model folder \S*/none does not exist"),
     lambda w, t: ["upcycle", str(t / "none"), "--out", str(t / "moe")]),
    ("upcycle-no-out", "Missing option '--out'",
     lambda w, t: ["upcycle", str(w.model)]),
    ("upcycle-already-moe", "is already a CDMoE model (16 experts)",
     lambda w, t: ["upcycle", str(_moe(w, t)), "--num-experts", "16", "--experts-per-token",
                   "4", "--out", str(t / "again")]),
    ("upcycle-out-foreign", re.compile(r"--out \S*/mine holds files doge did not write"),
     lambda w, t: ["upcycle", str(w.model), "--num-experts", "16", "--experts-per-token", "4",
                   "--out", str(_foreign(t))]),
    # -- average ------------------------------------------------------------------------------------
    ("upcycle-out-is-the-dense-model", re.compile(r"--out \S*/m is the dense model"),
     lambda w, t: ["upcycle", str(_model_copy(w, t)), "--num-experts", "16",
                   "--experts-per-token", "4", "--out", str(t / "m")]),
    ("average-out-is-the-template", re.compile(r"--out \S*/m is the template"),
     lambda w, t: ["average", "--run", str(w.run), "--last", "2", "--template",
                   str(_model_copy(w, t)), "--out", str(t / "m")]),
    ("average-out-inside-the-run", re.compile(r"--out \S*/run/avg sits inside the run"),
     lambda w, t: ["average", "--run", str(_run_copy(w, t)), "--last", "2", "--out",
                   str(t / "run" / "avg")]),
    ("train-output-dir-is-the-start-model", re.compile(r"output_dir \S*/m is the start model \(init_from\)"),
     lambda w, t: _post("sft", w, t, f"output_dir={_model_copy(w, t)}",
                        model=t / "m")),
    ("report-out-inside-a-run", re.compile(r"--out \S*/run/report\.md sits inside the run"),
     lambda w, t: ["report", str(_run_copy(w, t)), "--out", str(t / "run" / "report.md")]),
    ("local-save-dir-inside-the-input", "sits inside the --local input",
     lambda w, t: ["data", "download", "--local",
                   str(_jsonl(t, ['{"text": "a"}']).parent), "--stage", "pt",
                   "--save-dir", str(t / "ds")]),
    ("average-no-out", "--out is required",
     lambda w, t: ["average", "--run", str(w.run), "--last", "2"]),
    ("average-nothing", "nothing to average",
     lambda w, t: ["average", "--out", str(t / "avg")]),
    ("average-unknown-method", "unknown --method 'median'",
     lambda w, t: ["average", "--run", str(w.run), "--method", "median", "--out",
                   str(t / "avg")]),
    ("average-ema-bad-alpha", "--alpha 1.5 must be in (0, 1]",
     lambda w, t: ["average", "--run", str(w.run), "--last", "2", "--method", "ema",
                   "--alpha", "1.5", "--out", str(t / "avg")]),
    ("average-last-too-many", "--last 9 asks for more checkpoints than run",
     lambda w, t: ["average", "--run", str(w.run), "--last", "9", "--out", str(t / "avg")]),
    ("average-run-missing", re.compile(r"run folder \S*/none does not exist"),
     lambda w, t: ["average", "--run", str(t / "none"), "--out", str(t / "avg")]),
    ("average-run-and-checkpoints", "give checkpoint folders or --run, not both",
     lambda w, t: ["average", str(w.run / "checkpoints" / "step-000001"), "--run",
                   str(w.run), "--out", str(t / "avg")]),
    ("average-not-a-checkpoint", re.compile(r"/mine has no model\.safetensors; give checkpoint folders"),
     lambda w, t: ["average", str(_foreign(t)), "--out", str(t / "avg")]),
    ("average-truncated-checkpoint", re.compile(r"cannot read \S*/model\.safetensors \(.*\); it is damaged"),
     lambda w, t: [
        "average", "--run", str(_run_copy(w, t, lambda c: _truncate(c / "model.safetensors"))), "--last", "2",
        "--out", str(t / "avg")]),
    ("average-run-without-final", "has no final/ model yet",
     lambda w, t: [
        "average", "--run", str(_run_copy(w, t, lambda c: shutil.rmtree(c.parent.parent / "final",
                                             ignore_errors=True))),
        "--last", "2", "--out", str(t / "avg")]),
    ("average-out-foreign", re.compile(r"--out \S*/mine holds files doge did not write"),
     lambda w, t: ["average", "--run", str(w.run), "--last", "2", "--out",
                   str(_foreign(t))]),
    # -- push (the tests are offline: a push that gets past its checks is refused for that; the model folder
    # is checked before the hub, offline or not) ----------------------------------------------------------
    ("push-offline", "pushing to the hub needs hub access, and HF_HUB_OFFLINE",
     lambda w, t: ["push", str(w.model), "--repo", "me/doge-tiny"]),
    ("push-bad-repo-id", "--repo 'not a repo' is not a hub repo id",
     lambda w, t: ["push", str(w.model), "--repo", "not a repo"]),
    ("push-no-repo", "Missing option '--repo'",
     lambda w, t: ["push", str(w.model)]),
    ("push-not-a-model", re.compile(r"/mine has no config\.json, so it is not a model folder"),
     lambda w, t: ["push", str(_foreign(t)), "--repo", "me/doge-tiny"]),
    ("push-missing-folder", re.compile(r"/none is not a folder; give a model folder"),
     lambda w, t: ["push", str(t / "none"), "--repo", "me/doge-tiny"]),
    ("push-bad-license", "--license 'Apache 2.0!' is not a license identifier",
     lambda w, t: ["push", str(w.model), "--repo", "me/doge-tiny", "--license", "Apache 2.0!"]),
    ("push-model-without-weights", re.compile(r"/m has no model\.safetensors, so it is not a model folder"),
     lambda w, t: ["push", str(_without_weights(w, t)), "--repo", "me/doge-tiny"]),
    ("push-not-a-model-online", re.compile(r"/mine has no config\.json, so it is not a model folder"),
     lambda w, t: (["push", str(_foreign(t)), "--repo", "me/doge-tiny"], _ONLINE)),
    # Outside the tests no TRITON_INTERPRET is set: the kernel cannot run on a CPU and says so.
    ("train-triton-on-cpu", "attention backend 'triton' cannot run on cpu",
     lambda w, t: (_pt(w, t, "runtime.attn_implementation=triton"), {"TRITON_INTERPRET": "0"})),
    ("train-unknown-backend", "'runtime.attn_implementation' = 'flash'",
     lambda w, t: _pt(w, t, "runtime.attn_implementation=flash")),
    # A GPU preset where there is no GPU (hidden here, should the suite run on a GPU machine).
    ("train-gpu-preset-without-gpu", re.compile(r"hardware preset rtx4090 .* needs a CUDA GPU"),
     lambda w, t: (["train", "pt", "--hardware", "rtx4090", *TINY, f"data.path={w.pt}",
                    f"output_dir={t / 'run'}"], {"CUDA_VISIBLE_DEVICES": ""})),
    ("train-cuda-device-without-gpu", "runtime.device=cuda needs a CUDA GPU, but this machine has",
     lambda w, t: (_pt(w, t, "runtime.device=cuda"), {"CUDA_VISIBLE_DEVICES": ""})),
    ("train-accelerate-config-missing", re.compile(r"accelerate config \S*/none\.yaml does not exist"),
     lambda w, t: [*_pt(w, t), "--accelerate-config", str(t / "none.yaml")]),
    ("train-accelerate-config-broken-yaml", "launcher.yaml is not valid (while parsing",
     lambda w, t: [*_pt(w, t), "--accelerate-config",
                   str(_accelerate(t, "distributed_type: [MULTI_GPU"))]),
    ("train-accelerate-config-unknown-key", "had unknown keys",
     lambda w, t: [*_pt(w, t), "--accelerate-config",
                   str(_accelerate(t, "distributed_type: MULTI_GPU\nturbo: true\n"))]),
    ("train-accelerate-config-bad-type", "'QUANTUM' is not a valid DistributedType",
     lambda w, t: [*_pt(w, t), "--accelerate-config",
                   str(_accelerate(t, "distributed_type: QUANTUM\n"))]),
    ("train-accelerate-config-not-mapping", "launcher.yaml is not valid ('list' object",
     lambda w, t: [*_pt(w, t), "--accelerate-config",
                   str(_accelerate(t, "- 1\n- 2\n"))]),
    ("train-accelerate-deepspeed-json-missing", re.compile(r"DeepSpeed config \S*/ds\.json, which does not exist"),
     lambda w, t: [*_pt(w, t), "--accelerate-config", str(_accelerate(
        t, f"distributed_type: DEEPSPEED\ndeepspeed_config:\n  deepspeed_config_file: {t / 'ds.json'}\n"))]),
    ("train-accelerate-deepspeed-json-broken", "ds.json is not valid JSON",
     lambda w, t: [*_pt(w, t), "--accelerate-config", str(_accelerate(
        t, f"distributed_type: DEEPSPEED\ndeepspeed_config:\n  deepspeed_config_file: {_file(t, 'ds.json', '{')}\n"))]),
    # -- eval -------------------------------------------------------------------------------------------
    ("eval-nothing-to-do", "give --model PATH (repeatable) to evaluate, or --compare",
     lambda w, t: ["eval"]),
    ("eval-output-dir-inside-the-model", re.compile(r"--output-dir \S*/m/eval sits inside the model"),
     lambda w, t: ["eval", "--model", str(_model_copy(w, t)), "--output-dir",
                   str(t / "m" / "eval"), "--datasets-dir", str(w.ds)]),
    ("eval-batch-size-zero", "--batch-size must be >= 1",
     lambda w, t: ["eval", "--model", str(w.model), "--batch-size", "0",
                   "--output-dir", str(t / "r")]),
    ("eval-max-samples-zero", "--max-samples must be >= 1",
     lambda w, t: ["eval", "--model", str(w.model), "--max-samples", "0",
                   "--output-dir", str(t / "r")]),
    ("eval-negative-fewshot", "--num-fewshot must be >= 0",
     lambda w, t: ["eval", "--model", str(w.model), "--num-fewshot", "-1",
                   "--output-dir", str(t / "r")]),
    ("eval-unknown-device", "unknown --device 'gpu7'",
     lambda w, t: ["eval", "--model", str(w.model), "--device", "gpu7",
                   "--output-dir", str(t / "r")]),
    ("eval-cuda-without-gpu", re.compile(r"--device cuda:3: (torch sees no CUDA GPU|there are only)"),
     lambda w, t: ["eval", "--model", str(w.model), "--device", "cuda:3",
                   "--output-dir", str(t / "r")]),
    ("eval-output-dir-is-a-file", re.compile(r"--output-dir \S*/r is a file"),
     lambda w, t: ["eval", "--model", str(w.model), "--output-dir",
                   str(_file(t, "r", "mine")), "--datasets-dir", str(w.ds)]),
    ("eval-results-file-foreign", re.compile(r"results file \S+\.json already exists and is not one doge wrote"),
     lambda w, t: ["eval", "--model", str(_model_copy(w, t, "m")), "--output-dir",
                   str(_foreign_results(t)), "--datasets-dir", str(w.ds)]),
    ("eval-unknown-task", "unknown task 'vibes'",
     lambda w, t: ["eval", "--model", str(w.model), "--tasks", "vibes", "--datasets-dir",
                   str(w.ds), "--output-dir", str(t / "r")]),
    ("eval-builtin-sets-missing", re.compile(r"builtin task [\w-]+ needs \S*/eval/"),
     lambda w, t: ["eval", "--model", str(w.model), "--datasets-dir", str(t),
                   "--output-dir", str(t / "r")]),
    ("eval-model-missing", re.compile(r"model folder \S*/none does not exist"),
     lambda w, t: ["eval", "--model", str(t / "none"), "--datasets-dir", str(w.ds),
                   "--output-dir", str(t / "r")]),
    ("eval-model-without-tokenizer", "model-no-tokenizer holds a model but no tokenizer",
     lambda w, t: ["eval", "--model", str(w.root / "model-no-tokenizer"),
                   "--datasets-dir", str(w.ds), "--output-dir", str(t / "r")]),
    ("eval-compare-missing", re.compile(r"results file \S*/none\.json does not exist"),
     lambda w, t: ["eval", "--compare", str(t / "none.json")]),
    ("eval-compare-not-json", "c.json is not a JSON results file",
     lambda w, t: ["eval", "--compare", str(_file(t, "c.json", "{oops"))]),
    ("eval-compare-not-results", "is not a doge eval results file (no 'model' and 'tasks')",
     lambda w, t: ["eval", "--compare", str(_file(t, "c.json", '{"a": 1}'))]),
    # -- chat -------------------------------------------------------------------------------------------
    ("chat-model-missing", re.compile(r"model folder \S*/none does not exist"),
     lambda w, t: ["chat", str(t / "none"), "--prompt", "hi"]),
    ("chat-not-a-model-folder", "has no config.json; it is not a Hugging Face model folder",
     lambda w, t: ["chat", str(_foreign(t)), "--prompt", "hi"]),
    ("chat-model-is-a-file", "model.bin is a file; pass the model folder",
     lambda w, t: ["chat", str(_file(t, "model.bin", "x")), "--prompt", "hi"]),
    ("chat-no-tokenizer", "model-no-tokenizer holds a model but no tokenizer",
     lambda w, t: ["chat", str(w.root / "model-no-tokenizer"), "--prompt", "hi"]),
    ("chat-hub-offline", "SmallDoge/Doge-20M-Instruct is not in the local hub cache",
     lambda w, t: ["chat", "SmallDoge/Doge-20M-Instruct", "--prompt", "hi"]),
    ("chat-max-new-tokens-zero", "max_new_tokens must be at least 1",
     lambda w, t: ["chat", str(w.model), "--prompt", "hi", "--max-new-tokens", "0"]),
    ("chat-temperature-zero", "temperature must be at least 0.0001",
     lambda w, t: ["chat", str(w.model), "--prompt", "hi", "--temperature", "0"]),
    ("chat-seed-out-of-range", "seed must be an integer from",  # once a traceback from torch's manual_seed
     lambda w, t: ["chat", str(w.model), "--prompt", "hi", "--greedy", "--seed", str(2**64)]),
    ("chat-temperature-nan", "temperature must be a finite number",
     lambda w, t: ["chat", str(w.model), "--prompt", "hi", "--temperature", "nan"]),
    ("chat-top-p-above-one", "top_p must be in (0, 1]",
     lambda w, t: ["chat", str(w.model), "--prompt", "hi", "--top-p", "2"]),
    ("chat-top-k-negative", "top_k must be >= 0",
     lambda w, t: ["chat", str(w.model), "--prompt", "hi", "--top-k", "-1"]),
    ("chat-repetition-penalty-zero", "repetition_penalty must be > 0",
     lambda w, t: ["chat", str(w.model), "--prompt", "hi",
                   "--repetition-penalty", "0"]),
    ("chat-unknown-device", "unknown --device 'tpu'",
     lambda w, t: ["chat", str(w.model), "--prompt", "hi", "--device", "tpu"]),
    ("chat-cuda-without-gpu", "--device cuda: torch sees no CUDA GPU here",
     lambda w, t: ["chat", str(w.model), "--prompt", "hi", "--device", "cuda"]),
    # -- serve ------------------------------------------------------------------------------------------
    ("serve-model-missing", re.compile(r"model folder \S*/none does not exist"),
     lambda w, t: ["serve", str(t / "none"), "--port", "0"]),
    ("serve-not-a-model-folder", "has no config.json; it is not a Hugging Face model folder",
     lambda w, t: ["serve", str(_foreign(t)), "--port", "0"]),
    ("serve-no-tokenizer", "model-no-tokenizer holds a model but no tokenizer",
     lambda w, t: ["serve", str(w.root / "model-no-tokenizer"), "--port", "0"]),
    ("serve-hub-offline", "SmallDoge/Doge-20M-Instruct is not in the local hub cache",
     lambda w, t: ["serve", "SmallDoge/Doge-20M-Instruct", "--port", "0"]),
    ("serve-max-batch-zero", "--max-batch must be at least 1",
     lambda w, t: ["serve", str(w.model), "--max-batch", "0"]),
    ("serve-max-new-tokens-zero", "--max-new-tokens must be at least 1",
     lambda w, t: ["serve", str(w.model), "--max-new-tokens", "0"]),
    ("serve-port-out-of-range", "--port 70000 is not a port",
     lambda w, t: ["serve", str(w.model), "--port", "70000"]),
    ("serve-host-unknown", "--host 'no-such-host.invalid' is not an address this machine can listen on",
     lambda w, t: ["serve", str(w.model), "--host", "no-such-host.invalid", "--port", "0"]),
    ("serve-api-key-empty", "--api-key is empty",
     lambda w, t: ["serve", str(w.model), "--api-key", " "]),
    ("serve-unknown-device", "unknown --device 'tpu'",
     lambda w, t: ["serve", str(w.model), "--port", "0", "--device", "tpu"]),
    ("serve-max-connections-zero", "--max-connections must be at least 1",
     lambda w, t: ["serve", str(w.model), "--max-connections", "0"]),
    ("serve-unknown-dtype", "unknown --dtype 'fp16'; choose auto, fp32, bf16",
     lambda w, t: ["serve", str(w.model), "--port", "0", "--dtype", "fp16"]),
    ("chat-unknown-quantize", "unknown --quantize 'int4'; choose int8",
     lambda w, t: ["chat", str(w.model), "--prompt", "hi", "--quantize", "int4"]),
    ("eval-int8-on-a-gpu", re.compile(r"--device cuda: torch sees no CUDA GPU|--quantize int8 runs on the CPU only"),
     lambda w, t: ["eval", "--model", str(w.model), "--quantize", "int8", "--device", "cuda",
                   "--output-dir", str(t / "r")]),
    ("usage-text-for-int-port", "Invalid value for '--port'",
     lambda w, t: ["serve", str(w.model), "--port", "eighty"]),
]


def _bad_config(w, t: Path) -> Path:
    m = _model_copy(w, t)
    (m / "config.json").write_text("{not json")
    return m


def _snapshot(*roots: Path) -> dict[str, str]:
    out = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
            elif path.is_dir():
                out[str(path)] = "dir"
    return out


def test_the_corpus_is_large():
    assert len(CASES) >= 100 and len({name for name, _, _ in CASES}) == len(CASES)
    assert all(isinstance(expected, (str, re.Pattern)) and expected for _, expected, _ in CASES)


@pytest.mark.parametrize("name, expected, case", CASES, ids=[name for name, _, _ in CASES])
def test_bad_input_is_one_clean_line(w, tmp_path, capfd, monkeypatch, name, expected, case):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("DOGE_PLAIN_LOGS", "1")
    scratch = tmp_path / "t"
    scratch.mkdir()
    argv = case(w, scratch)
    if isinstance(argv, tuple):
        argv, env = argv
        for key, value in env.items():
            monkeypatch.setenv(key, value)
    had_run = (scratch / "run").exists()
    before = _snapshot(w.root, scratch)
    capfd.readouterr()
    with pytest.raises(SystemExit) as exc:
        run([str(a) for a in argv])
    out, err = capfd.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert exc.value.code == 2, (out[-2000:], err[-2000:])
    assert "Traceback" not in out + err, err[-3000:]
    assert 1 <= len(lines) <= 2 and lines[0].startswith("doge: error: "), err[-3000:]
    if isinstance(expected, re.Pattern):
        assert expected.search(lines[0]), f"{name}: expected a match for {expected.pattern!r} in: {lines[0]}"
    else:
        assert expected in lines[0], f"{name}: expected {expected!r} in: {lines[0]}"
    if len(lines) == 2:
        assert lines[1].startswith("Try '") and lines[1].endswith("--help' for help."), err
    assert _snapshot(w.root, scratch) == before, "a failed command changed files"
    if not had_run:
        assert not (scratch / "run").exists(), "a failed start left a run folder behind"
