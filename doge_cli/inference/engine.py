"""The one generation engine: chat, eval, GRPO rollouts and the server all generate through it.

- **Slots over one preallocated cache.** ``max_batch`` requests run at once, request ``i`` of the batch in
  row ``i`` of a :class:`~doge_cli.model.modeling.KVCache` (keys, values and biases preallocated; nothing
  is allocated or concatenated per token). The active rows are always the first ones: a finished
  request's row is refilled by moving the last active request into it, so decoding never spends work
  on finished rows.
- **Prefill** of newly admitted requests is one forward over their prompts, right-padded; requests with
  the same prompt (GRPO's group) are prefilled once and the row is copied. Only each prompt's last
  position goes through the LM head.
- **Decoding** is one forward of one token per active request. Requests admitted at different times
  have different lengths: each writes at its own row offset and sees only its own keys. On a GPU the
  step is replayed as a CUDA graph (:mod:`.graphs`; ``cuda_graphs=False`` or ``DOGE_CUDA_GRAPHS=0``
  decodes eagerly).
- **Continuous batching**: :meth:`Engine.submit` queues a request and :meth:`Engine.step` admits queued
  requests into free rows between decoding steps; :meth:`Engine.generate` runs a list to the end.
- **Per-request sampling** (:mod:`.sampling`): each request has its own settings and random stream, so
  its tokens do not depend on its neighbours; log-probabilities of the chosen tokens on request.
- **Streaming** (:mod:`.streaming`): ``on_text`` receives UTF-8-safe deltas that join to the final text.
- **Failures stay with their request where they can**: a request whose sampler cannot be made, or whose
  prompt's prefill raises (a token id outside the vocabulary, say), finishes in :meth:`Engine.step` with
  ``finish_reason == "error"`` and the exception in ``error``; the rows already running are not touched,
  and when a batch's prefill fails its prompts are prefilled again one at a time, so the requests
  admitted beside the bad one start as they would have.
  :meth:`Engine.generate` raises such an error instead (chat, eval and GRPO stop on it). A decoding step
  that raises involves every running row, so it propagates and the caller decides (the server fails the
  rows it was running and starts a fresh engine).
- **Stopping**: a request stops at one of its stop ids (kept as its last token), at a stop string (the
  text is cut before it), or after ``max_new_tokens``. Where every forward is collective (DeepSpeed
  ZeRO-3, FSDP), ``stop_together`` keeps a process whose requests are done running forwards until every
  process is done.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from doge_cli.chat_format import config_eos_ids
from doge_cli.inference.decode import decoder_for
from doge_cli.inference.graphs import GraphedDecoder
from doge_cli.inference.sampling import RowSampler, SamplingParams, choose_tokens
from doge_cli.inference.streaming import TextStream

MIN_CAPACITY = 64  # cache positions allocated at least; the cache doubles when a row outgrows it
logger = logging.getLogger(__name__)
_SAID: set[str] = set()


def _failed(request: Request, err: BaseException) -> Request:
    """``request`` could not start because of ``err``: it finishes with ``finish_reason == "error"``."""
    request.finish_reason, request.error = "error", err
    return request


def _index_tensor(values: list[int], device: torch.device) -> torch.Tensor:
    """An int64 tensor of ``values``; on a CPU through numpy (~3 µs against torch.tensor's ~10 µs from a
    list, which a decoding step at batch 1 pays twice)."""
    if device.type == "cpu":
        return torch.from_numpy(np.array(values, dtype=np.int64))
    return torch.tensor(values, dtype=torch.int64, device=device)


def _say_once(message: str) -> None:
    if message not in _SAID:
        _SAID.add(message)
        logger.warning(message)


@dataclass
class Request:
    """One generation: the prompt, how to generate, and (filled in) what was generated."""

    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    stop_token_ids: list[int] | None = None
    """Ids that end the reply (default: the engine's, i.e. the model's EOS ids)."""
    stop: list[str] = field(default_factory=list)
    """Strings that end the reply; the text stops before them (needs the engine's tokenizer)."""
    logprobs: bool = False
    """Record the log-probability of every chosen token (``token_logprobs``)."""
    on_text: Callable[[str], None] | None = None
    """Receives the reply's text as it grows, in UTF-8-safe deltas (needs the engine's tokenizer)."""
    generator: torch.Generator | None = None
    """The random stream of this request (default: one seeded from ``params.seed``)."""
    token_ids: list[int] = field(default_factory=list)
    """Generated ids, the stop id included when one ended the reply."""
    token_logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    """``"stop"`` (a stop id or string) or ``"length"`` (``max_new_tokens``)."""
    text: str | None = None
    """The reply's text (stop id excluded, cut before a stop string), when the engine has a tokenizer."""
    cancelled: bool = False
    """Set (from any thread) to stop generating for this request at the next step; it then finishes with
    ``finish_reason == "cancelled"`` and frees its row (a client that went away)."""
    id: str | None = None
    """A name for log lines (the server's request id)."""
    error: BaseException | None = None
    """Why :meth:`Engine.step` could not start this request (``finish_reason == "error"``); the requests
    already running were not touched."""


class _Running:
    """A request in a cache row: its sampler, stream and next position."""

    def __init__(self, request: Request, sampler: RowSampler, stops: set[int], stream: TextStream | None):
        self.request, self.sampler, self.stops, self.stream = request, sampler, stops, stream
        self.shown = ""  # text handed to on_text so far

    @property
    def position(self) -> int:
        """RoPE position of the token fed next (the latest chosen one)."""
        return len(self.request.prompt_ids) + len(self.request.token_ids) - 1


class Engine:
    def __init__(self, model, tokenizer=None, *, max_batch: int = 8, stop_token_ids: list[int] | None = None,
                 stop_together: Callable[[bool], bool] | None = None, cuda_graphs: bool | None = None,
                 compile: bool = False):
        """``cuda_graphs``: decode through CUDA graphs (:mod:`.graphs`). None: on a GPU unless the
        environment sets ``DOGE_CUDA_GRAPHS=0``; True on a CPU runs the graphed step's code eagerly
        (what the tests compare with the eager step); ignored where the weights are sharded.
        ``compile``: on a CPU, decode through the fixed-shape step compiled by torch.compile
        (:meth:`Decoder.compiled_static_step`; the first step of each new shape compiles for seconds);
        refused on a GPU, where CUDA graphs do that job."""
        self.model, self.tokenizer = model, tokenizer
        self.max_batch = max_batch
        self.stop_token_ids = list(stop_token_ids) if stop_token_ids is not None else config_eos_ids(model.config)
        self.stop_together = stop_together
        # Decoding reads the weights directly (inference/decode.py) where they are whole on this process;
        # where each forward gathers them (stop_together: ZeRO-3, FSDP) it goes through the model's forward.
        self.decoder = decoder_for(model) if stop_together is None else None
        if self.decoder is None:
            _say_once("generation: the weights are sharded across processes, so decoding runs through the "
                      "model's forward (slower than the engine's own decoding step)")
        if cuda_graphs is None:
            cuda_graphs = model.device.type == "cuda" and os.environ.get("DOGE_CUDA_GRAPHS", "1") != "0"
        self.graphs = None
        if compile:
            if model.device.type != "cpu":
                raise ValueError("compile is for decoding on a CPU; on a GPU the step runs as CUDA graphs")
            if self.decoder is not None:
                self.graphs = GraphedDecoder(self.decoder, max_batch, self._pad_id(), capture=False, compiled=True)
        elif cuda_graphs and self.decoder is not None:
            self.graphs = GraphedDecoder(self.decoder, max_batch, self._pad_id(), capture=model.device.type == "cuda")
        self.cache = None
        self.running: list[_Running] = []  # row i of the cache holds running[i]
        self.queue: deque[Request] = deque()

    # -- public ------------------------------------------------------------------------------
    def submit(self, request: Request) -> None:
        request.params.validate()
        if not isinstance(request.prompt_ids, list | tuple) or not all(isinstance(t, int) for t in request.prompt_ids):
            raise TypeError(f"prompt_ids must be a list of token ids, got {type(request.prompt_ids).__name__}")
        if not request.prompt_ids:
            raise ValueError("a request needs at least one prompt token")
        if (request.on_text is not None or request.stop) and self.tokenizer is None:
            raise ValueError("streaming text and stop strings need an engine with a tokenizer")
        self.queue.append(request)

    def idle(self) -> bool:
        return not self.running and not self.queue

    @torch.no_grad()
    def step(self) -> list[Request]:
        """Admit queued requests into free rows, then decode one token for every running request; returns
        the requests that finished."""
        finished = self._retire() + self._admit()  # cancelled requests leave before anything else runs
        if self.running:
            finished += self._decode()
        return finished

    @torch.no_grad()
    def generate(self, requests: list[Request]) -> list[Request]:
        """Run ``requests`` to the end (more than ``max_batch`` are admitted as rows free up)."""
        if self.stop_together is not None and len(requests) > self.max_batch:
            raise ValueError("with stop_together every request must fit in one batch (max_batch)")
        for request in requests:
            self.submit(request)
        while True:
            done = self.idle()
            if self.stop_together is not None:
                done = self.stop_together(done)
            if done:
                return requests
            for request in self._admit():
                if request.error is not None:
                    raise request.error
            if self.running:
                self._decode()
            elif self.stop_together is not None:  # every forward is collective: keep pace with the others
                self._idle_forward()

    # -- prefill -----------------------------------------------------------------------------
    def _admit(self) -> list[Request]:
        free = self.max_batch - len(self.running)
        if not self.queue or free <= 0:
            return []
        batch = [self.queue.popleft() for _ in range(min(free, len(self.queue)))]
        finished = [r for r in batch if r.cancelled]
        for request in finished:
            request.finish_reason = "cancelled"
        # Requests with the same prompt are prefilled once (the first one's row is copied for the others).
        groups: dict[tuple[int, ...], list[tuple[Request, RowSampler]]] = {}
        device = self.model.device
        for request in batch:
            if request.cancelled:
                continue
            try:
                sampler = RowSampler(request.params, self.model.config.vocab_size, request.prompt_ids, device,
                                     generator=request.generator)
            except Exception as err:
                finished.append(_failed(request, err))
                continue
            groups.setdefault(tuple(request.prompt_ids), []).append((request, sampler))
        if not groups:
            return finished
        try:
            logits = self._prefill(groups)
        except Exception:  # somebody's prompt broke the batch's forward: find whose, one prompt at a time
            logits = None
        if logits is not None:
            self._start_groups(list(groups.values()), logits)
        else:
            for prompt, group in groups.items():
                try:
                    logits = self._prefill({prompt: group})
                except Exception as err:
                    finished += [_failed(request, err) for request, _ in group]
                    continue
                self._start_groups([group], logits)
        return finished + self._retire()

    def _prefill(self, groups: dict[tuple[int, ...], list[tuple[Request, RowSampler]]]) -> torch.Tensor:
        """One forward over the groups' prompts into the free rows from ``len(running)`` on; the (P, V)
        logits of each prompt's last position. Nothing is taken: a failure here leaves the running rows as
        they were."""
        prompts, first = list(groups), len(self.running)
        longest = max(len(p) for p in prompts)
        self._ensure_cache(longest + max(r.params.max_new_tokens for group in groups.values() for r, _ in group))
        for row in range(first, first + len(prompts)):
            self.cache.reset_row(row)
        device = self.model.device
        ids = torch.full((len(prompts), longest), self._pad_id(), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, prompt in enumerate(prompts):
            ids[i, :len(prompt)] = torch.tensor(prompt)
            mask[i, :len(prompt)] = 1
        self.cache.window(first, first + len(prompts))
        out = self.model(ids.to(device), attention_mask=mask.to(device), past_key_values=self.cache,
                         position_ids=torch.arange(longest, device=device)[None].expand(len(prompts), longest),
                         return_hidden_states=True)
        last = torch.tensor([len(p) - 1 for p in prompts], device=device)
        return self._logits(out.hidden_states[torch.arange(len(prompts), device=device), last])

    def _start_groups(self, groups: list[list[tuple[Request, RowSampler]]], logits: torch.Tensor) -> None:
        """Rows ``len(running)`` on hold the groups' prompts (just prefilled); each further request with the
        same prompt gets a copy of its prompt's row after them."""
        first = len(self.running)
        for i, group in enumerate(groups):
            self._start(*group[0], logits[i])
        for i, group in enumerate(groups):
            for request, sampler in group[1:]:
                self.cache.copy_row(first + i, len(self.running))
                self._start(request, sampler, logits[i])

    def _start(self, request: Request, sampler: RowSampler, logits: torch.Tensor) -> None:
        """Put ``request`` in the next cache row and choose its first token from its prompt's logits."""
        stops = set(request.stop_token_ids if request.stop_token_ids is not None else self.stop_token_ids)
        stream = TextStream(self.tokenizer) if self.tokenizer is not None else None
        running = _Running(request, sampler, stops, stream)
        self.running.append(running)
        self._take(running, *sampler.choose(logits, request.logprobs))

    # -- decoding ----------------------------------------------------------------------------
    def _decode(self) -> list[Request]:
        n = len(self.running)
        device = self.model.device
        self.cache.window(0, n)
        token_ids, positions = [r.request.token_ids[-1] for r in self.running], [r.position for r in self.running]
        if self.graphs is not None:
            logits = self._graphed(token_ids, positions)
        elif self.decoder is not None:
            logits = self.decoder(_index_tensor(token_ids, device), _index_tensor(positions, device), self.cache)
        else:
            out = self.model(torch.tensor(token_ids, device=device)[:, None],
                             position_ids=torch.tensor(positions, device=device)[:, None],
                             past_key_values=self.cache, return_hidden_states=True)
            logits = self._logits(out.hidden_states[:, -1])
        tokens, logprobs = choose_tokens(logits, [r.sampler for r in self.running],
                                         [r.request.logprobs for r in self.running])
        for running, token, logprob in zip(self.running, tokens, logprobs):
            self._take(running, token, logprob)
        return self._retire()

    def _graphed(self, token_ids: list[int], positions: list[int]) -> torch.Tensor:
        """The step through CUDA graphs; a capture that fails is said once, and decoding goes on eagerly."""
        logits = self.graphs(token_ids, positions, self.cache)
        if self.graphs.failed is not None:
            _say_once(f"generation: {self.graphs.what} failed ({self.graphs.failed}); "
                      "decoding eagerly instead (slower)")
            self.graphs = None
        return logits

    def _idle_forward(self) -> None:
        """A forward whose result is dropped, for a process with nothing left to generate (stop_together)."""
        self._ensure_cache(MIN_CAPACITY)
        self.cache.reset_row(0)
        self.cache.window(0, 1)
        token = torch.tensor([[self._pad_id()]], device=self.model.device)
        self.model(token, position_ids=torch.zeros_like(token), past_key_values=self.cache, return_hidden_states=True)
        self.cache.reset_row(0)

    def _take(self, running: _Running, token: int, logprob: float | None) -> None:
        request = running.request
        request.token_ids.append(token)
        if logprob is not None:
            request.token_logprobs.append(logprob)
        if token in running.stops:
            request.finish_reason = "stop"
        elif running.stream is not None:
            running.stream.push(token)
            self._emit(running, final=False)
        if request.finish_reason is None and len(request.token_ids) >= request.params.max_new_tokens:
            request.finish_reason = "length"

    def _emit(self, running: _Running, final: bool) -> None:
        """Hand on_text the new text, cut before a stop string; near the end hold back what could be the
        start of one."""
        request = running.request
        text = running.stream.emitted if not final else running.stream.emitted + running.stream.finish()
        for stop in request.stop:
            at = text.find(stop)
            if at >= 0:
                text = text[:at]
                request.finish_reason = "stop"
        if request.finish_reason is None and request.stop:
            text = text[:max(len(running.shown), len(text) - max(len(s) for s in request.stop) + 1)]
        if len(text) > len(running.shown):
            if request.on_text is not None:
                request.on_text(text[len(running.shown):])
            running.shown = text

    def _retire(self) -> list[Request]:
        """Finish the requests that stopped; keep the running ones in the first rows."""
        finished = []
        row = 0
        while row < len(self.running):
            running = self.running[row]
            if running.request.cancelled and running.request.finish_reason is None:
                running.request.finish_reason = "cancelled"
            if running.request.finish_reason is None:
                row += 1
                continue
            if running.stream is not None:
                self._emit(running, final=True)
                running.request.text = running.shown
            finished.append(running.request)
            last = len(self.running) - 1
            if row != last:  # the last running request moves into the freed row
                self.cache.copy_row(last, row)
                self.running[row] = self.running[last]
            self.running.pop()
        return finished

    # -- pieces ------------------------------------------------------------------------------
    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden).float()

    def _pad_id(self) -> int:
        pad = self.model.config.pad_token_id
        return pad if pad is not None else 0

    def _ensure_cache(self, positions: int) -> None:
        from doge_cli.model.modeling import KVCache

        if self.cache is None:
            capacity = max(MIN_CAPACITY, positions)
            self.cache = KVCache(self.model.config, self.max_batch, capacity, dtype=self.model.dtype,
                                 device=self.model.device)
