"""Shared language-model pieces: labels, padding targets, per-token log-probabilities, padding."""

import torch

from doge_cli.train.objectives.lm import (
    next_token_labels,
    pad_left,
    pad_right,
    padding_targets,
    token_logprobs,
)


def test_labels_stop_at_document_starts_and_padding():
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    pos = torch.tensor([[0, 1, 0, 1, 2]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    assert next_token_labels(ids, pos, mask).tolist() == [[6, -100, 8, -100, -100]]


def test_padding_targets_are_found_by_position_when_pad_is_eos():
    eos = pad = 2
    ids = torch.tensor([[5, 6, eos, 7, 8, eos, pad, pad, pad]])
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 0, 1, 2]])
    labels = next_token_labels(ids, pos, None)
    labels[padding_targets(ids, pos, pad)] = -100
    # Both end-of-document targets stay; nothing inside the padding is a target, nor is entering it.
    assert labels.tolist() == [[6, eos, -100, 8, eos, -100, -100, -100, -100]]


def test_padding_without_positions_is_the_trailing_run_and_its_entry():
    pad = 0
    ids = torch.tensor([[5, 6, 7, pad, pad]])
    assert padding_targets(ids, None, pad).tolist() == [[False, False, True, True, True]]


def test_token_logprobs_equal_a_log_softmax_of_the_logits():
    from transformers import DogeConfig

    from doge_cli.model import DogeForCausalLM

    gen = torch.Generator().manual_seed(0)
    config = DogeConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, router_aux_loss_coef=0.0,
                        tie_word_embeddings=False)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = DogeForCausalLM(config, attn_implementation="eager")
    ids = torch.randint(0, 50, (2, 7), generator=gen)
    targets = torch.full_like(ids, -100)
    targets[:, 2:5] = ids[:, 3:6]
    for temperature in (1.0, 0.7):
        got = token_logprobs(model, ids, None, targets, temperature=temperature)
        logits = model(ids).logits / temperature
        want = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
        want = want.masked_fill(targets == -100, 0.0)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Only a window of positions reaches the head when ``start`` is given.
    window = token_logprobs(model, ids, None, targets[:, 2:5], start=2)
    torch.testing.assert_close(window, token_logprobs(model, ids, None, targets)[:, 2:5])


def test_padding_helpers():
    assert pad_right([[1, 2], [3]], 0).tolist() == [[1, 2], [3, 0]]
    assert pad_left([[1, 2], [3]], 0).tolist() == [[1, 2], [0, 3]]
