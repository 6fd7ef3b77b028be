"""The tasks ``doge eval`` knows: builtin offline tasks on the held-out sets, and the seed's hub tasks.

Builtin tasks read ``<datasets-dir>/eval/<set>/test.jsonl`` (written by ``doge data download
--recipe quickstart``) as a lighteval task whose ``hf_repo`` is that local folder:

- ``heldout-ppl``: word/byte perplexity and bits per byte of the held-out documents (rolling
  log-likelihood over the whole document, see :mod:`doge_cli.eval.lighteval_model`);
- ``chatterbot-mc``: 4-way multiple choice on held-out chatterbot questions (``acc``: summed
  log-probability; ``acc_norm``: per character);
- ``arithmetic``: held-out maths problems, greedy answer, exact match after stripping.

Stage tasks (``stages``: sft-loss, chat-mc, preference, math-reward) measure what each training stage
is for; doge computes them itself (:mod:`doge_cli.eval.stages`).

Hub tasks are lighteval's own configs, loaded from just the lighteval modules that define them:
lighteval's registry imports every task module, and some do network I/O at import.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from doge_cli.errors import DogeError
from doge_cli.eval.stages import STAGE_TASKS

PROMPT = "Question: {question}\nAnswer:"


@dataclass(frozen=True)
class BuiltinTask:
    name: str
    folder: str  # under <datasets-dir>/eval/
    columns: tuple[str, ...]


BUILTIN_TASKS = {
    t.name: t
    for t in (
        BuiltinTask("heldout-ppl", "heldout-text", ("text",)),
        BuiltinTask("chatterbot-mc", "chatterbot-mc", ("question", "choices", "label")),
        BuiltinTask("arithmetic", "arithmetic", ("question", "answer")),
    )
}

# lighteval task name -> the module under lighteval.tasks.tasks that defines it
HUB_TASKS = {
    "hellaswag": "hellaswag", "arc:easy": "arc", "arc:challenge": "arc", "piqa": "piqa", "mmlu": "mmlu",
    "triviaqa": "triviaqa", "winogrande": "winogrande", "openbookqa": "openbookqa",
    "ifeval": "ifeval.main", "bigbench_hard": "bigbench_hard",
    "math_500": "math_500", "aime24": "aime", "gpqa:diamond": "gpqa",
}
ALIASES = {"arc-easy": "arc:easy", "arc-challenge": "arc:challenge", "bbh": "bigbench_hard",
           "math-500": "math_500", "gpqa-diamond": "gpqa:diamond", "heldout-text": "heldout-ppl"}
GROUPS = {
    "builtin": list(BUILTIN_TASKS),
    "stages": list(STAGE_TASKS),
    "base": ["hellaswag", "arc:easy", "arc:challenge", "piqa", "mmlu", "triviaqa", "winogrande", "openbookqa"],
    "instruct": ["ifeval", "bigbench_hard"],
    "reasoning": ["math_500", "aime24", "gpqa:diamond"],
}
GENERATION_SIZE = 24  # arithmetic answers are a few tokens; the stop sequence usually ends them sooner


def expand_task_names(names: list[str] | None) -> list[str]:
    """Split commas, expand groups and aliases, keep order, drop repeats; DogeError for an unknown name."""
    out: list[str] = []
    for raw in names or ["builtin"]:
        for name in filter(None, (n.strip() for n in raw.split(","))):
            name = ALIASES.get(name, name)
            members = GROUPS.get(name, [name])
            for member in members:
                if member not in BUILTIN_TASKS and member not in HUB_TASKS and member not in STAGE_TASKS:
                    known = ", ".join([*GROUPS, *BUILTIN_TASKS, *STAGE_TASKS, *HUB_TASKS])
                    raise DogeError(f"unknown task {name!r}; choose from: {known}")
                if member not in out:
                    out.append(member)
    return out


# ---------------------------------------------------------------- prompt functions (lighteval Docs)


def heldout_prompt(line: dict, task_name: str = ""):
    from lighteval.tasks.requests import Doc

    return Doc(task_name=task_name, query=line["text"], choices=None, gold_index=None)


def mc_prompt(line: dict, task_name: str = ""):
    from lighteval.tasks.requests import Doc

    return Doc(task_name=task_name, query=PROMPT.format(question=line["question"]),
               choices=[" " + c for c in line["choices"]], gold_index=int(line["label"]))


def arithmetic_prompt(line: dict, task_name: str = ""):
    from lighteval.tasks.requests import Doc

    return Doc(task_name=task_name, query=PROMPT.format(question=line["question"]),
               choices=[" " + str(line["answer"])], gold_index=0)


def _acc_norm():
    import numpy as np
    from lighteval.metrics.metrics_sample import LoglikelihoodAcc
    from lighteval.metrics.normalizations import LogProbCharNorm
    from lighteval.metrics.utils.metric_utils import SampleLevelMetric
    from lighteval.tasks.requests import SamplingMethod

    return SampleLevelMetric(metric_name="acc_norm", sample_level_fn=LoglikelihoodAcc(LogProbCharNorm()),
                             category=SamplingMethod.LOGPROBS, corpus_level_fn=np.mean, higher_is_better=True)


def _staged(jsonl: Path) -> Path:
    """A folder holding only a link to ``jsonl``. The eval set's own folder also holds the Arrow copy
    from ``save_to_disk``, which ``datasets.load_dataset`` refuses to read as a local dataset. The
    folder name is stable per source file, so datasets' cache is reused across runs."""
    import hashlib
    import os
    import tempfile

    key = hashlib.sha256(str(jsonl).encode()).hexdigest()[:16]
    stage = Path(tempfile.gettempdir()) / f"doge-eval-{os.getuid() if hasattr(os, 'getuid') else 0}" / key
    stage.mkdir(parents=True, exist_ok=True)
    link = stage / "test.jsonl"
    if not (link.is_symlink() and link.resolve() == jsonl.resolve()):
        tmp = stage / f".test.jsonl.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(jsonl)
        os.replace(tmp, link)
    return stage


def builtin_config(name: str, datasets_dir: Path, setting: str = "--datasets-dir"):
    """The LightevalTaskConfig of builtin task ``name`` on ``<datasets_dir>/eval/<set>/test.jsonl``; a missing
    file is a DogeError naming ``setting`` as the way to point at another datasets folder."""
    from lighteval.metrics.metrics import Metrics
    from lighteval.tasks.lighteval_task import LightevalTaskConfig

    task = BUILTIN_TASKS[name]
    folder = (Path(datasets_dir) / "eval" / task.folder).resolve()
    if not (folder / "test.jsonl").is_file():
        raise DogeError(f"builtin task {name} needs {folder}/test.jsonl; run `doge data download --recipe "
                        f"quickstart --save-dir {datasets_dir}` or pass {setting}")
    common = dict(name=name, hf_repo=str(_staged(folder / "test.jsonl")), hf_subset="default", hf_avail_splits=["test"],
                  evaluation_splits=["test"], few_shots_split="test", few_shots_select="random", version=0)
    if name == "heldout-ppl":
        return LightevalTaskConfig(prompt_function=heldout_prompt, generation_size=-1, few_shots_split=None,
                                   few_shots_select=None,
                                   metrics=[Metrics.word_perplexity, Metrics.byte_perplexity, Metrics.bits_per_byte],
                                   **{k: v for k, v in common.items() if not k.startswith("few_shots")})
    if name == "chatterbot-mc":
        return LightevalTaskConfig(prompt_function=mc_prompt, metrics=[Metrics.loglikelihood_acc, _acc_norm()],
                                   generation_size=-1, **common)
    return LightevalTaskConfig(prompt_function=arithmetic_prompt, metrics=[Metrics.exact_match],
                               generation_size=GENERATION_SIZE, stop_sequence=["\n"], **common)


def hub_configs(name: str) -> list:
    """lighteval's configs for hub task ``name`` (every subtask of a family such as mmlu)."""
    try:
        module = importlib.import_module(f"lighteval.tasks.tasks.{HUB_TASKS[name]}")
    except ImportError as err:
        raise DogeError(f"lighteval's {name} task cannot be imported ({err}); install what it names") from err
    configs = [c for c in module.TASKS_TABLE if c.name == name or c.name.startswith(name + ":")]
    if not configs:
        raise DogeError(f"lighteval {module.__name__} defines no task {name!r}; check the lighteval version")
    return configs


def task_configs(names: list[str], datasets_dir: Path, setting: str = "--datasets-dir") -> list:
    """lighteval configs for already expanded ``names`` (stage tasks run outside lighteval and have none);
    hub tasks need the hub (DogeError when offline); ``setting`` is what a missing-data error tells the user
    to change (``doge eval``'s flag, or the training config's key)."""
    from doge_cli.offline import hub_offline

    hub = [n for n in names if n in HUB_TASKS]
    if hub and hub_offline():
        raise DogeError(f"tasks {', '.join(hub)} read their data from the Hugging Face hub, which is offline "
                        f"(HF_HUB_OFFLINE); run them online or use the builtin offline tasks: "
                        f"{', '.join(BUILTIN_TASKS)}")
    configs = []
    for name in names:
        if name in STAGE_TASKS:
            continue
        configs.extend([builtin_config(name, datasets_dir, setting)] if name in BUILTIN_TASKS else hub_configs(name))
    return configs
