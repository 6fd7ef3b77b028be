"""Stage tasks: one held-out figure per training stage, measuring what that stage is for.

``doge eval --tasks stages`` (or any of these names) computes them with doge's own code on the test
splits that ``doge data merge --test-examples N`` held out, next to the lighteval tasks:

- ``sft-loss`` (SFT): mean cross-entropy of the assistant tokens of ``merged/sft``'s test split, every
  token weighted equally (:func:`doge_cli.eval.sft_loss.assistant_token_loss`); ``loss_stderr`` is the
  ratio estimator's standard error over conversations.
- ``chat-mc`` (SFT): the builtin chatterbot multiple choice asked in the chat format the model was tuned
  on: the question is the user turn rendered by the model's chat template, each choice the assistant
  reply (with its end-of-turn token). ``acc``: the choice with the highest summed log-probability;
  ``acc_norm``: the highest log-probability per character of the choice text.
- ``preference`` (DPO): on ``merged/dpo``'s test pairs, ``accuracy`` is the share of pairs whose chosen
  reply has a higher summed log-probability than the rejected one, ``margin`` the mean of log p(chosen)
  - log p(rejected) in nats. With a reference model (``doge eval --reference``, the SFT model a DPO
  run started from) it adds DPO's implicit reward: ``reward_accuracy`` (share of pairs where
  log p/p_ref of chosen exceeds that of rejected, as TRL's ``rewards/accuracies`` with any beta) and
  ``reward_margin`` (mean difference of those log-ratios, nats; TRL's ``rewards/margins`` / beta).
- ``math-reward`` (R1 distillation and GRPO): ``merged/grpo``'s test prompts (chat messages with the
  thinking-format system prompt) answered greedily, up to ``max_new_tokens`` new tokens (``doge eval
  --max-new-tokens``, default ``MATH_MAX_NEW_TOKENS``; use the GRPO run's max_completion_length), scored by
  the reward functions GRPO trains with: ``format`` (the thinking format), ``accuracy`` (the final
  answer equals the reference) and ``reward`` (their sum, GRPO's quickstart weighting). ``*_sampled``
  are the same at temperature ``SAMPLED_TEMPERATURE`` (0.7, the quickstart GRPO recipe's; at 1.0 a small
  R1 model's samples are mostly off-format, so the figure moved within its noise) with a fixed seed,
  averaged over ``SAMPLES_PER_PROMPT`` replies per prompt.

Every metric has a ``<metric>_stderr`` (standard error of the mean over samples), and ``samples``
says how many were scored. The merged data must be tokenized with the model's tokenizer (checked).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from doge_cli.errors import DogeError

STAGE_TASKS = {"sft-loss": "sft", "chat-mc": None, "preference": "dpo", "math-reward": "grpo"}
# The columns each task reads from its stage's merged test split (chat-mc reads the builtin chatterbot set).
SPLIT_COLUMNS = {"sft-loss": ("input_ids", "labels"),
                 "preference": ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids"),
                 "math-reward": ("prompt", "answer")}
CHAT_TASKS = ("chat-mc", "math-reward")  # asked in the chat format: the tokenizer needs a chat template
MATH_MAX_NEW_TOKENS = 256
SAMPLED_TEMPERATURE = 0.7
SAMPLED_SEED = 0
SAMPLES_PER_PROMPT = 4  # sampled figures average 4 replies per prompt (the standard error is over prompts)
GENERATION_BATCH = 32


def _mean_stderr(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def _ratio_stderr(sums: list[float], counts: list[int]) -> float:
    """Standard error of sum(sums) / sum(counts) over independent rows (the ratio estimator's)."""
    k, total = len(sums), sum(counts)
    if k < 2 or not total:
        return 0.0
    ratio = sum(sums) / total
    spread = sum((s - ratio * c) ** 2 for s, c in zip(sums, counts))
    return math.sqrt(k / (k - 1) * spread) / total


def _split(datasets_dir: Path, stage: str, task: str, columns: tuple[str, ...], max_samples: int | None, tok,
           setting: str = "--datasets-dir"):
    """The test split of ``<datasets_dir>/merged/<stage>``, checked against the model's tokenizer."""
    import datasets

    path = Path(datasets_dir) / "merged" / stage
    if not (path / "dataset_dict.json").is_file():
        raise DogeError(f"task {task} needs the held-out split of {path}; run `doge data merge --stage {stage} "
                        f"--datasets-dir {datasets_dir} --test-examples 100` (or pass {setting})")
    data = datasets.load_from_disk(str(path))
    if "test" not in data:
        raise DogeError(f"{path} has no test split for task {task}; merge it again with --test-examples 100")
    split = data["test"]
    missing = [c for c in columns if c not in split.column_names]
    if missing:
        raise DogeError(f"{path} lacks {', '.join(missing)} for task {task}; merge it again with --stage {stage}")
    _check_tokenizer(path, tok, task)
    if max_samples is not None:
        split = split.select(range(min(max_samples, len(split))))
    return split


def _check_tokenizer(path: Path, tok, task: str) -> None:
    """Token ids only mean something to the tokenizer that wrote them: refuse another vocabulary."""
    from doge_cli.train.objectives.loading import tokenizer_from_manifest

    recorded = tokenizer_from_manifest(str(path))
    if not recorded or not (Path(recorded) / "tokenizer.json").is_file():
        return  # a hub tokenizer or one not at hand: the vocabulary size check below still runs
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(recorded)
    if theirs.get_vocab() != tok.get_vocab():
        raise DogeError(f"task {task}: {path} was tokenized with {recorded}, whose vocabulary differs from the "
                        "model's tokenizer; evaluate a model trained with that tokenizer, or re-tokenize and merge")


def sft_loss(lm, tok, datasets_dir: Path, max_samples: int | None, batch_size: int, **_) -> dict:
    from doge_cli.eval.sft_loss import assistant_token_loss

    split = _split(datasets_dir, "sft", "sft-loss", SPLIT_COLUMNS["sft-loss"], max_samples, tok)
    _check_ids(split["input_ids"], lm, "sft-loss")
    rows = assistant_token_loss(lm, split, batch_size=batch_size, per_row=True)
    return {"loss": rows["loss"], "loss_stderr": _ratio_stderr(rows["row_sums"], rows["row_tokens"]),
            "tokens": rows["tokens"], "samples": rows["rows"]}


def _check_ids(rows, lm, task: str) -> None:
    top = max((max(r) for r in rows if len(r)), default=-1)
    if top >= lm.config.vocab_size:
        raise DogeError(f"task {task}: the data holds token id {top} but the model's vocabulary has "
                        f"{lm.config.vocab_size} tokens; it was tokenized for another model")


def _reply_logps(lm, pairs: list[tuple[list[int], list[int]]], batch_size: int) -> list[float]:
    """Summed log p(reply | prompt) for each (prompt ids, reply ids), in batches of right-padded rows. A
    pair longer than the model's context keeps its end (:func:`_cut_pairs` counts them)."""
    import torch

    from doge_cli.train.objectives.lm import pad_right, token_logprobs

    limit = lm.config.max_position_embeddings
    out: list[float] = []
    lm.eval()
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        seqs, spans = [], []
        for prompt, reply in chunk:
            seq = (prompt + reply)[-limit:]  # an over-long pair keeps its end: the reply
            first = max(len(seq) - len(reply), 1)
            seqs.append(seq)
            spans.append((first, len(seq)))
        ids = pad_right(seqs, 0)
        mask = pad_right([[1] * len(s) for s in seqs], 0)
        targets = torch.full_like(ids, -100)
        for i, (first, end) in enumerate(spans):
            targets[i, first - 1:end - 1] = ids[i, first:end]
        with torch.no_grad():
            logps = token_logprobs(lm, ids.to(lm.device), mask.to(lm.device), targets.to(lm.device))
        out.extend(float(v) for v in logps.float().sum(-1).cpu())
    return out


def _cut_pairs(lm, pairs: list[tuple[list[int], list[int]]], task: str, what: str, log: Callable[[str], None]) -> int:
    """How many (prompt, reply) pairs exceed the model's context, said in one line when any do: they are
    scored with the start of the prompt cut (and of the reply too, when the reply alone is longer)."""
    limit = lm.config.max_position_embeddings
    cut = sum(len(p) + len(r) > limit for p, r in pairs)
    if cut:
        log(f"{task}: {cut} of {len(pairs)} {what} are longer than the model's {limit}-token context; they are "
            "scored on their last tokens (the prompt's start cut off)")
    return cut


def preference(lm, tok, datasets_dir: Path, max_samples: int | None, batch_size: int, reference=None,
               log: Callable[[str], None] = lambda _m: None, **_) -> dict:
    split = _split(datasets_dir, "dpo", "preference", SPLIT_COLUMNS["preference"], max_samples, tok)
    prompts, chosen, rejected = (list(map(list, split[c])) for c in
                                 ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids"))
    _check_ids(prompts + chosen + rejected, lm, "preference")
    pairs = list(zip(prompts, chosen)) + list(zip(prompts, rejected))
    n = len(prompts)
    truncated = _cut_pairs(lm, pairs, "preference", "prompt-reply sequences", log)
    logps = _reply_logps(lm, pairs, batch_size)
    diff = [c - r for c, r in zip(logps[:n], logps[n:])]
    out = _metrics({"accuracy": [float(d > 0) for d in diff], "margin": diff})
    if reference is not None:
        ref = _reply_logps(reference, pairs, batch_size)
        ratio = [d - (c - r) for d, c, r in zip(diff, ref[:n], ref[n:])]
        out.update(_metrics({"reward_accuracy": [float(x > 0) for x in ratio], "reward_margin": ratio}))
    out["samples"] = n
    out["truncated"] = truncated
    return out


def _metrics(values: dict[str, list[float]]) -> dict:
    out = {}
    for name, vals in values.items():
        out[name], out[f"{name}_stderr"] = _mean_stderr(vals)
    return out


def chat_mc(lm, tok, datasets_dir: Path, max_samples: int | None, batch_size: int,
            log: Callable[[str], None] = lambda _m: None, **_) -> dict:
    import json

    from doge_cli.chat_format import prompt_ids

    path = _chatterbot_set(datasets_dir)
    _check_chat_template(tok, "chat-mc")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if max_samples is not None:
        rows = rows[:max_samples]
    pairs, index = [], []
    for row in rows:
        messages = [{"role": "user", "content": row["question"]}]
        prompt = prompt_ids(tok, messages)
        for choice in row["choices"]:
            full = tok.apply_chat_template(messages + [{"role": "assistant", "content": choice}], tokenize=False)
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            if not full.startswith(text):
                raise DogeError("task chat-mc: the chat template does not render a reply after its generation "
                                "prompt; it cannot score replies")
            reply = tok(full[len(text):], add_special_tokens=False)["input_ids"]
            pairs.append((prompt, reply))
        index.append(len(row["choices"]))
    truncated = _cut_pairs(lm, pairs, "chat-mc", "question-choice sequences", log)
    logps = _reply_logps(lm, pairs, batch_size)
    acc, acc_norm, at = [], [], 0
    for row, k in zip(rows, index):
        scores = logps[at:at + k]
        per_char = [s / max(len(c), 1) for s, c in zip(scores, row["choices"])]
        at += k
        gold = int(row["label"])
        acc.append(float(max(range(k), key=lambda i: scores[i]) == gold))
        acc_norm.append(float(max(range(k), key=lambda i: per_char[i]) == gold))
    return {**_metrics({"acc": acc, "acc_norm": acc_norm}), "samples": len(rows), "truncated": truncated}


def math_reward(lm, tok, datasets_dir: Path, max_samples: int | None, batch_size: int,
                max_new_tokens: int = MATH_MAX_NEW_TOKENS, log: Callable[[str], None] = lambda _m: None,
                stop_together: Callable[[bool], bool] | None = None, **_) -> dict:
    import torch

    from doge_cli.chat_format import prompt_ids, stop_ids
    from doge_cli.inference import generate
    from doge_cli.train.objectives.lm import pad_left
    from doge_cli.train.objectives.rewards import accuracy_reward, format_reward

    split = _split(datasets_dir, "grpo", "math-reward", SPLIT_COLUMNS["math-reward"], max_samples, tok)
    _check_chat_template(tok, "math-reward")
    prompts = [prompt_ids(tok, list(p)) for p in split["prompt"]]
    answers = [str(a) for a in split["answer"]]
    limit = lm.config.max_position_embeddings - max_new_tokens
    if limit < 1:
        raise DogeError(f"task math-reward: --max-new-tokens {max_new_tokens} leaves no room for a prompt in the "
                        f"model's {lm.config.max_position_embeddings}-token context; ask for fewer")
    # A prompt with no room left for a reply is left out, not cut: its start is the system prompt and the
    # question, without which the reward would measure another task.
    keep = [i for i, p in enumerate(prompts) if len(p) <= limit]
    skipped = len(prompts) - len(keep)
    if skipped:
        if not keep:
            raise DogeError(f"task math-reward: every prompt is longer than the {limit} tokens the model's "
                            f"{lm.config.max_position_embeddings}-token context leaves after {max_new_tokens} new "
                            "tokens; ask for fewer with --max-new-tokens")
        log(f"math-reward: {skipped} of {len(prompts)} prompts are longer than the {limit} tokens left after "
            f"{max_new_tokens} new tokens; they are left out (the others are scored)")
    prompts, answers = [prompts[i] for i in keep], [answers[i] for i in keep]
    stops = stop_ids(lm.config, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out: dict = {}
    for suffix, sample in (("", False), ("_sampled", True)):
        gen = torch.Generator(device=lm.device).manual_seed(SAMPLED_SEED) if sample else None
        per_prompt = SAMPLES_PER_PROMPT if sample else 1
        texts: list[str] = []
        step = max(1, GENERATION_BATCH // per_prompt)
        for start in range(0, len(prompts), step):
            chunk = prompts[start:start + step]
            ids, mask = pad_left(chunk, pad), pad_left([[1] * len(p) for p in chunk], 0)
            with torch.no_grad():
                result = generate(lm, ids.to(lm.device), mask.to(lm.device), max_new_tokens=max_new_tokens,
                                  do_sample=sample, temperature=SAMPLED_TEMPERATURE, stop_token_ids=stops,
                                  pad_token_id=pad, num_return_sequences=per_prompt, generator=gen,
                                  stop_together=stop_together)
            for request in result.requests:
                new = list(request.token_ids)
                if new and new[-1] in stops:
                    new = new[:-1]
                texts.append(tok.decode(new, skip_special_tokens=False))
        fmt = format_reward(texts)
        acc = accuracy_reward(texts, [a for a in answers for _ in range(per_prompt)])

        total = [f + a for f, a in zip(fmt, acc)]
        out.update(_metrics({f"format{suffix}": _per_question(fmt, per_prompt),
                             f"accuracy{suffix}": _per_question(acc, per_prompt),
                             f"reward{suffix}": _per_question(total, per_prompt)}))
    out["samples"] = len(prompts)
    out["skipped"] = skipped
    return out


def _per_question(values: list[float], per_prompt: int) -> list[float]:
    """Each prompt's mean over its adjacent samples: a prompt's samples are one observation."""
    return [sum(values[i:i + per_prompt]) / per_prompt for i in range(0, len(values), per_prompt)]


RUNNERS: dict[str, Callable[..., dict]] = {
    "sft-loss": sft_loss, "chat-mc": chat_mc, "preference": preference, "math-reward": math_reward,
}


def run_stage_task(name: str, lm, tok, *, datasets_dir: Path, max_samples: int | None, batch_size: int,
                   reference=None, max_new_tokens: int = MATH_MAX_NEW_TOKENS,
                   log: Callable[[str], None] = lambda _m: None,
                   stop_together: Callable[[bool], bool] | None = None) -> dict:
    """The metrics of stage task ``name`` for the loaded model ``lm`` (module docstring); what had to be cut
    or left out to fit the model's context is said through ``log`` and counted in the result.
    ``stop_together`` (:func:`doge_cli.train.collective.stop_together`) keeps math-reward's generation in step
    with the other processes where forwards are collective (ZeRO-3, FSDP)."""
    return RUNNERS[name](lm, tok, Path(datasets_dir), max_samples, batch_size, reference=reference,
                         max_new_tokens=max_new_tokens, log=log, stop_together=stop_together)


def check_stage_task(name: str, tok, datasets_dir: Path, setting: str = "--datasets-dir") -> None:
    """What stage task ``name`` needs before any model runs: its held-out data (present, with its columns,
    tokenized with ``tok``'s vocabulary) and, for the chat tasks, a chat template; DogeError otherwise, naming
    ``setting`` as the way to point at another datasets folder."""
    if name in SPLIT_COLUMNS:
        _split(Path(datasets_dir), STAGE_TASKS[name], name, SPLIT_COLUMNS[name], 1, tok, setting)
    if name == "chat-mc":
        _chatterbot_set(Path(datasets_dir), setting)
    if name in CHAT_TASKS:
        _check_chat_template(tok, name)


def _chatterbot_set(datasets_dir: Path, setting: str = "--datasets-dir") -> Path:
    path = Path(datasets_dir) / "eval" / "chatterbot-mc" / "test.jsonl"
    if not path.is_file():
        raise DogeError(f"task chat-mc needs {path}; run `doge data download --recipe quickstart --save-dir "
                        f"{datasets_dir}` or pass {setting}")
    return path


def _check_chat_template(tok, task: str) -> None:
    if not tok.chat_template:
        raise DogeError(f"task {task} asks in the chat format, but the model's tokenizer has no chat template")
