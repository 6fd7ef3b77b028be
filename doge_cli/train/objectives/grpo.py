"""Group relative policy optimisation (GRPO) with verifiable rewards.

Rows come from ``doge data tokenize --stage grpo``: ``prompt`` (chat messages, the R1 system
prompt first) and ``answer``. Per optimizer step:

1. **Rollouts** (``prepare_step``): each prompt is rendered with the chat template and continued
   ``grpo.num_generations`` times by the KV-cache generator (temperature, top-p, at most
   ``grpo.max_completion_length`` new tokens, stopping at end-of-turn). Each micro-batch samples
   from a ``torch.Generator`` seeded from (``train.seed``, step, its first row), so a resumed run,
   or one with another process count, samples exactly what a straight one-process run samples.
2. **Rewards**: the weighted sum of the configured functions (see :mod:`.rewards`), and
   group-normalised advantages.
3. **Loss** (``loss``): the clipped policy-ratio objective with optional k3 KL to the start model.

**Batch size.** ``train.global_batch_size`` and ``runtime.micro_batch_size`` count *prompts* (dataset
rows, as in every other stage); a step trains on ``global_batch_size x num_generations``
completions, and a micro-batch's forward holds ``micro_batch_size x num_generations`` sequences.
A group never straddles micro-batches, so its advantages are exact.

**num_iterations** (mu): rollouts are generated every mu optimizer steps and reused by the mu - 1
steps that follow, with the log-probabilities of the policy that sampled them stored as the
"old" policy of the ratio. As in TRL, each batch of prompts serves mu optimizer steps and the data
advances once per batch (``steps_per_batch``), so every prompt of an epoch is used and an epoch
takes mu times as many steps. Rollouts are also written under ``RUN/rollouts/`` (tensors and plain
values, read with ``torch.load(weights_only=True)``) so a run resumed between two generations
continues with the very same rollouts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from doge_cli.chat_format import config_eos_ids
from doge_cli.errors import DogeError
from doge_cli.io import atomic_file
from doge_cli.train.collective import stop_together
from doge_cli.train.objectives.base import LossOutput, Objective
from doge_cli.train.objectives.lm import pad_left, token_logprobs, unwrap
from doge_cli.train.objectives.loading import (
    chat_tokenizer,
    frozen_copy,
    load_splits,
    load_start_model,
)
from doge_cli.train.objectives.rewards import call_reward, resolve_reward

ADVANTAGE_EPS = 1e-4  # TRL's, so a group with equal rewards gets advantage 0, not NaN


def group_advantages(rewards: torch.Tensor, group: int, scale: bool = True) -> torch.Tensor:
    """GRPO's outcome advantages (Shao et al. 2024, DeepSeekMath, section 4.1.2): each reward minus its
    group's mean, divided by the group's standard deviation (Bessel-corrected) when ``scale``; Dr. GRPO
    (Liu et al. 2025) drops the division, which biases towards easy and hard questions less."""
    grouped = rewards.view(-1, group)
    adv = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        adv = adv / (grouped.std(dim=1, keepdim=True) + ADVANTAGE_EPS)
    return adv.reshape(-1)


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
              epsilon_low: float, epsilon_high: float, loss_type: str, max_completion_length: int,
              beta: float = 0.0, ref_logps: torch.Tensor | None = None,
              ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped surrogate of DeepSeekMath (Shao et al. 2024) eq. 3, as a (sum, units) pair.

    Per completion token: ``-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) + beta * KL`` with the
    ratio ``r = pi / pi_old`` (PPO, Schulman et al. 2017, eq. 7; the asymmetric clip is DAPO's
    clip-higher, Yu et al. 2025, eq. 10) and the unbiased k3 estimator
    ``KL = pi_ref / pi - log(pi_ref / pi) - 1`` (DeepSeekMath eq. 4). Token aggregation:

    - ``grpo``: mean over each completion's tokens, then over completions (DeepSeekMath eq. 3);
    - ``dr_grpo``: sum over tokens divided by completions x ``max_completion_length`` (Dr. GRPO,
      Liu et al. 2025, eq. 3: no length bias);
    - ``dapo``: sum over tokens divided by all completion tokens (DAPO eq. 12, token-level).

    Returns ``(loss_sum, units, stats)`` with ``loss_sum / units`` the loss; summing both over the
    micro-batches of a step gives the loss of the whole step (what the core divides).
    """
    mask = mask.to(logps.dtype)
    ratio = torch.exp(logps - old_logps)
    adv = advantages[:, None]
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    stats: dict[str, torch.Tensor] = {}
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs reference log-probabilities")
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl
        stats["kl"] = ((kl * mask).sum() / mask.sum().clamp(min=1)).detach()
    tokens = mask.sum(-1)
    if loss_type == "grpo":
        loss_sum = ((per_token * mask).sum(-1) / tokens.clamp(min=1)).sum()
        units = torch.tensor(float(logps.shape[0]))
    elif loss_type == "dr_grpo":
        loss_sum = (per_token * mask).sum() / max_completion_length
        units = torch.tensor(float(logps.shape[0]))
    elif loss_type == "dapo":
        loss_sum = (per_token * mask).sum()
        units = tokens.sum().detach().float().cpu()
    else:
        raise ValueError(f"unknown GRPO loss_type {loss_type!r}")
    low = (ratio < 1 - epsilon_low) & (adv < 0)
    high = (ratio > 1 + epsilon_high) & (adv > 0)
    stats["clip_ratio"] = (((low | high).to(mask.dtype) * mask).sum() / mask.sum().clamp(min=1)).detach()
    return loss_sum, units, stats


class GRPOObjective(Objective):
    stage = "grpo"

    def setup(self) -> None:
        cfg, sec = self.config, self.config.grpo
        # The loss needs rollouts, not a fixed test set: held-out reward is measured by evaluation.
        self.train_data, self.eval_data = load_splits(cfg, ("prompt", "answer"),
                                                      "GRPO needs chat prompts and reference answers",
                                                      start_model=True, with_eval=False)
        self.tokenizer = chat_tokenizer(cfg)
        self.reward_fns = [(spec.name, resolve_reward(spec.name), spec.weight) for spec in sec.rewards]
        if not self.reward_fns:
            raise DogeError("grpo.rewards is empty; name at least one reward function (e.g. accuracy, format)")
        self._check_prompt_lengths()
        self.ref_model = None
        self._rollouts: tuple[int, list[dict[str, Any]]] | None = None

    @property
    def steps_per_batch(self) -> int:
        return self.config.grpo.num_iterations

    def _check_prompt_lengths(self) -> None:
        """Say once how many prompts ``grpo.max_prompt_length`` will cut (they keep their last tokens)."""
        limit = self.config.grpo.max_prompt_length
        ids = self.tokenizer.apply_chat_template(list(self.train_data["prompt"]), tokenize=True, add_generation_prompt=True,
                                                 return_dict=True)["input_ids"]
        too_long = [(i, len(x)) for i, x in enumerate(ids) if len(x) > limit]
        if too_long:
            row, n = too_long[0]
            print(f"grpo: {len(too_long)} of {len(ids)} prompts are longer than grpo.max_prompt_length={limit} tokens "
                  f"(row {row} has {n}); they keep their last {limit} tokens", flush=True)

    # -- batches ------------------------------------------------------------------------------
    def collate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        ids = self.tokenizer.apply_chat_template([r["prompt"] for r in rows], tokenize=True, add_generation_prompt=True,
                                                 return_dict=True)["input_ids"]
        limit = self.config.grpo.max_prompt_length
        ids = [x[-limit:] for x in ids]  # long prompts keep their end: the question and the assistant header
        return {
            "prompt_ids": pad_left(ids, self.tokenizer.pad_token_id),
            "prompt_mask": pad_left([[1] * len(x) for x in ids], 0),
            "row": torch.tensor([int(r.get("_row", -1)) for r in rows]),
            "prompts": [r["prompt"] for r in rows],
            "answers": [str(r["answer"]) for r in rows],
        }

    def count_targets(self, batch: dict[str, Any]) -> int:
        if self.config.grpo.loss_type == "dapo":
            return int(batch["completion_mask"].sum())
        return int(batch["completion_mask"].shape[0])

    # -- model --------------------------------------------------------------------------------
    def build_model(self):
        model = load_start_model(self.config, self.tokenizer)
        self.model_config = model.config
        return model

    def after_prepare(self, model, accelerator) -> None:
        self.acc = accelerator
        if self.config.grpo.beta != 0.0:
            self.ref_model = frozen_copy(model, accelerator, "grpo.beta=0")

    # -- rollouts -----------------------------------------------------------------------------
    def prepare_step(self, model, batches: list[dict[str, Any]]) -> list[dict[str, Any]]:
        step = self.step
        mu = self.config.grpo.num_iterations
        first = step - step % mu
        if self._rollouts is not None and self._rollouts[0] == first:
            return self._rollouts[1]
        if step != first:
            return self._load_rollouts(first)
        policy = unwrap(model)
        was_training = policy.training
        policy.eval()
        try:
            out = [self._rollout(policy, b, self._sampler(step, b)) for b in batches]
        finally:
            policy.train(was_training)
        self._rollouts = (first, out)
        if mu > 1:
            self._save_rollouts(first, out)
        return out

    def _sampler(self, step: int, batch: dict[str, Any]) -> torch.Generator:
        """The random stream of one micro-batch's rollouts, seeded from (train.seed, step, its first row):
        the same prompts sample the same completions whatever the process count, accumulation or resume."""
        gen = torch.Generator(device=self.acc.device)
        gen.manual_seed((self.config.train.seed * 1_000_003 + step) * 1_000_033 + int(batch["row"][0]))
        return gen

    @torch.no_grad()
    def _rollout(self, policy, batch: dict[str, Any], gen: torch.Generator) -> dict[str, Any]:
        from doge_cli.inference import generate

        sec, tok = self.config.grpo, self.tokenizer
        dev = self.acc.device
        g = sec.num_generations
        with self.acc.autocast():
            result = generate(policy, batch["prompt_ids"].to(dev), batch["prompt_mask"].to(dev),
                              max_new_tokens=sec.max_completion_length, do_sample=True, temperature=sec.temperature,
                              top_p=sec.top_p, pad_token_id=tok.pad_token_id, num_return_sequences=g, generator=gen,
                              stop_together=stop_together(self.acc))
        completion = result.new_tokens
        lengths = result.lengths
        width = completion.shape[1]
        completion_mask = (torch.arange(width, device=dev)[None] < lengths[:, None]).long()
        completion = completion.masked_fill(completion_mask == 0, tok.pad_token_id)
        prompt_ids = batch["prompt_ids"].to(dev).repeat_interleave(g, 0)
        prompt_mask = batch["prompt_mask"].to(dev).repeat_interleave(g, 0)

        stops = set(config_eos_ids(policy.config))
        texts, truncated = [], []
        for row, n in zip(completion.tolist(), lengths.tolist()):
            ids = row[:n]
            ended = bool(ids) and ids[-1] in stops
            truncated.append(not ended)
            texts.append(tok.decode(ids[:-1] if ended else ids, skip_special_tokens=False))
        answers = [a for a in batch["answers"] for _ in range(g)]
        prompts = [p for p in batch["prompts"] for _ in range(g)]
        info = {"completion_lengths": lengths.tolist(), "max_completion_length": sec.max_completion_length,
                "truncated": truncated}
        total = torch.zeros(len(texts))
        stats: dict[str, torch.Tensor] = {}
        for name, fn, weight in self.reward_fns:
            values = torch.tensor(call_reward(name, fn, texts, answers, prompts, **info))
            total += weight * values
            stats[f"rewards/{name}/mean"] = values.mean()
            stats[f"rewards/{name}/std"] = values.std() if len(values) > 1 else torch.zeros(())
        advantages = group_advantages(total, g, scale=sec.scale_rewards)
        stats.update({
            "reward": total.mean(),
            "reward_std": total.view(-1, g).std(dim=1).mean(),
            "completions/mean_length": lengths.float().mean().cpu(),
            "completions/max_length": lengths.float().max().cpu(),
            "completions/truncated": torch.tensor(truncated, dtype=torch.float).mean(),
        })
        input_ids = torch.cat((prompt_ids, completion), 1)
        attention_mask = torch.cat((prompt_mask, completion_mask), 1)
        out = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1),
            "targets": completion.masked_fill(completion_mask == 0, -100),
            "completion_mask": completion_mask,
            "prompt_length": prompt_ids.shape[1],
            "advantages": advantages.to(dev),
            "stats": stats,
        }
        with self.acc.autocast():
            if sec.num_iterations > 1:
                out["old_logps"] = self._logps(policy, out).float()
            if self.ref_model is not None:
                out["ref_logps"] = self._logps(self.ref_model, out).float()
        return out

    def _logps(self, model, batch: dict[str, Any]) -> torch.Tensor:
        # Hidden state at position P - 1 + j predicts completion token j; logits at the sampling temperature.
        return token_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["targets"],
                              position_ids=batch["position_ids"], temperature=self.config.grpo.temperature,
                              start=batch["prompt_length"] - 1)

    def _rollout_path(self, step: int) -> Path:
        return Path(self.config.output_dir) / "rollouts" / f"step-{step:06d}-rank{self.acc.process_index}.pt"

    def _save_rollouts(self, step: int, out: list[dict[str, Any]]) -> None:
        from doge_cli.train import checkpoint as ckpt

        path = self._rollout_path(step)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as tmp:
            torch.save([{k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in b.items()} for b in out], tmp)
        # Keep what the oldest kept checkpoint may need to resume.
        kept = ckpt.list_checkpoints(Path(self.config.output_dir))
        mu = self.config.grpo.num_iterations
        oldest = min([step] + [ckpt.checkpoint_step(p) for p in kept])
        oldest -= oldest % mu
        for old in path.parent.glob(f"step-*-rank{self.acc.process_index}.pt"):
            if int(old.name[5:11]) < oldest:
                old.unlink(missing_ok=True)

    def _load_rollouts(self, step: int) -> list[dict[str, Any]]:
        path = self._rollout_path(step)
        if not path.is_file():
            raise DogeError(f"cannot resume GRPO mid-iteration: the rollouts of step {step} ({path}) are missing; "
                            "resume from a checkpoint at a multiple of grpo.num_iterations or pass --overwrite")
        dev = self.acc.device
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch.load raises many types for a damaged or foreign file
            raise DogeError(f"the rollouts of step {step} ({path}) are damaged or not doge's ({type(err).__name__}); "
                            "resume from a checkpoint at a multiple of grpo.num_iterations or pass --overwrite") from None
        out = [{k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in b.items()} for b in saved]
        self._rollouts = (step, out)
        return out

    # -- loss ---------------------------------------------------------------------------------
    def loss(self, model, batch: dict[str, Any]) -> LossOutput:
        sec = self.config.grpo
        logps = self._logps(model, batch)
        old = batch.get("old_logps")
        old = logps.detach() if old is None else old
        loss_sum, _, stats = grpo_loss(
            logps, old, batch["advantages"], batch["completion_mask"], epsilon_low=sec.epsilon,
            epsilon_high=sec.epsilon_high if sec.epsilon_high is not None else sec.epsilon, loss_type=sec.loss_type,
            max_completion_length=sec.max_completion_length, beta=sec.beta, ref_logps=batch.get("ref_logps"),
        )
        stats.update(batch["stats"])
        return LossOutput(loss_sum, {}, {k: v.detach().float().to(loss_sum.device) for k, v in stats.items()})
