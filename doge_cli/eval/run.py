"""``doge eval``: lighteval's Pipeline in-process on a Doge model, results as JSON and a rich table.

Results file (``<output-dir>/<model-slug>.json``, written atomically; ``model_path`` is a local model folder's resolved
path, which `doge report` matches runs by)::

    {"model": ..., "created": ..., "num_fewshot": k, "max_samples": n | null, "use_chat_template": bool,
     "versions": {"doge": ..., "lighteval": ...},
     "tasks": {"heldout-ppl": {"word_perplexity": ..., "byte_perplexity": ..., "bits_per_byte": ...},
               "chatterbot-mc": {"acc": ..., "acc_stderr": ..., "acc_norm": ..., ...},
               "arithmetic": {"em": ..., "em_stderr": ...}, ...},
     "baselines": {"heldout-ppl": {"unigram": {...same perplexity keys..., "token_perplexity", "tokens"}}}}

Stage tasks (:mod:`doge_cli.eval.stages`) add entries such as ``"preference": {"accuracy": ...,
"accuracy_stderr": ..., "margin": ..., "samples": n}``; with ``--reference`` the file names it.

A task family (mmlu, bigbench_hard) also gets an entry under its own name: the mean of each metric
over its subtasks. Comparing (``--model A --model B`` or ``--compare a.json b.json``) lays such
files side by side.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable
from pathlib import Path

from doge_cli.errors import DogeError

FAMILIES = ("mmlu", "bigbench_hard")  # one requested name that lighteval runs as many subtasks


def model_slug(model: str) -> str:
    """A file name for a model path or hub id: ``runs/pt/final`` -> ``runs-pt-final``. A model folder that
    exists gets the last three parts of its resolved path and a hash of the whole, so two folders never
    share a results file (``exp1/runs/sft/final`` and ``exp2/runs/sft/final``, or ``final`` typed in two runs)."""
    folder = Path(str(model)).expanduser()
    if folder.is_dir():
        resolved = folder.resolve()
        tail = "-".join(resolved.parts[-3:])
        digest = hashlib.sha1(str(resolved).encode("utf-8")).hexdigest()[:8]
        return f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', tail).strip('-.') or 'model'}-{digest}"
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(model).strip("./")).strip("-.")
    return slug or "model"


def model_path(model: str) -> str | None:
    """The resolved path of a local model folder (None for a hub id): what `doge report` matches runs by."""
    folder = Path(str(model)).expanduser()
    return str(folder.resolve()) if folder.is_dir() else None


def _task_results(final: dict) -> dict:
    """``{task: {metric: value}}`` from lighteval's final dict, with family means added."""
    tasks: dict[str, dict] = {}
    for key, metrics in final["results"].items():
        if key == "all":
            continue
        name = re.sub(r"[|:]\d+$", "", key)  # lighteval appends the few-shot count
        tasks[name] = {m: float(v) for m, v in metrics.items() if isinstance(v, int | float)}
    families: dict[str, list[dict]] = {}
    for name, metrics in tasks.items():
        if name.split(":")[0] in FAMILIES:
            families.setdefault(name.split(":")[0], []).append(metrics)
    for family, members in families.items():
        if family not in tasks:
            keys = set.intersection(*(set(m) for m in members))
            tasks[family] = {k: sum(m[k] for m in members) / len(members) for k in sorted(keys)
                             if not k.endswith("_stderr")}
            tasks[family]["subtasks"] = len(members)
    return tasks


def _in_order(tasks: dict, names: list[str]) -> dict:
    """Tasks in the order asked for (subtasks after their family), whatever order lighteval returns."""
    def rank(task: str) -> tuple[int, str]:
        family = task.split(":")[0]
        for i, name in enumerate(names):
            if task == name or family == name:
                return i, task
        return len(names), task

    return {t: tasks[t] for t in sorted(tasks, key=rank)}


def _baseline(pipeline, tokenizer) -> dict:
    from doge_cli.eval.baseline import unigram_baseline

    out = {}
    for full_name, docs in pipeline.documents_dict.items():
        name = full_name.rsplit("|", 1)[0]
        if name != "heldout-ppl":
            continue
        texts = [d.query for d in docs]
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        out[name] = {"unigram": {**unigram_baseline(ids, texts, len(tokenizer)), "fitted_on": "held-out text",
                                 "smoothing": "add-one"}}
    return out


def _run_pipeline(lm, tok, model: str, configs: list, names: list[str], *, num_fewshot: int,
                  max_samples: int | None, batch_size: int, use_chat_template: bool, system_prompt: str | None,
                  stop_together: Callable[[bool], bool] | None = None):
    """lighteval's Pipeline on the loaded model, with only ``configs`` registered; returns
    ``(pipeline, final results)``. Autograd is as it was afterwards (see ``lighteval_patches``)."""
    import tempfile

    import torch

    from doge_cli.eval import lighteval_patches as patches
    from doge_cli.eval.tasks import HUB_TASKS

    grad_mode = torch.is_grad_enabled()
    EvaluationTracker, ParallelismManager, Pipeline, PipelineParameters = patches.import_pipeline()
    from doge_cli.eval.lighteval_model import DogeLightevalModel

    wrapped = DogeLightevalModel(lm, tok, name=model_slug(model), batch_size=batch_size,
                                 use_chat_template=use_chat_template, system_prompt=system_prompt,
                                 stop_together=stop_together)
    # Perplexity has no few-shot form; every other task takes --num-fewshot.
    spec = ",".join(f"{c.name}|{0 if c.name == 'heldout-ppl' else num_fewshot}" for c in configs)
    params = PipelineParameters(launcher_type=ParallelismManager.NONE, max_samples=max_samples)
    with tempfile.TemporaryDirectory() as scratch, patches.only_these_tasks(configs), patches.quiet():
        tracker = EvaluationTracker(output_dir=scratch, save_details=False)
        try:
            pipeline = Pipeline(tasks=spec, pipeline_parameters=params, evaluation_tracker=tracker, model=wrapped)
        except Exception as err:
            hub = [n for n in names if n in HUB_TASKS]
            if not hub:
                raise
            first = " ".join(str(err).split())[:160]
            raise DogeError(f"could not load the data of {', '.join(hub)} from the hub ({type(err).__name__}: "
                            f"{first}); check the network, or use the builtin offline tasks: "
                            "heldout-ppl, chatterbot-mc, arithmetic") from err
        try:
            pipeline.evaluate()
            return pipeline, pipeline.get_results()
        finally:
            torch.set_grad_enabled(grad_mode)


def evaluate(model: str, *, tasks: list[str] | None = None, num_fewshot: int = 0, datasets_dir: Path = Path("datasets"),
             output_dir: Path | None = Path("eval_results"), max_samples: int | None = None, batch_size: int = 8,
             use_chat_template: bool = False, system_prompt: str | None = None, tokenizer: str | None = None,
             device: str | None = None, dtype: str = "auto", quantize: str | None = None,
             reference: str | None = None, max_new_tokens: int | None = None, log: Callable[[str], None] = lambda _m: None) -> dict:
    """Evaluate ``model`` (folder or hub id) on ``tasks`` (names or groups; default: the builtin tasks).

    Returns the results dict (the module docstring shows it) and, with ``output_dir``, writes it to
    ``<output_dir>/<model-slug>.json``; ``results["path"]`` is that file. ``reference`` (a model the
    evaluated one was tuned from) adds DPO's implicit-reward figures to the ``preference`` task;
    ``max_new_tokens`` caps the replies of the generative stage task (math-reward); by default 256, or
    half the model's context when that is shorter (said once through ``log``).
    """
    from doge_cli.eval.tasks import expand_task_names, task_configs

    check_settings(num_fewshot=num_fewshot, max_samples=max_samples, batch_size=batch_size)
    if output_dir is not None:
        from doge_cli.io import check_apart

        check_apart(output_dir, {"model": model, "reference model": reference}, "--output-dir")
        results_path(Path(output_dir), model)
    names = expand_task_names(tasks)
    configs = task_configs(names, Path(datasets_dir))

    log(f"loading {model}")
    from doge_cli.chat.loading import describe_precision, load_model_and_tokenizer

    lm, tok = load_model_and_tokenizer(model, tokenizer=tokenizer, device=device, dtype=dtype, quantize=quantize)
    if use_chat_template and not tok.chat_template:
        raise DogeError(f"the tokenizer of {model} has no chat template; drop --chat-template or pass --tokenizer")

    if "math-reward" in names:
        max_new_tokens = reply_budget(max_new_tokens, lm.config.max_position_embeddings, log)
    ref_model = None
    if reference is not None and "preference" in names:
        log(f"loading the reference {reference}")
        ref_model, _ = load_model_and_tokenizer(reference, tokenizer=tokenizer, device=device, dtype=dtype,
                                                quantize=quantize)

    started = time.perf_counter()
    found = evaluate_loaded(lm, tok, names, configs, name=model, datasets_dir=Path(datasets_dir),
                            num_fewshot=num_fewshot, max_samples=max_samples, batch_size=batch_size,
                            use_chat_template=use_chat_template, system_prompt=system_prompt, reference=ref_model,
                            max_new_tokens=max_new_tokens, log=log)
    from importlib.metadata import version

    from doge_cli import __version__

    results = {
        "model": model,
        "model_path": model_path(model),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "num_fewshot": num_fewshot,
        "max_samples": max_samples,
        "use_chat_template": use_chat_template,
        "precision": describe_precision(lm),
        "seconds": round(time.perf_counter() - started, 2),
        "versions": {"doge": __version__, "lighteval": version("lighteval")},
        "tasks": found["tasks"],
        "baselines": found["baselines"],
    }
    if ref_model is not None:
        results["reference"] = reference
    if output_dir is not None:
        results["path"] = str(save_results(results, Path(output_dir) / f"{model_slug(model)}.json"))
        log(f"results written to {results['path']}")
    return results


def evaluate_loaded(lm, tok, names: list[str], configs: list, *, name: str, datasets_dir: Path, num_fewshot: int = 0,
                    max_samples: int | None = None, batch_size: int = 8, use_chat_template: bool = False,
                    system_prompt: str | None = None, reference=None, max_new_tokens: int | None = None,
                    stop_together: Callable[[bool], bool] | None = None,
                    log: Callable[[str], None] = lambda _m: None) -> dict:
    """Run already expanded task ``names`` on a loaded model ``lm`` and its tokenizer ``tok``: what
    :func:`evaluate` does once the model is loaded, and what a training run does in-process
    (``logging.eval_tasks``).

    ``configs`` are the lighteval configs of ``names`` (:func:`doge_cli.eval.tasks.task_configs`), ``name``
    names the model in lighteval's records and messages, ``reference`` is a loaded reference model for the
    ``preference`` task, ``max_new_tokens`` caps math-reward's replies (:func:`reply_budget` by default),
    and ``stop_together`` (:func:`doge_cli.train.collective.stop_together`) keeps generation in step
    across processes whose forwards are collective. The model's train/eval mode and the autograd mode are
    the caller's to set. Returns ``{"tasks": {task: {metric: value}} in the order asked (family means
    added), "baselines": {...}}``, as in the results file.
    """
    from doge_cli.eval.stages import MATH_MAX_NEW_TOKENS, STAGE_TASKS, run_stage_task

    found: dict = {}
    baselines: dict = {}
    if configs:
        lighteval_names = [n for n in names if n not in STAGE_TASKS]
        log(f"importing lighteval and running {', '.join(lighteval_names)}")
        pipeline, final = _run_pipeline(lm, tok, name, configs, lighteval_names, num_fewshot=num_fewshot,
                                        max_samples=max_samples, batch_size=batch_size,
                                        use_chat_template=use_chat_template, system_prompt=system_prompt,
                                        stop_together=stop_together)
        found.update(_task_results(final))
        baselines = _baseline(pipeline, tok)
    budget = reply_budget(max_new_tokens, lm.config.max_position_embeddings, log) if "math-reward" in names \
        else MATH_MAX_NEW_TOKENS
    for task in (n for n in names if n in STAGE_TASKS):
        log(f"running {task}")
        found[task] = run_stage_task(task, lm, tok, datasets_dir=Path(datasets_dir), max_samples=max_samples,
                                     batch_size=batch_size, reference=reference, max_new_tokens=budget,
                                     log=log, stop_together=stop_together)
    return {"tasks": _in_order(found, names), "baselines": baselines}


def reply_budget(asked: int | None, context: int, log: Callable[[str], None]) -> int:
    """math-reward's longest reply: ``asked`` when the context leaves room for a prompt (DogeError before any
    task runs otherwise), else ``MATH_MAX_NEW_TOKENS`` capped at half the context (said through ``log``)."""
    from doge_cli.eval.stages import MATH_MAX_NEW_TOKENS

    default = MATH_MAX_NEW_TOKENS
    if asked is not None:
        if asked >= context:
            raise DogeError(f"--max-new-tokens {asked} leaves no room for a prompt in the model's {context}-token "
                            f"context; ask for at most {context // 2}")
        return asked
    if default > context // 2:
        log(f"math-reward replies are capped at {context // 2} new tokens, half the model's {context}-token "
            "context (--max-new-tokens to choose)")
        return context // 2
    return default


def check_settings(*, num_fewshot: int, max_samples: int | None, batch_size: int) -> None:
    """The numeric flags of ``doge eval``, checked before anything is loaded."""
    if num_fewshot < 0:
        raise DogeError("--num-fewshot must be >= 0")
    if max_samples is not None and max_samples < 1:
        raise DogeError("--max-samples must be >= 1")
    if batch_size < 1:
        raise DogeError("--batch-size must be >= 1")


def _is_results_file(path: Path) -> bool:
    from doge_cli.io import read_json_object

    data = read_json_object(path)
    return data is not None and "model" in data and isinstance(data.get("tasks"), dict)


def results_path(output_dir: Path, model: str) -> Path:
    """Where the results of ``model`` go, checked before the evaluation runs: ``--output-dir`` must be a
    folder (or not exist yet), and an existing file there is replaced only if it is a doge results file."""
    from doge_cli.io import check_file_target

    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise DogeError(f"--output-dir {output_dir} is a file; give a folder for the results")
    path = output_dir / f"{model_slug(model)}.json"
    if output_dir.is_dir():
        check_file_target(path, is_ours=_is_results_file, what="results file")
    return path


def save_results(results: dict, path: Path) -> Path:
    from doge_cli.io import check_file_target, write_json

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DogeError(f"cannot create {path.parent}: {err.strerror}; choose another --output-dir") from err
    check_file_target(path, is_ours=_is_results_file, what="results file")
    write_json(path, {k: v for k, v in results.items() if k != "path"})
    return path


def load_results(path: Path) -> dict:
    """A results file written by ``doge eval``; DogeError when it is missing or not one."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise DogeError(f"results file {path} does not exist; run `doge eval --output-dir DIR` first") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DogeError(f"{path} is not a JSON results file ({err})") from err
    if not isinstance(data, dict) or not isinstance(data.get("tasks"), dict) or "model" not in data:
        raise DogeError(f"{path} is not a doge eval results file (no 'model' and 'tasks')")
    data["path"] = str(path)
    return data
