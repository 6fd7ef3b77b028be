"""The CUDA-graph decoding step: the graphed code (run eagerly on the CPU) against the eager step, through
continuous batching, padded buckets, the keep window, cache growth and every kind of Doge; on a GPU, the
captured graphs against eager decoding, token for token."""

from __future__ import annotations

import logging

import pytest
import torch

from doge_cli.inference import Engine, Request, SamplingParams
from doge_cli.inference.graphs import GraphedDecoder, buckets
from tests.model.doge_twin import hf_twin, ours_from, tiny_config

KINDS = {
    "gqa": {},
    "moe": dict(is_moe=True, num_experts=16, num_experts_per_tok=4),
    "biases": dict(attention_bias=True, mlp_bias=True, num_key_value_heads=4),
}


def _model(dtype=torch.float64, **overrides):
    config = tiny_config(**{"eos_token_id": None, "keep_window_size": 6, **overrides})
    return ours_from(hf_twin(config), "eager").to(dtype)


def _requests(sampled: bool = False) -> list[Request]:
    """Seven requests of different prompt and reply lengths; the sixth's prompt outgrows the cache the
    first batch sized (64 positions), so the cache grows while others are running."""
    gen = torch.Generator().manual_seed(11)
    shapes = [(9, 14), (3, 5), (12, 20), (1, 9), (6, 3), (70, 12), (4, 16)]
    out = []
    for i, (prompt, new) in enumerate(shapes):
        ids = torch.randint(3, 120, (prompt,), generator=gen).tolist()
        params = SamplingParams(max_new_tokens=new, seed=i, temperature=0.9) if sampled else \
            SamplingParams(greedy=True, max_new_tokens=new)
        out.append(Request(ids, params, logprobs=True))
    return out


def _run(model, graphs: bool, sampled: bool = False, max_batch: int = 5) -> tuple[list[Request], Engine]:
    engine = Engine(model, max_batch=max_batch, cuda_graphs=graphs)
    requests = _requests(sampled)
    for request in requests[:3]:  # three start, the rest join as rows free up (continuous batching)
        engine.submit(request)
    engine.step()
    engine.step()
    for request in requests[3:]:
        engine.submit(request)
    while not engine.idle():
        engine.step()
    return requests, engine


def test_buckets_cover_every_batch_up_to_the_engines():
    assert buckets(1) == [1]
    assert buckets(5) == [1, 2, 4, 5]
    assert buckets(8) == [1, 2, 4, 8]
    assert buckets(3, exact=True) == [1, 2, 3]  # CDMoE: no padding rows, which would change the routing
    graphs = GraphedDecoder.__new__(GraphedDecoder)
    graphs.buckets = buckets(6)
    assert [graphs.bucket(n) for n in range(1, 7)] == [1, 2, 4, 4, 6, 6]


@pytest.mark.parametrize("kind", KINDS)
def test_the_graphed_step_decodes_what_the_eager_step_decodes(kind):
    model = _model(**KINDS[kind])
    eager, _ = _run(model, graphs=False)
    graphed, engine = _run(model, graphs=True)
    assert engine.graphs is not None and not engine.graphs.capture  # the graph's code, run eagerly (CPU)
    assert engine.graphs.buckets == ([1, 2, 3, 4, 5] if kind == "moe" else [1, 2, 4, 5])
    assert engine.cache.capacity > 64  # the long prompt made the cache grow mid-run
    for a, b in zip(eager, graphed):
        assert a.token_ids == b.token_ids
        assert a.finish_reason == b.finish_reason == "length"
        torch.testing.assert_close(torch.tensor(b.token_logprobs), torch.tensor(a.token_logprobs),
                                   rtol=0, atol=1e-10)


def test_sampled_requests_draw_the_same_tokens_through_the_graphed_step():
    model = _model()
    eager, _ = _run(model, graphs=False, sampled=True)
    graphed, _ = _run(model, graphs=True, sampled=True)
    assert [r.token_ids for r in eager] == [r.token_ids for r in graphed]


def test_a_legacy_model_decodes_the_same_through_the_graphed_step():
    model = _model(num_key_value_heads=2)
    model.config.small_doge_legacy = True
    legacy = type(model)(model.config, attn_implementation="eager").to(torch.float64).eval()
    eager, _ = _run(legacy, graphs=False)
    graphed, _ = _run(legacy, graphs=True)
    assert [r.token_ids for r in eager] == [r.token_ids for r in graphed]


def test_padding_rows_only_write_into_free_rows():
    """Three running rows decode in the 4-row bucket: the fourth row is free, and the running rows'
    keys equal the eager step's."""
    model = _model()
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    caches = []
    for graphs in (False, True):
        engine = Engine(model, max_batch=4, cuda_graphs=graphs)
        for p in prompts:
            engine.submit(Request(p, SamplingParams(greedy=True, max_new_tokens=4)))
        engine.step()
        engine.step()
        caches.append(engine.cache)
    eager, graphed = caches
    assert eager.lengths[:3] == graphed.lengths[:3] and graphed.lengths[3] == 0
    assert torch.equal(eager.valid[:3], graphed.valid[:3]) and not graphed.valid[3].any()
    for layer in range(model.config.num_hidden_layers):
        for a, b in ((eager.keys, graphed.keys), (eager.values, graphed.values)):
            for row, length in enumerate(eager.lengths[:3]):
                torch.testing.assert_close(b[layer][row, :, :length], a[layer][row, :, :length], rtol=0, atol=1e-12)


def test_a_capture_that_fails_is_said_once_and_decoding_goes_on_eagerly(monkeypatch, caplog):
    model = _model()
    eager, _ = _run(model, graphs=False)
    engine = Engine(model, max_batch=5, cuda_graphs=True)
    engine.graphs.capture = True  # as on a GPU; the capture itself fails

    def refuse(b, cache):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(engine.graphs, "_capture", refuse)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    requests = _requests()
    with caplog.at_level(logging.WARNING):
        engine.generate(requests)
    assert [r.token_ids for r in requests] == [r.token_ids for r in eager]
    assert engine.graphs is None
    said = [r.message for r in caplog.records if "CUDA graph" in r.message]
    assert len(said) == 1 and "stream is capturing" in said[0] and "eagerly" in said[0]


def test_the_compiled_cpu_step_decodes_what_the_eager_step_decodes():
    """Engine(compile=True): the static step through torch.compile (float64, so rounding cannot flip a token),
    one row (one compile: each takes many seconds) past the keep window, the cache growing between requests
    (its capacity is a dynamic dimension: no recompile)."""
    model = _model()
    picked = [4, 5, 0]  # 6+3 tokens, 70+12 (outgrows the first cache), 9+14
    eager = [_requests()[i] for i in picked]
    Engine(model, max_batch=1).generate(eager)
    compiled = [_requests()[i] for i in picked]
    engine = Engine(model, max_batch=1, compile=True)
    engine.generate(compiled)
    assert engine.graphs is not None and engine.graphs.compiled and engine.graphs.failed is None
    assert [r.token_ids for r in compiled] == [r.token_ids for r in eager]
    for a, b in zip(compiled, eager):  # log-probabilities are fp32 (the logits are)
        torch.testing.assert_close(a.token_logprobs, b.token_logprobs, rtol=1e-5, atol=1e-5)


def test_a_compile_that_fails_is_said_once_and_decoding_goes_on_eagerly(monkeypatch, caplog):
    model = _model()
    eager, _ = _run(model, graphs=False)
    engine = Engine(model, max_batch=5, compile=True)

    def broken():
        def step(*args):
            raise RuntimeError("InductorError: no C++ compiler found")
        return step

    monkeypatch.setattr(engine.decoder, "compiled_static_step", broken)
    requests = _requests()
    with caplog.at_level(logging.WARNING):
        engine.generate(requests)
    assert [r.token_ids for r in requests] == [r.token_ids for r in eager]
    said = [r.message for r in caplog.records if "torch.compile" in r.message]
    assert len(said) == 1 and "no C++ compiler" in said[0] and "eagerly" in said[0]


def test_graphs_are_off_on_a_cpu_unless_asked_and_off_when_the_environment_says_so(monkeypatch):
    model = _model()
    assert Engine(model).graphs is None
    assert Engine(model, cuda_graphs=True).graphs is not None
    monkeypatch.setenv("DOGE_CUDA_GRAPHS", "0")
    assert Engine(model, cuda_graphs=None).graphs is None


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graphs_decode_token_for_token_what_eager_decoding_does(dtype):
    model = _model(dtype=dtype).cuda()
    eager, _ = _run(model, graphs=False)
    graphed, engine = _run(model, graphs=True)
    assert engine.graphs is not None and engine.graphs.capture and engine.graphs.failed is None
    assert engine.graphs.captures >= 2  # several buckets, and again after the cache grew
    assert [r.token_ids for r in eager] == [r.token_ids for r in graphed]
