"""Direct preference optimisation of a chat model against a frozen reference (the start model).

Rows come from ``doge data tokenize --stage dpo``: ``prompt_input_ids`` (chat template up to the
assistant header), ``chosen_input_ids`` and ``rejected_input_ids`` (reply + end-of-turn), TRL's
names. A pair is truncated as the seed's recipe does: the prompt keeps its last
``dpo.max_prompt_length`` tokens (the question sits at the end), then both replies keep their first
``dpo.max_length - len(prompt)`` tokens.

One pair is one sequence of ``train.global_batch_size`` and one loss unit: the step's loss is the
mean over its pairs, so accumulation does not change it. A micro-batch runs its chosen and
rejected sequences in one forward (chosen rows first).

The reference log-probabilities are either those of a frozen copy of the start model
(``dpo.reference: model``) or computed once, before the first step, for every training pair and
the evaluated test pairs, and kept as two floats per pair (``precomputed``, the default: no second
model in memory). The precomputation is split across processes and gathered. The core builds
both from the start weights even when it resumes, so a resumed run sees the same reference as a
straight one.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from doge_cli.errors import DogeError
from doge_cli.train.objectives.base import LossOutput, Objective
from doge_cli.train.objectives.lm import pad_right, token_logprobs
from doge_cli.train.objectives.loading import (
    chat_tokenizer,
    frozen_copy,
    load_splits,
    load_start_model,
)

COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, *, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and the implicit rewards ``beta * (log pi - log pi_ref)`` of chosen and rejected.

    Inputs are summed log-probabilities of each reply, shape (pairs,). With
    ``h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))``:

    - ``sigmoid``: DPO, Rafailov et al. 2023, eq. 7: ``-log sigmoid(beta h)``; with label smoothing
      ``eps`` the conservative variant (Mitchell 2023, "A note on DPO with noisy preferences"):
      ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``.
    - ``ipo``: IPO, Azar et al. 2023, eq. 17: ``(h' - 1 / (2 beta))^2`` where, as the IPO authors
      and TRL do, each reply's log-ratio is averaged over its tokens (``chosen_tokens``,
      ``rejected_tokens``) so the target margin does not scale with reply length.
    - ``hinge``: SLiC-HF, Zhao et al. 2023, eq. 1 (calibration loss) on the reference-normalised
      likelihoods: ``max(0, 1 - beta h)``.
    """
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    if loss_type == "sigmoid":
        logits = beta * (chosen_ratio - rejected_ratio)
        losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("ipo needs the token counts of the replies")
        margin = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (margin - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * (chosen_ratio - rejected_ratio))
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


class DPOObjective(Objective):
    stage = "dpo"

    def setup(self) -> None:
        cfg = self.config
        self.train_data, self.eval_data = load_splits(cfg, COLUMNS, "DPO needs prompt, chosen and rejected ids",
                                                      start_model=True)
        for name, split in {"train": self.train_data, cfg.data.eval_split: self.eval_data}.items():
            if split is not None:
                _check_not_empty(split, name, cfg.data.path)
        self.tokenizer = chat_tokenizer(cfg)
        self.ref_model = None
        self.ref_logps: dict[str, torch.Tensor] = {}

    # -- batches ------------------------------------------------------------------------------
    def truncate(self, prompt: list[int], chosen: list[int], rejected: list[int]):
        sec = self.config.dpo
        prompt = list(prompt)[-sec.max_prompt_length:]
        room = sec.max_length - len(prompt)
        return prompt, list(chosen)[:room], list(rejected)[:room]

    def collate(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        seqs, starts, ends = [], [], []
        pairs = [self.truncate(r["prompt_input_ids"], r["chosen_input_ids"], r["rejected_input_ids"]) for r in rows]
        for side in (1, 2):  # chosen rows, then rejected rows
            for pair in pairs:
                seqs.append(pair[0] + pair[side])
                starts.append(len(pair[0]))
                ends.append(len(pair[0]) + len(pair[side]))
        input_ids = pad_right(seqs, self.tokenizer.pad_token_id)
        mask = pad_right([[1] * len(s) for s in seqs], 0)
        # targets[t] = input_ids[t + 1] for reply tokens: log p of each reply token given what precedes it
        cols = torch.arange(input_ids.shape[1] - 1)
        start, end = torch.tensor(starts)[:, None], torch.tensor(ends)[:, None]
        in_reply = (cols[None] + 1 >= start) & (cols[None] + 1 < end)
        targets = torch.full_like(input_ids, -100)
        targets[:, :-1] = torch.where(in_reply, input_ids[:, 1:], -100)
        rows_index = torch.tensor([int(r.get("_row", -1)) for r in rows], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": mask, "targets": targets, "row": rows_index}

    def count_targets(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["row"].numel())

    # -- model --------------------------------------------------------------------------------
    def build_model(self):
        model = load_start_model(self.config, self.tokenizer)
        self.model_config = model.config
        return model

    def after_prepare(self, model, accelerator) -> None:
        if self.config.dpo.reference == "model":
            self.ref_model = frozen_copy(model, accelerator, "dpo.reference=precomputed")
            return
        micro = self.config.runtime.micro_batch_size
        n_eval = min(len(self.eval_data), self.config.logging.eval_batches * micro) if self.eval_data else 0
        was_training = model.training
        model.eval()
        world, rank = accelerator.num_processes, accelerator.process_index
        for split, data, n in (("train", self.train_data, len(self.train_data)), ("eval", self.eval_data, n_eval)):
            if not n:
                continue
            out = torch.zeros(n, 2)
            # Pairs of similar length share a batch, so little compute goes to padding.
            order = torch.argsort(_pair_lengths(data.select(range(n))), stable=True).tolist()
            chunk = max(micro, 16)
            starts = list(range(0, n, chunk))
            # Process r takes chunks r, r + world, ...; all processes run the same number of forward
            # passes (ZeRO-3 gathers weights collectively), a short one repeating its first chunk
            # without keeping it. Every row is filled by exactly one process, so a sum gathers them.
            for step in range(math.ceil(len(starts) / world)):
                mine = step * world + rank
                lo = starts[mine] if mine < len(starts) else starts[0]
                index = order[lo:lo + chunk]
                part = data[index]
                rows = [dict(zip(part, vals)) for vals in zip(*part.values())]
                batch = {k: v.to(accelerator.device) for k, v in self.collate(rows).items()}
                with torch.no_grad(), accelerator.autocast():
                    chosen, rejected = self._sequence_logps(model, batch)
                if mine < len(starts):
                    out[index, 0], out[index, 1] = chosen.float().cpu(), rejected.float().cpu()
            if world > 1:
                out = accelerator.reduce(out.to(accelerator.device), reduction="sum").cpu()
            self.ref_logps[split] = out
        model.train(was_training)

    # -- loss ---------------------------------------------------------------------------------
    def _sequence_logps(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        logps = token_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["targets"])
        return logps.sum(-1).chunk(2)

    def _reference(self, batch, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self.ref_model is not None:
            with torch.no_grad():
                return self._sequence_logps(self.ref_model, batch)
        table = self.ref_logps[split].to(batch["input_ids"].device)
        picked = table[batch["row"]]
        return picked[:, 0], picked[:, 1]

    def _loss(self, model, batch, split: str) -> LossOutput:
        sec = self.config.dpo
        chosen, rejected = self._sequence_logps(model, batch)
        ref_chosen, ref_rejected = self._reference(batch, split)
        tokens = (batch["targets"] != -100).sum(-1).float()
        chosen_tokens, rejected_tokens = tokens.chunk(2)
        losses, chosen_reward, rejected_reward = dpo_loss(
            chosen, rejected, ref_chosen, ref_rejected, beta=sec.beta, loss_type=sec.loss_type,
            label_smoothing=sec.label_smoothing, chosen_tokens=chosen_tokens, rejected_tokens=rejected_tokens,
        )
        metrics = {
            "rewards/chosen": chosen_reward.sum(),
            "rewards/rejected": rejected_reward.sum(),
            "rewards/margins": (chosen_reward - rejected_reward).sum(),
            "rewards/accuracies": (chosen_reward > rejected_reward).float().sum(),
            "logps/chosen": chosen.detach().sum(),
            "logps/rejected": rejected.detach().sum(),
        }
        return LossOutput(losses.sum(), metrics)

    def loss(self, model, batch: dict[str, torch.Tensor]) -> LossOutput:
        return self._loss(model, batch, "train")

    def eval_loss(self, model, batch: dict[str, torch.Tensor]) -> LossOutput:
        return self._loss(model, batch, "eval")

    def flops_per_target(self) -> float | None:
        return None


def _check_not_empty(split, name: str, path: str) -> None:
    import pyarrow.compute as pc

    for column in COLUMNS[1:]:
        lengths = pc.list_value_length(split.data.column(column))
        if pc.min(lengths).as_py() == 0:
            raise DogeError(f"the {name} split of {path} has an empty '{column}' (a pair without a "
                            f"{column.split('_')[0]} reply); drop such rows and re-run 'doge data tokenize --stage dpo'")


def _pair_lengths(split) -> torch.Tensor:
    import pyarrow.compute as pc

    prompt, chosen, rejected = (pc.list_value_length(split.data.column(c)).to_numpy() for c in COLUMNS)
    if split._indices is not None:
        picked = split._indices.column(0).to_numpy()
        prompt, chosen, rejected = prompt[picked], chosen[picked], rejected[picked]
    return torch.from_numpy(prompt + (chosen > rejected) * chosen + (chosen <= rejected) * rejected)
