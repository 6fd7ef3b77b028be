"""The engine's decoding step equals the model's own forward, for every kind of Doge."""

import pytest
import torch

from doge_cli.inference.decode import Decoder, decoder_for
from doge_cli.model.modeling import KVCache
from tests.model.doge_twin import hf_twin, ours_from, tiny_config

KINDS = {
    "gqa": {},
    "moe": dict(is_moe=True, num_experts=16, num_experts_per_tok=4),
    "biases": dict(attention_bias=True, mlp_bias=True, num_key_value_heads=4),
    "top-k": dict(keep_window_size=6),
}


def _prefilled(model, rows, length, dtype=torch.float32):
    """A cache holding rows of different lengths (left rows shorter: padding at their ends)."""
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(3, model.config.vocab_size, (rows, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, length - 3:] = 0  # the first row's prompt is 3 tokens shorter (right padding)
    cache = KVCache(model.config, rows, 4, dtype=dtype, device="cpu")  # small: it must grow
    with torch.no_grad():
        model(ids, attention_mask=mask, past_key_values=cache, position_ids=torch.arange(length)[None].expand(rows, -1))
    return cache, mask


@pytest.mark.parametrize("kind", KINDS)
def test_decoding_steps_equal_the_model_forward(kind):
    model = ours_from(hf_twin(tiny_config(**KINDS[kind])), "eager")
    decoder = Decoder(model)
    fast, mask = _prefilled(model, 3, 10)
    slow, _ = _prefilled(model, 3, 10)
    lengths = mask.sum(1)
    tokens = torch.tensor([5, 6, 7])
    for step in range(9):  # past the keep window and the cache's capacity
        positions = lengths + step
        got = decoder(tokens, positions, fast)
        with torch.no_grad():
            out = model(tokens[:, None], position_ids=positions[:, None], past_key_values=slow)
        torch.testing.assert_close(got, out.logits[:, -1].float(), rtol=1e-4, atol=1e-4)
        tokens = got.argmax(-1)


def test_a_legacy_model_decodes_like_its_forward():
    model = ours_from(hf_twin(tiny_config(num_key_value_heads=2)), "eager")
    model.config.small_doge_legacy = True
    legacy = type(model)(model.config, attn_implementation="eager").eval()
    decoder = Decoder(legacy)
    fast, mask = _prefilled(legacy, 2, 8)
    slow, _ = _prefilled(legacy, 2, 8)
    tokens, positions = torch.tensor([5, 6]), mask.sum(1)
    got = decoder(tokens, positions, fast)
    with torch.no_grad():
        want = legacy(tokens[:, None], position_ids=positions[:, None], past_key_values=slow).logits[:, -1]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_low_precision_weights_decode_in_fp32_on_cpu_and_the_decoder_is_kept_until_they_change():
    model = ours_from(hf_twin(tiny_config()), "eager").to(torch.bfloat16)
    decoder = decoder_for(model)
    assert decoder.dtype == torch.float32 and decoder.layers[0].qkv.keywords["weight"].dtype == torch.float32
    assert decoder_for(model) is decoder
    with torch.no_grad():
        model.lm_head.weight.add_(1)  # an optimizer step changes weights in place
    assert decoder_for(model) is not decoder


def test_a_copy_of_a_model_that_decoded_prepares_its_own_decoder():
    # The kept decoder is a cache of pointers into this model's weights (the fused CPU step's ctypes
    # structures cannot even be copied): a deep copy must not carry it, and must decode from its own weights.
    import copy
    import pickle

    model = ours_from(hf_twin(tiny_config()), "eager")
    decoder = decoder_for(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.lm_head.weight.mul_(-1)
    assert decoder_for(twin) is not decoder and decoder_for(twin).model is twin
    cache, mask = _prefilled(model, 2, 5)
    tokens, positions = torch.tensor([5, 6]), mask.sum(1)
    mine = decoder_for(model)(tokens, positions, copy.deepcopy(cache))
    theirs = decoder_for(twin)(tokens, positions, cache)
    torch.testing.assert_close(theirs, -mine, rtol=1e-4, atol=1e-4)
    assert decoder_for(pickle.loads(pickle.dumps(model))) is not decoder
