"""Our Doge model behind lighteval's model interface, so lighteval's Pipeline runs on doge's own
forward pass and KV-cache generation (every attention backend, no transformers wrapper).

How each request type is scored:

- ``loglikelihood`` (multiple choice): context and choice are tokenized together and split
  (lighteval's ``tok_encode_pair``); the score is the summed log-probability of the choice tokens.
- ``loglikelihood_rolling`` (perplexity): every token of the document is scored, the first one
  given only the BOS token. A document longer than the model's context is scored in windows that
  advance by half the context, so every token after the first window sees at least half a context
  of history (lighteval's transformers backend truncates long documents instead).
- ``greedy_until`` (generation): greedy decoding until an end-of-turn id or the task's stop
  sequence. An R1 model's reply is reduced to its ``<|begin_of_solution|>`` section, so exact match
  compares answers, not reasoning. ``stop_together`` (a training run under ZeRO-3 or FSDP, where every
  forward is collective) makes each batch run until every process is done with it.

Without a chat template, prompts start with the BOS token, as rendered conversations do.
"""

from __future__ import annotations

import torch
from lighteval.models.abstract_model import LightevalModel, ModelConfig
from lighteval.models.model_output import ModelResponse
from lighteval.tasks.prompt_manager import PromptManager
from lighteval.tasks.requests import Doc

from doge_cli.eval.lighteval_patches import NoCache


def rolling_windows(n_tokens: int, max_length: int) -> list[tuple[int, int, int]]:
    """``(start, end, first_target)`` windows over a sequence of ``n_tokens`` (BOS prefix included): a
    window feeds tokens ``[start, end)`` (at most ``max_length``) and scores ``first_target .. end-1``.
    Every token but the first is scored exactly once; after the first window each scored token sees
    at least ``max_length // 2`` tokens of history."""
    windows, target = [], 1
    stride = max(1, max_length // 2)
    while target < n_tokens:
        end = min(n_tokens, max(target + stride, max_length))
        start = max(0, end - max_length)
        windows.append((start, end, target))
        target = end
    return windows


class DogeModelConfig(ModelConfig):
    """What lighteval records about the model (its name); the model itself is passed in built."""


class DogeLightevalModel(LightevalModel):
    def __init__(self, model, tokenizer, *, name: str, batch_size: int = 8, use_chat_template: bool = False,
                 system_prompt: str | None = None, max_length: int | None = None, stop_together=None):
        self.model, self._tokenizer = model, tokenizer
        self.stop_together = stop_together
        self.config = DogeModelConfig(model_name=name, system_prompt=system_prompt)
        self.batch_size = batch_size
        self.use_chat_template = use_chat_template
        self._max_length = max_length or model.config.max_position_embeddings
        self.prompt_manager = PromptManager(use_chat_template, tokenizer, system_prompt)
        self._cache = NoCache()
        from doge_cli.chat_format import stop_ids

        self.stop_ids = stop_ids(model.config, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        bos = tokenizer.bos_token_id
        self.prefix = [bos] if bos is not None else [self.stop_ids[0]]

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def add_special_tokens(self) -> bool:
        return False  # the BOS prefix is added explicitly (see the module docstring)

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def disable_tqdm(self) -> bool:
        return True

    def _context_ids(self, context: str) -> list[int]:
        ids = self.tok_encode(context, add_special_tokens=False)
        return ids if self.use_chat_template else self.prefix + ids

    @torch.no_grad()
    def _token_logprobs(self, rows: list[list[int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """For each row: (log-probability of each next token, whether it is the argmax), both (len-1,)."""
        out: list = [None] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        device = self.model.device
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            width = len(rows[batch[0]])
            # Right padding: causal attention keeps the pads out of every real position.
            ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            for j, i in enumerate(batch):
                ids[j, :len(rows[i])] = torch.tensor(rows[i])
            ids = ids.to(device)
            logprobs = torch.log_softmax(self.model(ids).logits.float(), dim=-1)
            for j, i in enumerate(batch):
                n = len(rows[i]) - 1
                target = ids[j, 1:n + 1]
                lp = logprobs[j, :n]
                out[i] = (lp.gather(-1, target[:, None]).squeeze(-1).cpu(), (lp.argmax(-1) == target).cpu())
        return out

    def loglikelihood(self, docs: list[Doc]) -> list[ModelResponse]:
        rows, spans, conts = [], [], []
        for doc in docs:
            context = self.prompt_manager.prepare_prompt(doc)
            contexts, continuations = self.tok_encode_pair(context, doc.choices, pairwise=False)
            for choice, ctx, cont in zip(doc.choices, contexts, continuations):
                if not choice:  # log P("" | context) = 0; the split would hand the context's last token over
                    ctx, cont = self.tok_encode(context), []
                ctx = ctx if self.use_chat_template else self.prefix + ctx
                row = (ctx + cont)[-self.max_length:]  # keep the choice, cut the context's start
                rows.append(row)
                spans.append(min(len(cont), len(row) - 1))
                conts.append(list(cont))
        scored = self._token_logprobs(rows)
        responses, k = [], 0
        for doc in docs:
            n = len(doc.choices)
            logprobs, greedy = [], []
            for (lp, eq), span in zip(scored[k:k + n], spans[k:k + n]):
                # The last ``span`` entries; a choice with no token of its own scores 0 (``lp[-0:]`` is all).
                logprobs.append(float(lp[len(lp) - span:].sum()))
                greedy.append(bool(eq[len(eq) - span:].all()))
            # Token-normalised metrics (LogProbTokenNorm) divide by the choice lengths in output_tokens.
            responses.append(ModelResponse(logprobs=logprobs, argmax_logits_eq_gold=greedy,
                                           output_tokens=conts[k:k + n]))
            k += n
        return responses

    def loglikelihood_rolling(self, docs: list[Doc]) -> list[ModelResponse]:
        rows, owners = [], []
        for d, doc in enumerate(docs):
            seq = self.prefix + self.tok_encode(doc.query, add_special_tokens=False)
            for start, end, target in rolling_windows(len(seq), self.max_length):
                rows.append((seq[start:end], target - start))
                owners.append(d)
        scored = self._token_logprobs([r for r, _ in rows])
        totals = [0.0] * len(docs)
        counts = [0] * len(docs)
        for (row, first), owner, (lp, _) in zip(rows, owners, scored):
            totals[owner] += float(lp[first - 1:].sum())  # lp[i] scores row[i + 1]
            counts[owner] += len(row) - first
        return [ModelResponse(logprobs=[total], output_tokens=[[count]]) for total, count in zip(totals, counts)]

    @torch.no_grad()
    def greedy_until(self, docs: list[Doc]) -> list[ModelResponse]:
        from doge_cli.chat_format import BEGIN_SOLUTION, BEGIN_THOUGHT, split_reasoning
        from doge_cli.inference import generate

        markers = (BEGIN_THOUGHT, BEGIN_SOLUTION)

        responses: list = [None] * len(docs)
        prompts = [self._context_ids(self.prompt_manager.prepare_prompt(doc)) for doc in docs]
        order = sorted(range(len(docs)), key=lambda i: (docs[i].generation_size or 0, -len(prompts[i])))
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            size = max((docs[i].generation_size or 0) for i in batch)
            new_tokens = max(1, min(size if size > 0 else 256, self.max_length - 1))
            keep = self.max_length - new_tokens
            ids_list = [prompts[i][-keep:] for i in batch]
            width = max(len(x) for x in ids_list)
            ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for j, row in enumerate(ids_list):  # left padding, as generate expects
                ids[j, width - len(row):] = torch.tensor(row)
                mask[j, width - len(row):] = 1
            n = max(docs[i].num_samples or 1 for i in batch)
            out = generate(self.model, ids, mask, max_new_tokens=new_tokens, do_sample=n > 1, temperature=1.0,
                           stop_token_ids=self.stop_ids, pad_token_id=self.pad_id, num_return_sequences=n,
                           stop_together=self.stop_together)
            for j, i in enumerate(batch):
                texts = []
                for r in range(n):
                    row = j * n + r
                    tokens = out.new_tokens[row, :int(out.lengths[row])].tolist()
                    tokens = [t for t in tokens if t not in self.stop_ids]
                    text = self.tokenizer.decode(tokens, skip_special_tokens=False)
                    if any(m in text for m in markers):
                        text = split_reasoning(text)[1]
                    for stop in docs[i].stop_sequences or []:
                        if stop and stop in text:
                            text = text[:text.index(stop)]
                    texts.append(text)
                responses[i] = ModelResponse(text=texts[:max(1, docs[i].num_samples or 1)],
                                             input_tokens=ids_list[j])
        return responses
