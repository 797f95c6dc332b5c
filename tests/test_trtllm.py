"""The fused store-plus-decode backend against the reference: CPU under the Triton interpreter
(small shapes, fp32/fp16), GPU on the named batch specs, compiled and replayed in a CUDA graph."""

from __future__ import annotations

import pytest
import torch

import compiled_attn as ca
from batches import POISON, TOLERANCE, make_batch, rel_error
from test_backends import FP8_SCALES, run_backend

pytest.importorskip("triton", reason="the trtllm backend runs Triton kernels")

ALIBI = [0.5, 0.25, 0.125, 0.0625]
LAYERS = {
    "gqa2": ca.AttentionSpec(num_heads=4, num_kv_heads=2, head_size=64),
    "mqa_d80": ca.AttentionSpec(num_heads=4, num_kv_heads=1, head_size=80),
    "window_alibi": ca.AttentionSpec(num_heads=4, num_kv_heads=2, head_size=64, sliding_window=9, alibi_slopes=ALIBI),
    "soft_cap": ca.AttentionSpec(num_heads=4, num_kv_heads=2, head_size=64, scale=0.4, logits_soft_cap=4.0),
    "fp8_kv": ca.AttentionSpec(num_heads=4, num_kv_heads=2, head_size=64, kv_cache_dtype="fp8_e4m3"),
}


@pytest.fixture
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _decode_batch(spec_name, layer, dtype, device="cpu", block_size=16, seed=0):
    k_scale, v_scale = FP8_SCALES if layer.is_fp8 else (1.0, 1.0)
    # A decode layout: token i is sequence i, padded to equal token and sequence counts.
    return make_batch(spec_name, layer, dtype=dtype, block_size=block_size, seed=seed, pad_tokens=2, pad_seqs=2,
                      max_query_len=1, device=device, k_scale=k_scale, v_scale=v_scale)


def _compare(batch, dtype):
    ref_out, ref_cache = run_backend("reference", batch)
    out, cache = run_backend("trtllm", batch)
    n = batch.num_real_tokens
    assert not out.isnan().any(), "every output row must be written"
    assert rel_error(out[:n], ref_out[:n]) <= TOLERANCE[dtype]
    assert torch.all(out[n:] == 0)
    if batch.spec.is_fp8:  # the kernel's fp8 rounding may differ from torch's by one ulp on a few values
        assert (cache.float() - ref_cache.float()).abs().max() <= 32.0
    else:
        assert torch.equal(cache.view(torch.uint8), ref_cache.view(torch.uint8))
    assert torch.all(cache[:, ~batch.used_blocks].float() == POISON), "unused blocks must stay untouched"


@pytest.mark.parametrize("layer", list(LAYERS))
def test_fused_decode_matches_reference(interpreter, layer):
    dtype = torch.float16 if layer == "gqa2" else torch.float32
    _compare(_decode_batch("small_decode", LAYERS[layer], dtype), dtype)


def test_non_decode_steps_use_the_unified_kernel(interpreter):
    layer = LAYERS["gqa2"]
    _compare(make_batch("spec_decode", layer, dtype=torch.float32), torch.float32)


def test_selected_by_name_and_refused_on_plain_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "needs CUDA" in ca.available_backends(LAYERS["gqa2"], device="cpu")["trtllm"]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ca.Attention(LAYERS["gqa2"], backend="trtllm", device="cpu").backend.name == "trtllm"


def test_decode_layout_is_enforced():
    with pytest.raises(ValueError, match="decode layout"):
        ca.AttentionMetadata.build([1, 0], [4, 3], [[0], [1]], block_size=16, max_query_len=1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("spec_name", ["small_decode", "large_decode"])
@pytest.mark.parametrize("block_size", [16, 64])
def test_gpu_fused_decode(spec_name, layer, dtype, block_size):
    _compare(_decode_batch(spec_name, LAYERS[layer], dtype, device="cuda", block_size=block_size, seed=3), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("spec_name", ["mixed", "prefix_prefill", "chunked_prefill", "spec_decode"])
def test_gpu_other_steps(spec_name):
    _compare(make_batch(spec_name, LAYERS["gqa2"], dtype=torch.bfloat16, device="cuda"), torch.bfloat16)


@pytest.mark.gpu
def test_gpu_compiled_and_replayed():
    layer = LAYERS["gqa2"]
    batch = _decode_batch("large_decode", layer, torch.bfloat16, device="cuda")
    attn = ca.Attention(layer, backend="trtllm", device="cuda")
    ref_out, ref_cache = run_backend("reference", batch)

    def step(q, k, v, cache, meta):
        return attn(q, k, v, cache, meta) * 1.0

    compiled = torch.compile(step, fullgraph=True)
    cache = batch.kv_cache.clone()
    out = compiled(batch.q, batch.k, batch.v, cache, batch.meta)
    n = batch.num_real_tokens
    assert rel_error(out[:n], ref_out[:n]) <= TOLERANCE[torch.bfloat16]
    assert torch.equal(cache, ref_cache)

    cache = batch.kv_cache.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replay_out = compiled(batch.q, batch.k, batch.v, cache, batch.meta)
    cache.copy_(batch.kv_cache)
    graph.replay()
    torch.cuda.synchronize()
    assert rel_error(replay_out[:n], ref_out[:n]) <= TOLERANCE[torch.bfloat16]
    assert torch.equal(cache, ref_cache)
