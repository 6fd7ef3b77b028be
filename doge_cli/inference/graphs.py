"""Decoding steps replayed as CUDA graphs: one launch per token instead of hundreds.

A small model's decoding step on a GPU is bound by kernel launches, not arithmetic: Doge-20M's step is a
few hundred small kernels of a few microseconds each, so the GPU idles while Python issues them. A CUDA
graph records the step's kernels once and replays them with one call.

A graph replays fixed shapes at fixed addresses, so the graphed step (:meth:`Decoder.static_step`) is
written to need no host values:

- **Batch buckets.** ``n`` running rows are decoded by the graph of the smallest bucket ``>= n`` (powers
  of two up to the engine's ``max_batch``, and ``max_batch`` itself). The bucket's extra rows are free
  cache rows (the engine keeps its running rows first); they decode a padding token into position 0 of
  their own row, which the next request to take the row resets, and their results are dropped. A
  CDMoE model gets a graph for every batch size instead: its router splits the batch's flat logits in
  halves across tokens (as transformers does, and as released checkpoints were trained), so a padding
  row would change its neighbours' experts.
- **The whole cache.** Each row attends over every position of the cache's capacity, masked by the
  cache's validity mask, and writes its new key at its own position (a device tensor). The eager step
  attends over the positions written so far: the same keys with the same weights, so the same
  probabilities; only the lengths of the reductions differ (compared in tests/inference/test_graphs.py).
- **Static inputs.** Tokens, positions and write positions are copied into buffers the graphs read, in
  one host-to-device copy per step; the logits come back copied out of the graph's output.

Graphs are captured lazily, the first time a bucket is needed, from the step being decoded: the warm-up
runs are that step itself (running it again writes the same keys at the same positions), so capture
never disturbs a running request. A cache that grows (a new, larger buffer) drops every graph; the
next steps capture again. All graphs of an engine share one memory pool.

On a CPU there is nothing to capture: ``capture=False`` runs the same static step eagerly, which is how
the tests check it against the eager step on a machine without a GPU.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def buckets(max_batch: int, exact: bool = False) -> list[int]:
    """The batch sizes graphs are captured for: 1, 2, 4, ... below ``max_batch``, and ``max_batch``; with
    ``exact`` every size from 1 to ``max_batch``."""
    if exact:
        return list(range(1, max_batch + 1))
    sizes, size = [], 1
    while size < max_batch:
        sizes.append(size)
        size *= 2
    return sizes + [max_batch]


class GraphedDecoder:
    """Runs :class:`~doge_cli.inference.decode.Decoder` steps for an engine's cache, as CUDA graphs when
    ``capture`` (else the same static step, eagerly)."""

    def __init__(self, decoder, max_batch: int, pad_id: int, capture: bool, compiled: bool = False):
        """``compiled`` (with ``capture=False``): run the static step through torch.compile instead of eagerly."""
        self.decoder, self.max_batch, self.pad_id, self.capture = decoder, max_batch, pad_id, capture
        self.compiled = compiled and not capture
        self.what = "compiling the decoding step with torch.compile" if self.compiled else \
            "capturing the decoding step as a CUDA graph"
        self.buckets = buckets(max_batch, exact=any(not layer.dense for layer in decoder.layers))
        self.graphs: dict[int, tuple] = {}  # bucket -> (graph, logits it writes)
        self.captures = 0  # graphs captured so far (re-captures after the cache grew included)
        self._cache_buffer = None  # the cache's key buffer the graphs were captured on
        self._pool = None
        self.failed: str | None = None  # why a capture failed (the step then ran eagerly; the engine stops using graphs)
        device = decoder.embed.device
        # Row 0: tokens, 1: RoPE positions, 2: write positions. One staging tensor, one copy a step.
        self._inputs = torch.zeros(3, max_batch, dtype=torch.long, device=device)
        self._staging = torch.zeros(3, max_batch, dtype=torch.long, pin_memory=device.type == "cuda")

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    @torch.no_grad()
    def __call__(self, tokens: list[int], positions: list[int], cache) -> torch.Tensor:
        """One new token for each of the first ``len(tokens)`` rows (the cache's window) -> (n, V) fp32
        logits."""
        n = len(tokens)
        if n > self.max_batch:
            raise ValueError(f"{n} rows but graphs for at most {self.max_batch}")
        starts = cache.lengths[:n]
        cache.begin(1, None)  # reserves the positions (and grows the buffers when a row needs it)
        if cache.keys[0] is not self._cache_buffer:
            # Captured on the old buffers. Their memory pool goes with them: once no graph uses a pool,
            # capturing into it again trips an allocator assertion (seen with torch 2.11 on an H200).
            self.graphs.clear()
            self._pool = None
            self._cache_buffer = cache.keys[0]
        b = self.bucket(n)
        staged = self._staging
        staged[:, n:b] = 0
        staged[0, n:b] = self.pad_id
        staged[0, :n] = torch.tensor(tokens)
        staged[1, :n] = torch.tensor(positions)
        staged[2, :n] = torch.tensor(starts)
        self._inputs[:, :b].copy_(staged[:, :b], non_blocking=True)
        if self.compiled:
            try:
                return self.decoder.compiled_static_step()(*self._static_inputs(b), cache)[:n].clone()
            except Exception as err:  # a compiler missing or failing: the same step eagerly, said once by the engine
                self.failed = str(err).splitlines()[0] if str(err) else type(err).__name__
                self.compiled = False
        if not self.capture:
            return self._step(b, cache)[:n].clone()
        if b not in self.graphs:
            try:
                self.graphs[b] = self._capture(b, cache)
            except RuntimeError as err:  # this step was reserved already: it runs the same code eagerly
                self.failed = str(err).splitlines()[0] if str(err) else type(err).__name__
                self.capture = False
                torch.cuda.synchronize()
                return self._step(b, cache)[:n].clone()
        graph, logits = self.graphs[b]
        graph.replay()
        return logits[:n].clone()

    def _static_inputs(self, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._inputs[0, :b], self._inputs[1, :b], self._inputs[2, :b]

    def _step(self, b: int, cache) -> torch.Tensor:
        return self.decoder.static_step(*self._static_inputs(b), cache)

    def _capture(self, b: int, cache) -> tuple:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the capture stream, as CUDA graphs need
            for _ in range(2):
                self._step(b, cache)
        torch.cuda.current_stream().wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            logits = self._step(b, cache)
        self.captures += 1
        logger.debug("captured the decoding step for %d rows over %d cache positions", b, cache.capacity)
        return graph, logits
