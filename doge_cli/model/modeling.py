"""The Doge causal language model, read top to bottom.

Same parameter names and the same math as transformers' native ``DogeForCausalLM`` (5.24), so
state_dicts load into either one unchanged. The config object is transformers' ``DogeConfig``.
Doge: Shi et al. 2024, "Wonderful Matrices" (dynamic mask attention + cross-domain MoE).
Old small-doge checkpoints run the same classes with ``config.small_doge_legacy`` (see :func:`is_legacy`).

Layout: config checks, RMSNorm, rotary embedding, KV cache, attention, MLP / CDMoE, block, model.

Packed rows: ``position_ids`` restart at 0 at each document; document ids are
``cumsum(position_ids == 0)`` along the row, and attention never crosses a document boundary.
A CDMoE layer (like transformers') routes with logits that mix tokens of the whole batch (see
:class:`CDMoE`), so only dense models keep packed documents fully independent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import DogeConfig
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from doge_cli.errors import DogeError
from doge_cli.model import attention as attn_backends

# ----------------------------------------------------------------------------- config


def check_config(config: DogeConfig) -> None:
    """Refuse the DogeConfig options this implementation does not reproduce."""
    if getattr(config, "sliding_window", None) is not None:
        raise DogeError("sliding_window is not supported by doge's Doge model; set it to null in config.json")
    if config.attention_dropout:
        raise DogeError("attention_dropout > 0 is not supported by the attention backends; set it to 0.0")
    rope_type = (config.rope_parameters or {}).get("rope_type", "default")
    if rope_type in ("dynamic", "longrope"):
        raise DogeError(f"rope_type {rope_type!r} rescales with sequence length and is not supported; "
                        "use default, linear, yarn or llama3")
    if config.num_attention_heads % config.num_key_value_heads:
        raise DogeError("num_attention_heads must be a multiple of num_key_value_heads")


def head_dim(config: DogeConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def is_legacy(config: DogeConfig) -> bool:
    """True for a model loaded from an old small-doge checkpoint (see ``doge_cli.model.hub``).

    Its attention differs from transformers' Doge in two ways: no q/k RMS norms, and ``A`` / ``dt_proj``
    sized by the query heads, so the dynamic-mask bias is per query head instead of per kv head.
    """
    return bool(getattr(config, "small_doge_legacy", False))


# ----------------------------------------------------------------------------- norm and rotary


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), computed in float32 like transformers'."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """RoPE (Su et al. 2021); non-default ``rope_type`` frequencies come from transformers' table."""

    def __init__(self, config: DogeConfig):
        super().__init__()
        params = config.rope_parameters or {"rope_type": "default", "rope_theta": 10000.0}
        rope_type = params.get("rope_type", "default")
        if rope_type == "default":
            dim = head_dim(config)
            inv_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
            self.scaling = 1.0
        else:
            inv_freq, self.scaling = ROPE_INIT_FUNCTIONS[rope_type](config, None)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype):
        freqs = position_ids[..., None].float() * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scaling).to(dtype), (emb.sin() * self.scaling).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, D) by positions: the half-split convention transformers uses."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None] + torch.cat((-x2, x1), dim=-1) * sin[:, None]


# ----------------------------------------------------------------------------- KV cache


class KVCache:
    """Preallocated keys, values and dynamic-mask biases of every layer for ``rows`` sequences.

    Row ``r`` holds ``lengths[r]`` cached positions; ``valid[r, j]`` says position ``j`` is a real token
    (False for padding, which attention skips). A forward writes its new keys after each row's own
    length: at one shared offset when every row of the window has the same length (prefill, lockstep
    decoding), else one token per row at its own offset (rows that joined at different times). Nothing
    is allocated per token: the buffers double only when a row outgrows them. A key's bias depends on
    its value alone, so it is computed once, when the key is written. A cached forward holds one
    document per row (no packed documents). ``window(start, stop)`` picks the rows the next forwards use
    (the inference engine's slots); all rows by default.
    """

    def __init__(self, config: DogeConfig, rows: int, capacity: int, *, dtype: torch.dtype, device):
        d, hkv = head_dim(config), config.num_key_value_heads
        bias_heads = config.num_attention_heads if is_legacy(config) else hkv
        layers = config.num_hidden_layers
        self.keys = [torch.zeros(rows, hkv, capacity, d, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.biases = [torch.zeros(rows, bias_heads, capacity, dtype=dtype, device=device) for _ in range(layers)]
        self.valid = torch.zeros(rows, capacity, dtype=torch.bool, device=device)
        self.lengths = [0] * rows  # a host copy: where to write needs no device sync
        self.rows = slice(0, rows)
        self.holes = False  # some key of some row is padding, or rows differ in length
        self._write: tuple = ()

    @property
    def capacity(self) -> int:
        return self.valid.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.keys[0].dtype

    def window(self, start: int, stop: int) -> None:
        self.rows = slice(start, stop)

    def get_seq_length(self) -> int:
        return max(self.lengths[self.rows], default=0)

    def begin(self, t: int, new_mask: torch.Tensor | None) -> torch.Tensor | None:
        """Reserve ``t`` positions in every row of the window (``new_mask`` (rows, t): 0 for padding);
        return this forward's key mask, or None when every key so far is a real token."""
        starts = self.lengths[self.rows]
        uniform = len(set(starts)) == 1
        if not uniform and t != 1:
            raise ValueError("rows of different lengths take one new token each")
        end = max(starts) + t
        if end > self.capacity:
            self._grow(end)
        valid = self.valid[self.rows]
        if uniform:
            valid[:, starts[0]:end] = True if new_mask is None else new_mask.bool()
            self._write = (starts[0], end)
        else:
            index = torch.arange(len(starts), device=valid.device)
            at = torch.tensor(starts, device=valid.device)
            valid[index, at] = True if new_mask is None else new_mask[:, -1].bool()
            self._write = (index, at, end)
        self.lengths[self.rows] = [x + t for x in starts]
        self.holes = self.holes or not uniform or new_mask is not None
        return valid[:, :end] if self.holes else None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor):
        """Write this forward's keys, values (B, H, t, D) and biases (B, H, t) of ``layer``; return
        everything the window's rows hold so far."""
        keys, values, biases = self.keys[layer][self.rows], self.values[layer][self.rows], self.biases[layer][self.rows]
        if len(self._write) == 2:
            start, end = self._write
            keys[:, :, start:end] = k
            values[:, :, start:end] = v
            biases[:, :, start:end] = bias
        else:
            index, at, end = self._write
            keys[index, :, at] = k[:, :, 0]
            values[index, :, at] = v[:, :, 0]
            biases[index, :, at] = bias[:, :, 0]
        return keys[:, :, :end], values[:, :, :end], biases[:, :, :end]

    def _grow(self, need: int) -> None:
        capacity = max(need, 2 * self.capacity)
        self.keys = [_widen(x, 2, capacity) for x in self.keys]
        self.values = [_widen(x, 2, capacity) for x in self.values]
        self.biases = [_widen(x, 2, capacity) for x in self.biases]
        self.valid = _widen(self.valid, 1, capacity)

    def reset_row(self, row: int) -> None:
        """Empty one row (an engine slot that takes a new request)."""
        self.lengths[row] = 0
        self.valid[row] = False

    def copy_row(self, src: int, dst: int) -> None:
        """Make row ``dst`` hold what row ``src`` holds (a prompt prefilled once for several requests;
        moving a request to another slot)."""
        n = self.lengths[src]
        for buf in (*self.keys, *self.values):
            buf[dst, :, :n] = buf[src, :, :n]
        for buf in self.biases:
            buf[dst, :, :n] = buf[src, :, :n]
        self.valid[dst] = self.valid[src]
        self.lengths[dst] = n


def _widen(buf: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    shape = list(buf.shape)
    shape[dim] = size
    out = buf.new_zeros(shape)
    out.narrow(dim, 0, buf.shape[dim]).copy_(buf)
    return out


@dataclass
class AttentionBatch:
    """What every layer's attention shares for one forward pass: built once, used by all layers."""

    doc_ids: torch.Tensor | None
    key_padding_mask: torch.Tensor | None
    block_mask: object | None = None


# ----------------------------------------------------------------------------- attention


class DynamicMaskAttention(nn.Module):
    """q/k RMS-normed per head, RoPE, plus a learned per-key bias ``exp(A * softplus(dt_proj(v)))``."""

    def __init__(self, config: DogeConfig, layer_idx: int, backend: str):
        super().__init__()
        d, hq, hkv = head_dim(config), config.num_attention_heads, config.num_key_value_heads
        bias = config.attention_bias
        self.layer_idx, self.head_dim, self.backend = layer_idx, d, backend
        self.num_heads, self.num_kv_heads = hq, hkv
        self.keep_window_size = config.keep_window_size
        self.q_proj = nn.Linear(config.hidden_size, hq * d, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, hkv * d, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, hkv * d, bias=bias)
        # Old small-doge checkpoints: one bias per query head and no q/k norms (see is_legacy).
        self.legacy = is_legacy(config)
        bias_heads = hq if self.legacy else hkv
        self.A = nn.Parameter(torch.zeros(bias_heads))
        self.dt_proj = nn.Linear(hkv * d, bias_heads, bias=bias)
        self.o_proj = nn.Linear(hq * d, config.hidden_size, bias=bias)
        norm = nn.Identity if self.legacy else lambda: RMSNorm(d, config.rms_norm_eps)
        self.q_norm, self.k_norm = norm(), norm()

    def forward(self, x, cos, sin, batch: AttentionBatch, cache: KVCache | None):
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, t, self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        # The bias of every key is a function of its value vector (all kv heads feed dt_proj).
        dt = self.dt_proj(v.transpose(1, 2).reshape(b, t, -1))
        bias = torch.exp(self.A * F.softplus(dt)).transpose(1, 2)  # (B, Hkv, T); legacy: (B, Hq, T)
        if cache is not None:  # the cache returns every key so far, with the biases it computed for them
            k, v, bias = cache.update(self.layer_idx, k, v, bias)
        if self.legacy and self.num_heads != self.num_kv_heads:
            # A bias per query head: give every query head its own copy of its kv head, so the backend
            # contract (one bias row per kv head) holds with Hkv = Hq. The cache keeps the unexpanded k/v.
            groups = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        kwargs = {"block_mask": batch.block_mask} if self.backend == "flex" else {}
        out = attn_backends.get_backend(self.backend)(
            q, k, v, bias, scale=self.head_dim**-0.5, doc_ids=batch.doc_ids,
            key_padding_mask=batch.key_padding_mask, keep_window_size=self.keep_window_size, **kwargs,
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


# ----------------------------------------------------------------------------- MLP and CDMoE


class MLP(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020)."""

    def __init__(self, config: DogeConfig):
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class CDMoE(MLP):
    """Cross-domain MoE: a shared SwiGLU plus single-neuron experts chosen by product keys.

    Routing follows product-key memory (Lample et al. 2019; PEER, He 2024): two score sets of
    ``sqrt(num_experts)`` keys combine into ``num_experts`` candidates, top ``num_experts_per_tok`` win.
    Expert ``e`` computes ``act(down_embed[e] · x) * w_e * up_embed[e]``.
    """

    def __init__(self, config: DogeConfig):
        super().__init__(config)
        self.num_keys = math.floor(math.sqrt(config.num_experts))
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.router_gate = nn.Linear(config.hidden_size, self.num_keys * 2, bias=False)
        self.down_embed = nn.Embedding(config.num_experts, config.hidden_size)
        self.up_embed = nn.Embedding(config.num_experts, config.hidden_size)

    def forward(self, x):
        b, t, h = x.shape
        # transformers splits the flat (B*T*2K) logits into halves across tokens, not per token;
        # released checkpoints were trained that way, so we keep it for identical outputs.
        router_logits = self.router_gate(x).view(2, b * t, -1)
        scores, experts = _route(router_logits, self.num_keys, self.top_k)
        weights = F.softmax(scores, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        down, up = self.down_embed(experts), self.up_embed(experts)  # (B*T, k, H)
        expert_act = self.act_fn(torch.matmul(down, x.reshape(b * t, h, 1)).squeeze(-1)) * weights
        routed = torch.matmul(expert_act[:, None, :], up).view(b, t, h)
        return super().forward(x) + routed, router_logits


def _route(router_logits: torch.Tensor, num_keys: int, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top ``top_k`` experts of each token and their scores, from the (2, tokens, num_keys) router
    logits: expert ``i * num_keys + j`` scores ``x_i + y_j``. Only the ``top_k`` best keys of each half can
    be part of the ``top_k`` best pairs (a pair with a key outside them is beaten by the ``top_k`` pairs that
    swap it for a better key), so the search runs over top_k² candidates, not all num_keys² experts as
    transformers' code does: the same experts (up to exact ties), 16x fewer candidates at 16,384 experts
    top 32."""
    k = min(top_k, num_keys)
    (scores_x, scores_y), (idx_x, idx_y) = router_logits.topk(k, dim=-1)
    all_scores = (scores_x[..., :, None] + scores_y[..., None, :]).flatten(-2)
    all_idx = (idx_x[..., :, None] * num_keys + idx_y[..., None, :]).flatten(-2)
    scores, pos = all_scores.topk(top_k, dim=-1)
    return scores, all_idx.gather(-1, pos)


def router_aux_loss(router_logits: list[torch.Tensor], config: DogeConfig, attention_mask=None):
    """Switch-Transformer load balancing (Fedus et al. 2021, eqs. 4-6) over product-key experts.

    ``num_experts * sum_e f_e * P_e``: f_e the fraction of (token, slot) picks of expert e, P_e its mean
    routing probability (softmax over all candidate pairs), padding excluded; as transformers computes it.
    The softmax over all pairs factorises, ``p(i, j) = softmax(x)_i * softmax(y)_j``, so P is a mean of outer
    products, one (num_keys x num_keys) product, instead of a (tokens x num_experts) matrix per layer.
    """
    num_keys, top_k, n_exp = math.floor(math.sqrt(config.num_experts)), config.num_experts_per_tok, config.num_experts
    real = attention_mask.bool().reshape(-1) if attention_mask is not None else None
    counts = prob_sum = None
    tokens = 0
    for logits in router_logits:
        picks = _route(logits, num_keys, top_k)[1]  # (tokens, top_k)
        px, py = F.softmax(logits[0].float(), dim=-1), F.softmax(logits[1].float(), dim=-1)
        if real is not None:
            picks, px, py = picks[real], px[real], py[real]
        layer_counts = torch.zeros(n_exp, dtype=px.dtype, device=px.device).scatter_add_(
            0, picks.reshape(-1), torch.ones(picks.numel(), dtype=px.dtype, device=px.device))
        layer_probs = (px.T @ py).reshape(-1)  # sum over tokens of p(i, j), flattened as i * num_keys + j
        counts = layer_counts if counts is None else counts + layer_counts
        prob_sum = layer_probs if prob_sum is None else prob_sum + layer_probs
        tokens += px.shape[0]
    tokens_per_expert = counts / max(tokens * top_k, 1)
    prob_per_expert = prob_sum / max(tokens, 1)
    return (tokens_per_expert * prob_per_expert).sum() * n_exp


# ----------------------------------------------------------------------------- block and model


class DecoderLayer(nn.Module):
    """Pre-norm block with learned residual weights: ``h = r * h + f(norm(h))`` twice."""

    def __init__(self, config: DogeConfig, layer_idx: int, backend: str):
        super().__init__()
        self.is_moe, self.dropout = config.is_moe, config.hidden_dropout
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = DynamicMaskAttention(config, layer_idx, backend)
        self.input_residual = nn.Parameter(torch.ones(config.hidden_size))
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = CDMoE(config) if config.is_moe else MLP(config)
        self.post_attention_residual = nn.Parameter(torch.ones(config.hidden_size))

    def forward(self, h, cos, sin, batch: AttentionBatch, cache: KVCache | None):
        a = self.self_attn(self.input_layernorm(h), cos, sin, batch, cache)
        h = self.input_residual * h + F.dropout(a, self.dropout, self.training)
        m = self.mlp(self.post_attention_layernorm(h))
        m, router_logits = m if self.is_moe else (m, None)
        h = self.post_attention_residual * h + F.dropout(m, self.dropout, self.training)
        return h, router_logits


class DogeModel(nn.Module):
    """Embeddings, decoder layers and the final norm (``model.*`` in the state_dict)."""

    def __init__(self, config: DogeConfig, backend: str):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(config, i, backend) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


@dataclass
class CausalLMOutput:
    """Forward result; ``aux_loss`` is already multiplied by ``router_aux_loss_coef`` and NOT in ``loss``."""

    logits: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    past_key_values: KVCache | None = None
    hidden_states: torch.Tensor | None = None


class DogeForCausalLM(nn.Module):
    """Doge decoder with an LM head; ``attn_implementation`` is a backend name or ``auto``."""

    def __init__(self, config: DogeConfig, attn_implementation: str = "auto"):
        super().__init__()
        check_config(config)
        self.config = config
        # "auto" is resolved again on the first forward, when the device of the inputs is known.
        self.attn_requested = attn_implementation
        self.attn_implementation = attn_backends.resolve_backend(attn_implementation)
        attn_backends.get_backend(self.attn_implementation)
        self.model = DogeModel(config, self.attn_implementation)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.init_weights()

    def init_weights(self) -> None:
        """Initialise every parameter as transformers' Doge does (``_init_weights``):

        - every ``nn.Linear`` weight (q/k/v/o, dt_proj, gate/up/down, router_gate, lm_head):
          normal(0, initializer_range); their biases (when enabled): 0;
        - ``embed_tokens``, CDMoE ``down_embed`` and ``up_embed``: normal(0, initializer_range), with the
          ``pad_token_id`` row of ``embed_tokens`` zeroed;
        - every RMSNorm weight (input/post-attention/final, q_norm, k_norm): 1;
        - ``A``: 0, so every bias starts at exp(0) = 1 and attention starts unbiased;
        - ``input_residual``, ``post_attention_residual``: 1, a plain residual at the start;
        - ``lm_head`` is the embedding matrix itself when ``tie_word_embeddings``.
        """
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)
                if module.padding_idx is not None:
                    with torch.no_grad():
                        module.weight[module.padding_idx].zero_()
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, DynamicMaskAttention):
                nn.init.zeros_(module.A)
            elif isinstance(module, DecoderLayer):
                nn.init.ones_(module.input_residual)
                nn.init.ones_(module.post_attention_residual)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding matrix with the LM head when the config asks for tied embeddings."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The float dtype of the weights (the embedding's: a head quantized to int8 keeps it)."""
        return self.model.embed_tokens.weight.dtype

    def _compute_dtype(self, device: torch.device) -> torch.dtype:
        """The dtype attention computes in here: autocast's when it is on, else the weights'."""
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        return self.dtype

    def set_attn_implementation(self, name: str) -> None:
        """Switch every layer to another attention backend (a name or ``auto``)."""
        self.attn_requested = name
        self.attn_implementation = attn_backends.resolve_backend(name, self.device)
        attn_backends.get_backend(self.attn_implementation)
        for layer in self.model.layers:
            layer.self_attn.backend = self.attn_implementation

    def gradient_checkpointing_enable(self, **_) -> None:
        """Recompute each block in the backward pass instead of keeping its activations."""
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = False

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                labels=None, return_hidden_states=False) -> CausalLMOutput:
        """Logits (or final normed hidden states), shifted next-token loss, MoE aux loss, cache.

        ``attention_mask`` (B, past + T) marks real tokens with 1 (left or right padding).
        ``position_ids`` (B, T) restart at 0 at each packed document; when None they count from the
        cache length and each row is one document. With a cache (``past_key_values``, or a new one for
        ``use_cache``) every row is one document and the cache keeps which of its keys are real tokens.
        """
        b, t = input_ids.shape
        if self.attn_requested == "auto" and input_ids.device.type != "cpu":
            best = attn_backends.resolve_backend("auto", input_ids.device, head_dim(self.config),
                                                 self._compute_dtype(input_ids.device))
            if best != self.attn_implementation:
                self.set_attn_implementation("auto")
        cache = past_key_values
        if cache is None and use_cache:
            cache = KVCache(self.config, b, t, dtype=self.model.embed_tokens.weight.dtype, device=input_ids.device)
        doc_ids = key_padding_mask = None
        if cache is not None:  # one document per row; the cache knows which keys are real tokens
            past = cache.get_seq_length()
            new_mask = attention_mask[:, -t:] if attention_mask is not None else None
            key_padding_mask = cache.begin(t, new_mask)
            if position_ids is None:
                position_ids = torch.arange(past, past + t, device=input_ids.device)[None].expand(b, t)
        else:
            past = 0
            if position_ids is None:
                position_ids = torch.arange(t, device=input_ids.device)[None].expand(b, t)
            else:
                doc_ids = torch.cumsum(position_ids == 0, dim=1)
            if attention_mask is not None and not bool(attention_mask.all()):
                key_padding_mask = attention_mask.bool()
        position_ids = position_ids.expand(b, t)
        batch = AttentionBatch(doc_ids, key_padding_mask)
        if self.attn_implementation == "flex":
            batch.block_mask = attn_backends.build_block_mask(b, t, past + t, doc_ids, key_padding_mask,
                                                              input_ids.device)

        h = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary_emb(position_ids, h.dtype)
        router_logits = []
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training and cache is None:
                h, logits = checkpoint(layer, h, cos, sin, batch, None, use_reentrant=False)
            else:
                h, logits = layer(h, cos, sin, batch, cache)
            router_logits.append(logits)
        h = self.model.norm(h)

        out = CausalLMOutput(past_key_values=cache)
        if return_hidden_states:
            out.hidden_states = h
        else:
            out.logits = self.lm_head(h)
        if labels is not None and out.logits is not None:
            out.loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                       ignore_index=-100)
        if self.config.is_moe:
            mask = attention_mask[:, -t:] if attention_mask is not None else None
            out.aux_loss = self.config.router_aux_loss_coef * router_aux_loss(router_logits, self.config, mask)
        return out
