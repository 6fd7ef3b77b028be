"""The fused CPU decoding step (doge_cli/kernels/cpu_decode.c) against the PyTorch step and the model."""

import logging
import os
import subprocess
import sys

import pytest
import torch

from doge_cli.inference import decode
from doge_cli.inference.decode import Decoder
from doge_cli.inference.engine import Engine, Request
from doge_cli.inference.sampling import SamplingParams
from doge_cli.kernels import cpu_decode
from doge_cli.model.modeling import KVCache
from doge_cli.model.quantize import quantize_int8
from tests.model.doge_twin import hf_twin, ours_from, tiny_config

pytestmark = pytest.mark.skipif(cpu_decode.unavailable_reason() is not None,
                                reason=f"the fused CPU step cannot be built here: {cpu_decode.unavailable_reason()}")

KINDS = {
    "gqa": {},
    "mha-biases": dict(attention_bias=True, mlp_bias=True, num_key_value_heads=4),
    "one-kv-head-tied": dict(num_key_value_heads=1, tie_word_embeddings=True),
    "odd-widths": dict(hidden_size=40, intermediate_size=52, num_attention_heads=2, num_key_value_heads=1),
}


def _pair(model):
    """(fused decoder, PyTorch decoder) over the same model."""
    fused, plain = Decoder(model), Decoder(model)
    plain.fused = None
    assert fused.fused is not None
    return fused, plain


def _prefilled(model, rows, length, dtype):
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(3, model.config.vocab_size, (rows, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, length - 3:] = 0  # row 0 is 3 tokens shorter: its keys have holes after it decodes
    cache = KVCache(model.config, rows, 4, dtype=dtype, device="cpu")  # small: it must grow
    with torch.no_grad():
        model(ids, attention_mask=mask, past_key_values=cache, position_ids=torch.arange(length)[None].expand(rows, -1))
    return cache, mask.sum(1)


@pytest.mark.parametrize("kind", KINDS)
def test_the_fused_step_computes_what_the_pytorch_step_does(kind):
    model = ours_from(hf_twin(tiny_config(**KINDS[kind])), "eager")
    fused, plain = _pair(model)
    a, lengths = _prefilled(model, 3, 10, torch.float32)
    b, _ = _prefilled(model, 3, 10, torch.float32)
    tokens = torch.tensor([5, 6, 7])
    for step in range(70):  # the cache grows from 16 positions past 64
        positions = lengths + step
        got, want = fused(tokens, positions, a), plain(tokens, positions, b)
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
        tokens = want.argmax(-1)
    assert a.lengths == b.lengths and a.capacity == b.capacity
    for x, y in zip(a.keys + a.values + a.biases, b.keys + b.values + b.biases):
        torch.testing.assert_close(x, y, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(a.valid, b.valid, rtol=0, atol=0)


def test_a_window_of_later_rows_and_a_legacy_model():
    model = ours_from(hf_twin(tiny_config(num_key_value_heads=2)), "eager")
    model.config.small_doge_legacy = True
    legacy = type(model)(model.config, attn_implementation="eager").eval()
    fused, plain = _pair(legacy)
    a, lengths = _prefilled(legacy, 3, 8, torch.float32)
    b, _ = _prefilled(legacy, 3, 8, torch.float32)
    for cache in (a, b):
        cache.window(1, 3)  # rows 1 and 2 only
    tokens, positions = torch.tensor([5, 6]), lengths[1:]
    torch.testing.assert_close(fused(tokens, positions, a), plain(tokens, positions, b), rtol=2e-5, atol=2e-5)
    assert a.lengths == b.lengths == [8, 9, 9]  # row 0 untouched (its padding counts as positions)


def test_bf16_weights_are_read_as_bf16_and_agree_with_the_fp32_copies():
    model = ours_from(hf_twin(tiny_config()), "eager").to(torch.bfloat16)
    fused, plain = _pair(model)
    layer = fused.fused.layers[0]
    assert layer.qkv_w != plain.layers[0].qkv.keywords["weight"].data_ptr()
    assert fused.weight_bytes() < 0.6 * plain.weight_bytes()  # half the bytes of the fp32 copies, or so
    a, lengths = _prefilled(model, 2, 6, torch.bfloat16)
    b, _ = _prefilled(model, 2, 6, torch.bfloat16)
    tokens = torch.tensor([5, 6])
    for step in range(6):
        got, want = fused(tokens, lengths + step, a), plain(tokens, lengths + step, b)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        tokens = want.argmax(-1)
    for x, y in zip(a.keys + a.values, b.keys + b.values):  # the bf16 cache rounds the same way
        assert (x.float() - y.float()).abs().max() <= 2 * torch.finfo(torch.bfloat16).eps * y.float().abs().max()


def test_past_the_keep_window_the_pytorch_step_takes_over_and_still_matches_the_model(caplog, monkeypatch):
    monkeypatch.setattr(decode, "_SAID", set())  # said once a process: another test may have said it already
    model = ours_from(hf_twin(tiny_config(keep_window_size=6)), "eager")
    fused, _ = _pair(model)
    a, lengths = _prefilled(model, 2, 4, torch.float32)
    slow, _ = _prefilled(model, 2, 4, torch.float32)
    tokens = torch.tensor([5, 6])
    with caplog.at_level(logging.INFO, logger="doge_cli.inference.decode"):
        for step in range(5):
            got = fused(tokens, lengths + step, a)
            with torch.no_grad():
                want = model(tokens[:, None], position_ids=(lengths + step)[:, None], past_key_values=slow)
            torch.testing.assert_close(got, want.logits[:, -1].float(), rtol=1e-4, atol=1e-4)
            tokens = got.argmax(-1)
    assert "past the keep window" in caplog.text


def test_greedy_generation_is_token_identical_with_and_without_the_kernel():
    model = ours_from(hf_twin(tiny_config(), seed=3), "eager")
    prompts = [[1, 5, 9, 17], [1, 40, 3], [1, 7, 7, 7, 7, 100]]

    def run(fused: bool):
        engine = Engine(model, max_batch=2)
        if not fused:
            engine.decoder.fused = None
        assert (engine.decoder.fused is not None) == fused
        requests = [Request(list(p), SamplingParams(max_new_tokens=40, greedy=True), stop_token_ids=[])
                    for p in prompts]
        return [r.token_ids for r in engine.generate(requests)]

    assert run(True) == run(False)
    # engines one after another share the model's decoder, each with a new cache (which may reuse a freed
    # cache's addresses): every one binds its own
    alone = []
    for prompt in prompts:
        request = Request(list(prompt), SamplingParams(max_new_tokens=40, greedy=True), stop_token_ids=[])
        Engine(model, max_batch=1).generate([request])
        alone.append(request.token_ids)
    assert alone == run(False)


@pytest.mark.parametrize("change, reason", [
    (lambda m: m.to(torch.float16), "not float16"),
    (lambda m: (quantize_int8(m), m)[1], "int8"),
])
def test_models_it_does_not_cover_say_why(change, reason):
    model = change(ours_from(hf_twin(tiny_config()), "eager"))
    assert reason in cpu_decode.unsupported(model)
    assert Decoder(model).fused is None


def test_moe_models_decode_through_their_module():
    model = ours_from(hf_twin(tiny_config(is_moe=True, num_experts=16, num_experts_per_tok=4)), "eager")
    assert "CDMoE" in cpu_decode.unsupported(model)


def _child(env: dict, code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env}, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))


CHILD = """
import logging, torch
logging.basicConfig(level=logging.WARNING, format="%(message)s")
from doge_cli.inference import decode
from doge_cli.inference.decode import Decoder
from tests.model.doge_twin import hf_twin, ours_from, tiny_config
model = ours_from(hf_twin(tiny_config()), "eager")
print("fused" if Decoder(model).fused is not None else "plain")
"""


def test_a_failed_build_is_said_and_decoding_goes_on_in_pytorch(tmp_path):
    done = _child({"CC": "false", "XDG_CACHE_HOME": str(tmp_path)}, CHILD)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "plain"
    assert "not the fused CPU step: it could not be built or loaded: false failed" in done.stderr
    assert not any(tmp_path.rglob("*.so"))  # nothing half-written left behind


def test_the_kernel_is_built_once_into_the_cache_folder_and_can_be_turned_off(tmp_path):
    done = _child({"XDG_CACHE_HOME": str(tmp_path)}, CHILD)
    assert done.returncode == 0 and done.stdout.strip() == "fused", done.stderr
    built = list((tmp_path / "doge" / "kernels").glob("cpu_decode-*.so"))
    assert len(built) == 1 and not list((tmp_path / "doge" / "kernels").glob(".cpu_decode-*"))
    off = _child({"XDG_CACHE_HOME": str(tmp_path), "DOGE_CPU_KERNEL": "0"}, CHILD)
    assert off.stdout.strip() == "plain" and "DOGE_CPU_KERNEL=0" in off.stderr


def test_the_profiled_build_computes_the_same_step_and_times_its_sections():
    """cpu_decode.profiled_library (benchmarks/decode_profile.py): the same logits as the decoding build, and
    every product's section timed."""
    import ctypes

    model = ours_from(hf_twin(tiny_config()), "eager")
    lib = cpu_decode.profiled_library()
    assert lib is not cpu_decode.library()
    timed, fused = cpu_decode.FusedStep(Decoder(model), lib=lib), Decoder(model).fused
    sections = (ctypes.c_double * len(cpu_decode.SECTIONS)).in_dll(lib, "doge_profile")
    before = list(sections)
    a, lengths = _prefilled(model, 3, 10, torch.float32)
    b, _ = _prefilled(model, 3, 10, torch.float32)
    tokens = torch.tensor([5, 6, 7])
    for step in range(5):
        got, want = timed(tokens, lengths + step, a), fused(tokens, lengths + step, b)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        tokens = want.argmax(-1)
    spent = [x - y for x, y in zip(sections, before)]
    assert all(s >= 0 for s in spent)
    products = [cpu_decode.SECTIONS.index(name) for name in cpu_decode.SECTIONS if name.endswith("product")]
    assert len(products) == 5 and all(spent[i] > 0 for i in products)


def _benchmark(name):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_decode_profile_benchmark_reports_every_section(capsys):
    profile = _benchmark("decode_profile")
    assert profile.main(["--size", "1M", "--steps", "4", "--rounds", "1", "--dtypes", "float32"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| section")]
    assert [row.split(" | ")[0][2:] for row in rows] == [*cpu_decode.SECTIONS, "call overhead (Python, ctypes)"]
    assert "- the five products: " in out and "of the bandwidth" in out
    for argv in (["--dtypes", "float16"], ["--size", "7B"], ["--steps", "0"]):
        with pytest.raises(SystemExit) as bad:
            profile.main(argv)
        assert bad.value.code == 2
