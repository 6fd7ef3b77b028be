"""Sampling: processors against transformers' own on the same logits; settings checked."""

import pytest
import torch

from doge_cli.errors import DogeError
from doge_cli.inference.sampling import (
    RowSampler,
    SamplingParams,
    apply_repetition_penalty,
    filter_top_k_top_p,
)


def _logits(seed=1, rows=4, vocab=50):
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_top_k_top_p_filter_matches_transformers_warpers():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = _logits()
    ours = filter_top_k_top_p(logits, top_k=20, top_p=0.8)
    ref = TopPLogitsWarper(0.8)(None, TopKLogitsWarper(20)(None, logits.clone()))
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    torch.testing.assert_close(ours[~torch.isinf(ours)], ref[~torch.isinf(ref)])


def test_repetition_penalty_and_temperature_match_transformers():
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
    )

    logits = _logits(seed=2)
    seen_ids = torch.tensor([[1, 4, 7], [0, 2, 2], [9, 9, 9], [3, 5, 49]])
    seen = torch.zeros_like(logits, dtype=torch.bool).scatter(1, seen_ids, True)
    ours = apply_repetition_penalty(logits, seen, 1.3) / 0.7
    ref = TemperatureLogitsWarper(0.7)(seen_ids, RepetitionPenaltyLogitsProcessor(1.3)(seen_ids, logits.clone()))
    torch.testing.assert_close(ours, ref)


def test_a_row_sampler_is_reproducible_and_reports_the_temperature_logprob():
    logits = _logits(seed=3)[0]
    params = SamplingParams(temperature=0.7, top_p=0.9, top_k=10, seed=5)
    a = [RowSampler(params, 50, [1, 2], "cpu").choose(logits, True) for _ in range(2)]
    assert a[0] == a[1]
    token, logprob = a[0]
    assert logprob == pytest.approx(float(torch.log_softmax(logits / 0.7, -1)[token]))
    greedy = RowSampler(SamplingParams(greedy=True), 50, [1], "cpu").choose(logits, True)
    assert greedy[0] == int(logits.argmax())


@pytest.mark.parametrize("field, value, message", [("temperature", "0", "temperature must be at least"),
                                                   ("temperature", "1e-45", "temperature must be at least 0.0001"),
                                                   ("seed", str(2**64), "seed must be an integer from"),
                                                   ("seed", str(-(2**63) - 1), "seed must be an integer from"),
                                                   ("top_p", "1.5", "top_p"), ("top_k", "-1", "top_k"),
                                                   ("max_new_tokens", "0", "max_new_tokens"),
                                                   ("temperature", "nan", "finite"), ("nope", "1", "unknown parameter")])
def test_bad_settings_are_refused_and_leave_the_old_value(field, value, message):
    params = SamplingParams()
    with pytest.raises(DogeError, match=message):
        params.set(field, value)
    assert params == SamplingParams()


def test_draws_follow_the_filtered_distribution():
    from doge_cli.inference.sampling import choose_tokens

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0]])
    params = SamplingParams(temperature=1.0, top_k=4, top_p=1.0, seed=11)
    sampler = RowSampler(params, 5, [0], "cpu")
    counts = torch.zeros(5)
    for _ in range(4000):
        counts[choose_tokens(logits, [sampler], [False])[0][0]] += 1
    want = torch.softmax(logits[0, :4], -1)
    assert counts[4] == 0  # filtered out by top-k
    assert torch.allclose(counts[:4] / 4000, want, atol=0.03)


def test_rows_with_different_settings_in_one_batch_each_follow_their_own():
    from doge_cli.inference.sampling import choose_tokens

    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(2))
    samplers = [RowSampler(SamplingParams(greedy=True), 40, [1], "cpu"),
                RowSampler(SamplingParams(temperature=0.5, top_k=5, seed=1), 40, [1], "cpu"),
                RowSampler(SamplingParams(temperature=1.5, top_p=0.5, seed=2, repetition_penalty=1.2), 40, [1], "cpu")]
    together, _ = choose_tokens(logits, samplers, [False] * 3)
    alone = [RowSampler(s.params, 40, [1], "cpu").choose(logits[i], False)[0] for i, s in enumerate(samplers)]
    assert together == alone and together[0] == int(logits[0].argmax())


@pytest.mark.parametrize("tries", [8, 0])  # 0: every row's nucleus is built by sorting
@pytest.mark.parametrize("top_k, top_p", [(0, 0.7), (6, 0.5), (0, 0.05)])
def test_nucleus_draws_follow_the_nucleus(monkeypatch, tries, top_k, top_p):
    """Draws (with or without the sort-free path) follow transformers' top-k/top-p filtered distribution."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    from doge_cli.inference import sampling

    monkeypatch.setattr(sampling, "NUCLEUS_TRIES", tries)
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.2, 0.0, -0.5, -1.0, -3.0, -30.0]])
    ref = logits.clone()
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    want = torch.softmax(TopPLogitsWarper(top_p)(None, ref), -1)[0]
    params = SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p, seed=3)
    samplers = [RowSampler(params, 10, [0], "cpu") for _ in range(4)]  # four rows in one batch
    counts = torch.zeros(10)
    for _ in range(1000):
        for token in sampling.choose_tokens(logits.expand(4, 10), samplers, [False] * 4)[0]:
            counts[token] += 1
    assert torch.all(counts[want == 0] == 0)
    assert torch.allclose(counts / counts.sum(), want, atol=0.03)


def test_a_nucleus_row_does_not_depend_on_its_neighbours():
    from doge_cli.inference.sampling import choose_tokens

    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(4)) * 0.3  # flat: several tries
    params = [SamplingParams(temperature=1.0, top_p=0.3, seed=s) for s in range(5)]
    batch = [RowSampler(p, 300, [1], "cpu") for p in params]
    together = [choose_tokens(logits, batch, [False] * 5)[0] for _ in range(20)]
    solo = [RowSampler(p, 300, [1], "cpu") for p in params]
    alone = [[solo[i].choose(logits[i], False)[0] for i in range(5)] for _ in range(20)]
    assert together == alone


def test_the_extreme_seeds_torch_takes_are_accepted():
    for seed in (2**64 - 1, -(2**63), 0):
        params = SamplingParams(seed=seed)
        params.validate()
        RowSampler(params, 50, [1], "cpu")  # seeds its generator: no overflow


def test_greedy_tokens_follow_torch_argmax_on_ties_nans_and_infinities():
    """The CPU fast path (numpy's argmax) picks what torch.argmax picks: the first maximum, the first NaN."""
    from doge_cli.inference.sampling import greedy_tokens

    gen = torch.Generator().manual_seed(3)
    logits = torch.randint(0, 4, (6, 300), generator=gen).float()  # many ties
    logits[1, 7] = logits[1, 200] = float("inf")
    logits[2, 50] = logits[2, 9] = float("nan")
    logits[3] = float("-inf")
    logits[4, 299] = 99.0
    logits[5, 0] = float("nan")
    for rows in (logits, logits[1:4], logits[:, ::2], logits.t().contiguous().t()):
        chosen = greedy_tokens(rows)
        assert chosen.dtype == torch.long and torch.equal(chosen, rows.argmax(dim=-1))
    assert greedy_tokens(logits).tolist()[1:5] == [7, 9, 0, 299]
    half = logits.to(torch.bfloat16)  # other dtypes keep torch's argmax
    assert torch.equal(greedy_tokens(half), half.argmax(dim=-1))
