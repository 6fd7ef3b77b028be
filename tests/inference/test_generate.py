"""generate() through the engine: greedy equals transformers' generate; padding, sampling, stops."""

from __future__ import annotations

import torch

from doge_cli.inference import generate
from tests.model.doge_twin import hf_twin, ours_from, tiny_config


def _pair(**overrides):
    hf = hf_twin(tiny_config(**{"eos_token_id": None, "keep_window_size": 12, **overrides}))
    return hf, ours_from(hf, "sdpa")


def test_greedy_32_tokens_match_transformers_generate():
    # A keep window longer than the sequence: greedy decoding of a random model repeats tokens, whose
    # first-layer biases tie, and at a tie transformers keeps whatever torch.topk returns while doge
    # follows its documented rule. The top-k cut during decoding is checked by the next test.
    hf, ours = _pair(keep_window_size=64)
    prompt = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(7))
    ref = hf.generate(prompt, max_new_tokens=32, do_sample=False)
    out = generate(ours, prompt, max_new_tokens=32)
    assert out.sequences.shape == (1, 38)
    assert torch.equal(out.sequences, ref)
    assert out.lengths.tolist() == [32]


def test_cached_decoding_keeps_the_same_keys_as_the_full_forward():
    """With the top-k cut active (keep window 12 < 38 keys), each cached decoding step picks the token the
    full, uncached forward of the same sequence picks: the cache changes nothing about which keys count."""
    _, ours = _pair()
    prompt = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(7))
    out = generate(ours, prompt, max_new_tokens=32)
    with torch.no_grad():
        logits = ours(out.sequences).logits
    assert torch.equal(logits[0, 5:-1].argmax(-1), out.sequences[0, 6:])


def test_left_padded_batch_matches_transformers_generate():
    hf, ours = _pair(num_key_value_heads=1)
    gen = torch.Generator().manual_seed(8)
    prompts = torch.randint(3, 128, (3, 9), generator=gen)
    mask = torch.ones_like(prompts)
    mask[0, :4] = 0
    mask[2, :7] = 0
    prompts = prompts.masked_fill(mask == 0, 0)
    ref = hf.generate(prompts, attention_mask=mask, max_new_tokens=20, do_sample=False)
    out = generate(ours, prompts, attention_mask=mask, max_new_tokens=20)
    assert torch.equal(out.sequences, ref)
    # Each row equals that prompt generated alone, without padding.
    alone = generate(ours, prompts[2:, 7:], max_new_tokens=20)
    assert torch.equal(alone.new_tokens, out.new_tokens[2:])


def test_stop_tokens_pad_the_rest_and_report_lengths():
    _, ours = _pair()
    prompt = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(9))
    free = generate(ours, prompt, max_new_tokens=10)
    stop = int(free.new_tokens[0, 3])
    first = int((free.new_tokens[0] == stop).nonzero()[0])
    out = generate(ours, prompt, max_new_tokens=10, stop_token_ids=[stop], pad_token_id=0)
    assert out.lengths[0] == first + 1
    assert torch.equal(out.new_tokens[0, : first + 1], free.new_tokens[0, : first + 1])
    assert (out.new_tokens[0, first + 1 :] == 0).all()


def test_sampling_is_seeded_and_grouped_for_grpo():
    _, ours = _pair()
    prompt = torch.tensor([[5, 6, 7], [8, 9, 10]])
    kwargs = dict(max_new_tokens=8, do_sample=True, temperature=1.5, top_k=50, top_p=0.9, repetition_penalty=1.3,
                  num_return_sequences=4)
    a = generate(ours, prompt, generator=torch.Generator().manual_seed(0), **kwargs)
    b = generate(ours, prompt, generator=torch.Generator().manual_seed(0), **kwargs)
    assert a.sequences.shape == (8, 11)
    assert torch.equal(a.sequences, b.sequences)
    assert torch.equal(a.sequences[:4, :3], prompt[:1].expand(4, 3))
    assert len({tuple(r) for r in a.new_tokens[:4].tolist()}) > 1  # samples of one prompt differ
