"""One decoding step for every running row, written straight over the model's weights.

Decoding a small model on a CPU is mostly per-operation overhead, not arithmetic: at the Doge-20M shape
the generic forward spends two thirds of a token outside matrix products, at a few microseconds per
operation. This step does the same math as :class:`~doge_cli.model.modeling.DogeForCausalLM` for one new
token per row with far fewer operations:

- the q/k/v projections run as one product (their weights stacked when the engine starts), as do the
  MLP's gate and up projections;
- q and k are normed and rotated together, as one tensor of ``Hq + Hkv`` heads with their two norm
  weights stacked;
- attention is two small products over the row's cached keys, with the bias and the top-k keep window
  applied as every backend applies them (``doge_cli.model.attention``'s one rule);
- only the last position reaches the LM head.

Weights are prepared once per engine (``Decoder(model)``): a model that trains between generations
(GRPO) gets a new engine, and so fresh copies, for every rollout. On a CPU, PyTorch's products with bf16
or fp16 weights are slower than fp32 ones at decoding's batch sizes (a 256 x 512 product measured 53 µs
in bf16, 17 µs in fp32), so this step computes with fp32 copies of low-precision weights; the cache keeps
the model's dtype.

On a CPU, a dense float32 or bfloat16 model decodes through :mod:`doge_cli.kernels.cpu_decode` instead:
the same step as one compiled call, which reads bfloat16 weights as they are (``Decoder.fused``; this
module's PyTorch step remains for what it does not cover, each case said once in the log).

It reads the weights directly, so it is used only where they are whole on this process; under DeepSpeed
ZeRO-3 or FSDP the engine decodes through the model's forward instead (and says so). The result is
checked against the model's own forward (tests/inference/test_decode.py).
"""

from __future__ import annotations

import logging
from functools import partial

import torch
import torch.nn.functional as F

from doge_cli.model.attention import top_keys
from doge_cli.model.modeling import MLP, head_dim, is_legacy
from doge_cli.model.quantize import Int8Linear, int8_linear

logger = logging.getLogger(__name__)
_SAID: set[str] = set()


def _say_once(message: str, level: int) -> None:
    if message not in _SAID:
        _SAID.add(message)
        logger.log(level, message)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in four operations (``torch.rms_norm`` is a slower composite on CPU), in fp32 like the model's."""
    if x.dtype != torch.float32:
        return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True).add_(eps))).to(x.dtype) * weight
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(eps)) * weight


class _Layer:
    """One decoder layer's weights, with the products that share an input stacked."""

    def __init__(self, layer, dtype: torch.dtype, hq: int, hkv: int, legacy: bool):
        attn, mlp = layer.self_attn, layer.mlp

        def w(t):
            return None if t is None else t.detach().to(dtype)

        self.attn, self.mlp = attn, mlp
        self.qkv = _product((attn.q_proj, attn.k_proj, attn.v_proj), dtype)
        self.q_out = attn.q_proj.out_features
        self.kv_out = attn.k_proj.out_features
        # The q and k norm weights of every head, so the q|k heads are normed as one tensor.
        self.qk_norm = None if legacy else w(torch.cat((attn.q_norm.weight.expand(hq, -1), attn.k_norm.weight.expand(hkv, -1))))
        self.qk_eps = None if legacy else attn.q_norm.eps
        self.a, self.dt_w, self.dt_b = w(attn.A), w(attn.dt_proj.weight), w(attn.dt_proj.bias)
        self.o = _product((attn.o_proj,), dtype)
        self.ln1, self.ln1_eps = w(layer.input_layernorm.weight), layer.input_layernorm.eps
        self.ln2, self.ln2_eps = w(layer.post_attention_layernorm.weight), layer.post_attention_layernorm.eps
        self.res1, self.res2 = w(layer.input_residual), w(layer.post_attention_residual)
        self.dense = type(mlp) is MLP
        if self.dense:
            self.gu = _product((mlp.gate_proj, mlp.up_proj), dtype)
            self.down = _product((mlp.down_proj,), dtype)
            self.act = mlp.act_fn


def _product(layers, dtype: torch.dtype):
    """``x -> x @ W.T + b`` for linear layers that share an input, their weights stacked into one product;
    int8 layers (``doge_cli.model.quantize``) stay int8 and multiply through the int8 kernel."""
    if all(isinstance(layer, Int8Linear) for layer in layers):
        qweight = torch.cat([layer.qweight for layer in layers])
        scales = torch.cat([layer.scales for layer in layers])
        bias = None if layers[0].bias is None else torch.cat([layer.bias for layer in layers]).to(dtype)
        return partial(int8_linear, qweight=qweight, scales=scales, bias=bias)
    if any(isinstance(layer, Int8Linear) for layer in layers):
        raise ValueError("layers that share an input are either all int8 or none")
    weight = torch.cat([layer.weight.detach() for layer in layers]).to(dtype)
    bias = None if layers[0].bias is None else torch.cat([layer.bias.detach() for layer in layers]).to(dtype)
    return partial(F.linear, weight=weight, bias=bias)


class _Kept:
    """A model's prepared decoder, kept on the model as a cache: a copy of the model (``copy.deepcopy``,
    pickling) starts without one and prepares its own from its own weights, so the fused step's pointers
    never travel to a model they do not belong to."""

    __slots__ = ("versions", "decoder")

    def __init__(self, versions=None, decoder=None):
        self.versions, self.decoder = versions, decoder

    def __deepcopy__(self, memo):
        return _Kept()

    def __reduce__(self):
        return (_Kept, ())


def decoder_for(model) -> Decoder:
    """The model's decoder, prepared once and kept while its weights are unchanged (in-place updates, as
    an optimizer's, bump a tensor's version counter, so a model that trained gets fresh copies)."""
    versions = tuple(p._version for p in model.parameters())
    kept = getattr(model, "_doge_decoder", None)
    if kept is None or kept.decoder is None or kept.versions != versions or kept.decoder.dtype_of_model != model.dtype:
        kept = _Kept(versions, Decoder(model))
        model._doge_decoder = kept
    return kept.decoder


class Decoder:
    def __init__(self, model):
        config = model.config
        self.model = model
        self.d = head_dim(config)
        self.hq, self.hkv = config.num_attention_heads, config.num_key_value_heads
        self.legacy = is_legacy(config)
        self.keep = config.keep_window_size
        on_cpu = model.device.type == "cpu"
        self.dtype_of_model = model.dtype
        self.dtype = torch.float32 if on_cpu and model.dtype in (torch.bfloat16, torch.float16) else model.dtype
        self.layers = [_Layer(layer, self.dtype, self.hq, self.hkv, self.legacy) for layer in model.model.layers]
        self.norm, self.norm_eps = model.model.norm.weight.detach().to(self.dtype), model.model.norm.eps
        self.embed = model.model.embed_tokens.weight
        self.head = _product((model.lm_head,), self.dtype)
        self.inv_freq = model.model.rotary_emb.inv_freq
        self.rope_scaling = model.model.rotary_emb.scaling
        self.fused = None  # the one-call CPU step (doge_cli.kernels.cpu_decode), where it applies
        if on_cpu:
            from doge_cli.kernels import cpu_decode

            why = cpu_decode.unsupported(model)
            if why is None:
                self.fused = cpu_decode.FusedStep(self)
            else:
                _say_once(f"generation: decoding with PyTorch operations, not the fused CPU step: {why}",
                          logging.WARNING if why == cpu_decode.unavailable_reason() else logging.INFO)

    def compiled_static_step(self):
        """:meth:`static_step` through ``torch.compile`` (dynamic shapes: one compile serves every cache
        capacity and batch above 1), made once per decoder and so shared by the engines that use it."""
        if getattr(self, "_compiled", None) is None:
            self._compiled = torch.compile(self.static_step, dynamic=True)
        return self._compiled

    def weight_bytes(self) -> int:
        """Bytes of weights one decoding step reads (whatever the batch): every product's weights (int8 ones
        with their scales; the fused CPU step's in the model's own dtype), norms and per-layer vectors, and
        one embedding row a token (counted once)."""
        if self.fused is not None:
            return self.fused.bytes_read
        tensors = [self.norm, self.inv_freq, self.embed[0]]
        for product in [self.head] + [p for lw in self.layers for p in (lw.qkv, lw.o) + ((lw.gu, lw.down) if lw.dense
                                                                                          else ())]:
            tensors += [t for t in product.keywords.values() if t is not None]
        for lw in self.layers:
            tensors += [t for t in (lw.qk_norm, lw.a, lw.dt_w, lw.dt_b, lw.ln1, lw.ln2, lw.res1, lw.res2) if t is not None]
            if not lw.dense:  # a CDMoE layer runs its module: its whole parameters, a conservative count
                tensors += list(lw.mlp.parameters())
        return sum(t.numel() * t.element_size() for t in tensors)

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        """(n,) tokens at (n,) RoPE positions, one per row of the cache's window -> (n, V) fp32 logits."""
        if self.fused is not None:
            if self.fused.runs(cache):
                return self.fused(tokens, positions, cache)
            _say_once("generation: a step past the keep window (or with a cache in another dtype) runs as "
                      "PyTorch operations, not the fused CPU step", logging.INFO)
        key_mask = cache.begin(1, None)
        return self._forward(tokens, positions, cache.dtype, key_mask, cache.update)

    @torch.no_grad()
    def static_step(self, tokens: torch.Tensor, positions: torch.Tensor, at: torch.Tensor, cache) -> torch.Tensor:
        """The same step over fixed shapes, for a CUDA graph (:mod:`.graphs`): rows ``0 .. n`` of the cache
        (``n = len(tokens)``), each writing its new key at its own position ``at`` (device tensors, so
        nothing here depends on host values), attending over the cache's whole capacity with the
        cache's validity mask. The caller reserves the positions first (``cache.begin``). Invalid
        positions are masked to a finite minimum, so a row with no valid key (a free row padding a graph's
        batch) computes finite garbage rather than NaN."""
        n = tokens.shape[0]
        index = torch.arange(n, device=tokens.device)

        def write(layer: int, k, v, bias):
            keys, values, biases = cache.keys[layer][:n], cache.values[layer][:n], cache.biases[layer][:n]
            keys[index, :, at] = k[:, :, 0]
            values[index, :, at] = v[:, :, 0]
            biases[index, :, at] = bias[:, :, 0]
            return keys, values, biases

        return self._forward(tokens, positions, cache.dtype, cache.valid[:n], write)

    def _forward(self, tokens, positions, cache_dtype, key_mask, write) -> torch.Tensor:
        h = F.embedding(tokens, self.embed)[:, None]  # (n, 1, H)
        if h.dtype != self.dtype:
            h = h.to(self.dtype)
        freqs = positions[:, None].float() * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, None]  # (n, 1, 1, D): every head of the one position
        cos, sin = (emb.cos() * self.rope_scaling).to(self.dtype), (emb.sin() * self.rope_scaling).to(self.dtype)
        for i, lw in enumerate(self.layers):
            attn = self._attention(i, lw, _rms(h, lw.ln1, lw.ln1_eps), cos, sin, cache_dtype, key_mask, write)
            h = lw.res1 * h + attn
            x = _rms(h, lw.ln2, lw.ln2_eps)
            if lw.dense:
                gate, up = lw.gu(x).chunk(2, dim=-1)
                m = lw.down(lw.act(gate) * up)
            else:
                m = lw.mlp(x.to(self.model.dtype))[0].to(self.dtype)
            h = lw.res2 * h + m
        return self.head(_rms(h[:, 0], self.norm, self.norm_eps)).float()

    def _attention(self, i: int, lw: _Layer, x, cos, sin, cache_dtype, key_mask, write) -> torch.Tensor:
        n, d, hq, hkv = x.shape[0], self.d, self.hq, self.hkv
        qkv = lw.qkv(x)
        qk = qkv[..., :lw.q_out + lw.kv_out].view(n, 1, hq + hkv, d)
        v = qkv[..., lw.q_out + lw.kv_out:]  # (n, 1, Hkv * D)
        if lw.qk_norm is not None:
            qk = _rms(qk, lw.qk_norm, lw.qk_eps)
        x1, x2 = qk.chunk(2, dim=-1)
        qk = (qk * cos + torch.cat((-x2, x1), dim=-1) * sin).transpose(1, 2)  # (n, Hq + Hkv, 1, D)
        q, k = qk[:, :hq], qk[:, hq:]
        bias = torch.exp(lw.a * F.softplus(F.linear(v, lw.dt_w, lw.dt_b))).transpose(1, 2)  # (n, Hb, 1)
        v = v.view(n, 1, hkv, d).transpose(1, 2)
        if cache_dtype != self.dtype:
            k, v, bias = k.to(cache_dtype), v.to(cache_dtype), bias.to(cache_dtype)
        keys, values, biases = write(i, k, v, bias)
        if cache_dtype != self.dtype:
            keys, values, biases = keys.to(self.dtype), values.to(self.dtype), biases.to(self.dtype)
        if self.legacy and hq != hkv:  # one bias per query head: every query head its own kv copy
            keys, values = keys.repeat_interleave(hq // hkv, dim=1), values.repeat_interleave(hq // hkv, dim=1)
        heads = keys.shape[1]
        scores = torch.matmul(q.reshape(n, heads, hq // heads, d), keys.transpose(-1, -2))
        scores = scores.mul_(d**-0.5).add_(biases[:, :, None, :])  # (n, heads, g, Tk)
        allowed = None if key_mask is None else key_mask[:, None, None, :]
        if keys.shape[2] > self.keep:
            base = allowed if allowed is not None else torch.ones(n, 1, 1, keys.shape[2], dtype=torch.bool,
                                                                  device=x.device)
            allowed = top_keys(biases, base, 1, None, key_mask, self.keep)  # (n, heads, 1, Tk)
        if allowed is not None:
            # A finite minimum, not -inf: the same probabilities wherever a key is allowed (exp underflows
            # to 0 either way), and no NaN in a row that allows none (static_step's padding rows).
            scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        out = torch.matmul(torch.softmax(scores, dim=-1), values)  # (n, heads, g, D)
        return lw.o(out.reshape(n, 1, hq * d))
