"""Weight-only int8 (``--quantize int8``): the layer's arithmetic against a float64 oracle, which layers are
replaced, and the quantized model's decoding step against its own forward."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from doge_cli.model.quantize import Int8Linear, quantize_int8
from tests.model.doge_twin import hf_twin, ours_from, tiny_config


def test_an_int8_layer_is_its_rounded_weight_times_its_scales():
    gen = torch.Generator().manual_seed(0)
    linear = nn.Linear(64, 48, bias=True)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(48, 64, generator=gen))
        linear.bias.copy_(torch.randn(48, generator=gen))
    q = Int8Linear(linear)
    assert q.qweight.dtype == torch.int8 and q.qweight.abs().amax(1).min() >= 126  # each row spans the range
    dequantized = q.qweight.double() * q.scales.double()[:, None]
    assert ((dequantized - linear.weight.double()).abs() <= q.scales.double()[:, None] * 0.51).all()
    x = torch.randn(3, 5, 64, generator=gen)
    want = x.bfloat16().double() @ dequantized.T + linear.bias.double()  # the kernel takes bf16 activations
    got = q(x)
    assert got.shape == (3, 5, 48) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=2e-2)  # bf16 output rounding


def test_blocks_and_head_are_quantized_and_the_rest_is_not():
    model = ours_from(hf_twin(tiny_config(tie_word_embeddings=True)), "eager")
    embedding = model.model.embed_tokens.weight.clone()
    assert quantize_int8(model) == {"quantized": 2 * 7 + 1, "kept": 0}
    layer = model.model.layers[0]
    for module in (layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.down_proj, model.lm_head):
        assert isinstance(module, Int8Linear)
    assert isinstance(layer.self_attn.dt_proj, nn.Linear)  # the dynamic mask's projection stays exact
    assert torch.equal(model.model.embed_tokens.weight, embedding)  # the lookup keeps its float rows
    assert model.dtype == torch.float32 and model.quantized == "int8"


def test_widths_the_kernel_cannot_take_keep_their_float_weights_and_say_so(caplog):
    model = ours_from(hf_twin(tiny_config(intermediate_size=40)), "eager")  # down_proj's input: 40
    with caplog.at_level(logging.WARNING, logger="doge_cli.model.quantize"):
        counts = quantize_int8(model)
    assert counts == {"quantized": 2 * 6 + 1, "kept": 2}
    assert isinstance(model.model.layers[0].mlp.down_proj, nn.Linear)
    assert "2 linear layers keep their float weights" in caplog.text


def test_quantized_logits_stay_close_to_the_float_model():
    float_model = ours_from(hf_twin(tiny_config()), "eager")
    quantized = ours_from(hf_twin(tiny_config()), "eager")
    quantize_int8(quantized)
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = float_model(ids).logits, quantized(ids).logits
    assert ((a - b).norm() / a.norm()).item() < 0.05


@pytest.mark.parametrize("kind", [{}, dict(is_moe=True, num_experts=16, num_experts_per_tok=4),
                                  dict(attention_bias=True, mlp_bias=True, num_key_value_heads=4)])
def test_the_quantized_decoding_step_equals_the_quantized_forward(kind):
    from doge_cli.inference.decode import Decoder
    from tests.inference.test_decode import _prefilled

    model = ours_from(hf_twin(tiny_config(**kind)), "eager")
    quantize_int8(model)
    decoder = Decoder(model)
    fast, mask = _prefilled(model, 3, 10)
    slow, _ = _prefilled(model, 3, 10)
    tokens, positions = torch.tensor([5, 6, 7]), mask.sum(1)
    for step in range(4):
        got = decoder(tokens, positions + step, fast)
        with torch.no_grad():
            want = model(tokens[:, None], position_ids=(positions + step)[:, None], past_key_values=slow).logits[:, -1]
        torch.testing.assert_close(got, want.float(), rtol=2e-2, atol=2e-2)
        tokens = want.argmax(-1)


def test_int8_is_refused_off_the_cpu():
    model = ours_from(hf_twin(tiny_config()), "eager").to("meta")
    with pytest.raises(ValueError, match="CPU only"):
        quantize_int8(model)
