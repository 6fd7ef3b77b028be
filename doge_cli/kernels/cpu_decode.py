"""The whole decoding step of a dense Doge model on a CPU as one compiled call (``cpu_decode.c``).

At batch 1 a decoding step should cost what reading the weights costs: every weight is used once per
token. Issued as ~300 PyTorch operations it costs 2-4x that on a small model, because each operation
pays a few microseconds of dispatch whatever its size. This kernel does the step's math (the same as
:class:`doge_cli.inference.decode.Decoder`: RMSNorms, the stacked q|k|v and gate|up products, q/k norms,
RoPE, the dynamic-mask bias, attention over the row's cached keys, SwiGLU, the residual weights, the
head) in one C function that torch's own OpenMP threads run, with AVX2/FMA products (512-bit ones for a
batch of one row where the CPU has AVX-512, with a prefetch that runs ahead of each block of four weight
rows as one stream) that read each matrix once in its own dtype:

- **float32** models: read as they are.
- **bfloat16** models: the matrices and the embedding are read as bfloat16 (half the bytes) and widened
  to float32 in registers; every product sums in float32, as the PyTorch step does with its float32
  copies, so the two agree to float32 rounding.

It is used by the engine's decoding step (``Decoder.__call__``) on a CPU when the model is dense, uses
SiLU, and keeps its cache in its own dtype (float32 or bfloat16); a step whose rows see more keys than
``keep_window_size`` (where the top-k window applies) goes through the PyTorch step, as do int8, fp16 and
CDMoE models. ``DOGE_CPU_KERNEL=0`` turns it off. The source is compiled on first use with the system's C
compiler (``$CC``, else ``cc``; ``-O3 -march=native -fopenmp``) into
``$XDG_CACHE_HOME/doge/kernels`` (default ``~/.cache/doge/kernels``), keyed by the source, the compiler's
version and this CPU's flags, so a later process loads it at once; when there is no compiler or the build
fails, doge says so once and decodes with the PyTorch step. Checked against the PyTorch step and the
model's forward in tests/kernels/test_cpu_decode.py. :func:`profiled_library` builds the same source with
per-section timers for benchmarks/decode_profile.py (where a step's time goes); decoding never uses it.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

logger = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("cpu_decode.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared"]
_LIB: list = []  # [CDLL] once loaded, [None] when it cannot be
_WHY: list[str] = []
_F32, _BF16 = 0, 1
_DTYPES = {torch.float32: _F32, torch.bfloat16: _BF16}
_P = ctypes.c_void_p


class _Layer(ctypes.Structure):
    _fields_ = [(name, _P) for name in ("qkv_w", "qkv_b", "qk_norm", "dt_w", "dt_b", "a", "o_w", "o_b", "ln1",
                                        "ln2", "res1", "res2", "gu_w", "gu_b", "down_w", "down_b", "keys",
                                        "values", "biases")] + [
        (name, ctypes.c_float) for name in ("ln1_eps", "ln2_eps", "qk_eps", "pad")]


class _Model(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int32) for name in ("layers", "hidden", "inter", "hq", "hkv", "d", "hb", "vocab",
                                                    "wdtype", "cdtype", "cap", "pad0")] + [
        (name, ctypes.c_float) for name in ("norm_eps", "rope_scaling", "scale", "pad1")] + [
        (name, _P) for name in ("inv_freq", "embed", "norm", "head_w", "head_b")] + [
        ("layer", ctypes.POINTER(_Layer))]


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "doge" / "kernels"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build(flags: list[str] = FLAGS) -> Path:
    """The compiled library for this machine and ``flags`` (built once, then found in the cache folder);
    raises RuntimeError saying why it cannot be built."""
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C compiler ({compiler!r} not found; install gcc or set CC)")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, version.encode(), " ".join(flags).encode(), _cpu_flags().encode(),
                                     platform.machine().encode()])).hexdigest()[:16]
    folder = _cache_dir()
    target = folder / f"cpu_decode-{key}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".cpu_decode-", suffix=".so")
    os.close(fd)
    try:
        done = subprocess.run([compiler, *flags, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {' '.join(done.stderr.split())[:300]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def library():
    """The loaded kernel library, or None when it cannot be built here (:func:`unavailable_reason` says why)."""
    if not _LIB:
        if os.environ.get("DOGE_CPU_KERNEL", "1") == "0":
            _WHY.append("DOGE_CPU_KERNEL=0 turns it off")
            _LIB.append(None)
            return None
        try:
            lib = ctypes.CDLL(str(_build()))
        except (OSError, RuntimeError) as err:
            _WHY.append(f"it could not be built or loaded: {err}")
            _LIB.append(None)
            return None
        _LIB.append(_declare(lib))  # outside the try: a layout mismatch is a bug to raise, not a fallback
    return _LIB[0]


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Check the library's struct layouts against ours and declare its functions' signatures."""
    if lib.doge_layer_size() != ctypes.sizeof(_Layer) or lib.doge_model_size() != ctypes.sizeof(_Model):
        raise RuntimeError("cpu_decode.c and cpu_decode.py disagree on the layout of Layer or Model")
    lib.doge_decode_step.restype = ctypes.c_int
    lib.doge_decode_step.argtypes = [ctypes.POINTER(_Model), ctypes.c_int, ctypes.c_int, _P, _P, _P,
                                     ctypes.c_int64, _P, _P, _P]
    lib.doge_work_floats.restype = ctypes.c_int64
    lib.doge_work_floats.argtypes = [ctypes.POINTER(_Model), ctypes.c_int, ctypes.c_int64]
    return lib


# The step's sections in a profiled build, in the order of cpu_decode.c's enum (benchmarks/decode_profile.py).
SECTIONS = ("embedding", "norm 1", "qkv product", "q/k norm, RoPE, cache write", "attention", "o product",
            "residual, norm 2", "gate-up product", "SiLU", "down product", "residual", "final norm, head product")


def profiled_library() -> ctypes.CDLL:
    """A build that times each section of the step (``-DDOGE_PROFILE``: ``doge_profile``, seconds summed
    over calls on thread 0), for benchmarks/decode_profile.py; decoding never loads it. Raises RuntimeError
    when it cannot be built."""
    lib = _declare(ctypes.CDLL(str(_build([*FLAGS, "-DDOGE_PROFILE"]))))
    if lib.doge_profile_sections() != len(SECTIONS):
        raise RuntimeError("cpu_decode.c and cpu_decode.py disagree on the profiled sections")
    return lib


def unavailable_reason() -> str | None:
    """Why the kernel cannot be used in this process; None when it can."""
    return None if library() is not None else _WHY[0]


def unsupported(model) -> str | None:
    """Why ``model`` decodes through the PyTorch step rather than this kernel; None when it can use it."""
    from doge_cli.model.modeling import MLP, head_dim
    from doge_cli.model.quantize import Int8Linear

    config = model.config
    if model.device.type != "cpu":
        return "it runs on a CPU only"
    if model.dtype not in _DTYPES:
        return f"it reads float32 or bfloat16 weights, not {str(model.dtype).removeprefix('torch.')}"
    if any(isinstance(m, Int8Linear) for m in model.modules()):
        return "int8 weights decode through the int8 product"
    if any(type(layer.mlp) is not MLP for layer in model.model.layers):
        return "CDMoE layers decode through their module"
    if config.hidden_act != "silu":
        return f"it computes SiLU, not {config.hidden_act}"
    d = head_dim(config)
    if d % 2 or d > 1024:
        return f"head dim {d} (it needs an even one up to 1024)"
    if config.num_attention_heads % config.num_key_value_heads:
        return "query heads must be a multiple of key/value heads"
    return unavailable_reason()


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class FusedStep:
    """The kernel bound to one :class:`~doge_cli.inference.decode.Decoder`'s prepared weights."""

    def __init__(self, decoder, lib: ctypes.CDLL | None = None):
        """``lib``: the compiled kernel to call (default: :func:`library`; a benchmark passes
        :func:`profiled_library`)."""
        model, config = decoder.model, decoder.model.config
        self.lib = lib if lib is not None else library()
        wdtype = model.dtype
        self.keep = decoder.keep
        self._keep_alive: list[torch.Tensor] = []
        self.bytes_read = 0  # what one step reads of the weights (the embedding: one row)

        def mat(t: torch.Tensor, rows_read: int | None = None) -> int:  # a matrix in the model's dtype
            t = t.detach()
            if t.dtype != wdtype or not t.is_contiguous():
                t = t.to(wdtype).contiguous()
            self._keep_alive.append(t)
            self.bytes_read += (t.numel() if rows_read is None else rows_read * t.shape[1]) * t.element_size()
            return t.data_ptr()

        def vec(t: torch.Tensor | None) -> int | None:  # a float32 vector
            if t is None:
                return None
            t = t.detach().float().contiguous()
            self._keep_alive.append(t)
            self.bytes_read += t.numel() * 4
            return t.data_ptr()

        def stacked(product) -> torch.Tensor:  # the decoder's stacked weight, in the model's dtype
            return product.keywords["weight"]

        layers = (_Layer * len(decoder.layers))()
        for lw, layer, out in zip(decoder.layers, model.model.layers, layers):
            attn, mlp = layer.self_attn, layer.mlp
            out.qkv_w = mat(stacked(lw.qkv)) if decoder.dtype == wdtype else mat(
                torch.cat((attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight)))
            out.gu_w = mat(stacked(lw.gu)) if decoder.dtype == wdtype else mat(
                torch.cat((mlp.gate_proj.weight, mlp.up_proj.weight)))
            out.o_w, out.down_w = mat(attn.o_proj.weight), mat(mlp.down_proj.weight)
            out.qkv_b, out.o_b = vec(lw.qkv.keywords["bias"]), vec(lw.o.keywords["bias"])
            out.gu_b, out.down_b = vec(lw.gu.keywords["bias"]), vec(lw.down.keywords["bias"])
            out.qk_norm, out.qk_eps = vec(lw.qk_norm), lw.qk_eps or 0.0
            out.dt_w, out.dt_b, out.a = vec(lw.dt_w), vec(lw.dt_b), vec(lw.a)
            out.ln1, out.ln2, out.res1, out.res2 = vec(lw.ln1), vec(lw.ln2), vec(lw.res1), vec(lw.res2)
            out.ln1_eps, out.ln2_eps = lw.ln1_eps, lw.ln2_eps
        self.layers = layers
        m = self.model = _Model()
        m.layers, m.hidden, m.inter = len(layers), config.hidden_size, config.intermediate_size
        m.hq, m.hkv, m.d = decoder.hq, decoder.hkv, decoder.d
        m.hb = decoder.hq if decoder.legacy else decoder.hkv
        m.vocab = model.lm_head.weight.shape[0]
        m.wdtype = _DTYPES[wdtype]
        m.norm_eps, m.rope_scaling, m.scale = decoder.norm_eps, float(decoder.rope_scaling), decoder.d**-0.5
        m.inv_freq = vec(decoder.inv_freq)
        m.embed = mat(model.model.embed_tokens.weight, rows_read=1)
        m.norm = vec(decoder.norm)
        m.head_w = mat(model.lm_head.weight)
        m.head_b = vec(model.lm_head.bias)
        m.layer = layers
        self._cache_key = None
        # The kernel's float32 scratch, kept between steps (grown when a step needs more): a fresh buffer a
        # step cost ~0.1 ms of allocation and first-touch page faults at the Doge-20M shape.
        self._work = torch.empty(0)
        self._lock = threading.Lock()  # the layers' cache pointers are this step's state: one call at a time

    def runs(self, cache) -> bool:
        """Whether this step can run on ``cache`` (its dtype is the model's; no top-k window applies)."""
        return (_DTYPES.get(cache.dtype) == self.model.wdtype
                and max(cache.lengths[cache.rows], default=0) + 1 <= self.keep)

    def _bind(self, cache) -> None:
        """Point the layers at the cache's buffers for the window's first row (again when they changed). The
        bound buffer lists are held, so a list compared by identity cannot be a new one at a freed address."""
        start = cache.rows.start or 0
        key = (cache.keys, cache.values, cache.biases, start)
        if self._cache_key is not None and all(a is b for a, b in zip(key[:3], self._cache_key[:3])) \
                and start == self._cache_key[3]:
            return
        for layer, keys, values, biases in zip(self.layers, cache.keys, cache.values, cache.biases):
            layer.keys, layer.values, layer.biases = (_ptr(keys[start]), _ptr(values[start]), _ptr(biases[start]))
        self.model.cap = cache.capacity
        self.model.cdtype = _DTYPES[cache.dtype]
        self._cache_key = key

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        """The same contract as ``Decoder.__call__``: (n,) tokens at (n,) positions, one per row of the cache's
        window -> (n, V) float32 logits; the new keys are written into the cache."""
        with self._lock:
            return self._step(tokens, positions, cache)

    def _step(self, tokens: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        n = tokens.shape[0]
        starts = cache.lengths[cache.rows]
        key_mask = cache.begin(1, None)
        self._bind(cache)  # after begin: the cache may have grown
        end = max(starts) + 1
        need = self.lib.doge_work_floats(self.model, n, end)
        if self._work.numel() < need:
            self._work = torch.empty(max(need, 2 * self._work.numel()))
        work = self._work
        if tokens.dtype != torch.int64 or not tokens.is_contiguous():
            tokens = tokens.to(torch.int64).contiguous()
        if positions.dtype != torch.int64 or not positions.is_contiguous():
            positions = positions.to(torch.int64).contiguous()
        at = (ctypes.c_int64 * n)(*starts)
        valid = None if key_mask is None else cache.valid[cache.rows].data_ptr()
        logits = torch.empty(n, self.model.vocab)
        self.lib.doge_decode_step(self.model, n, torch.get_num_threads(), tokens.data_ptr(), positions.data_ptr(),
                                  ctypes.addressof(at), end, valid, logits.data_ptr(), work.data_ptr())
        return logits
