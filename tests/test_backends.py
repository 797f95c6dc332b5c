"""Every backend available here against the reference; the reference against float64 math."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import compiled_attn as ca
from compiled_attn import ops
from compiled_attn.backends import BACKENDS
from compiled_attn.cache import cache_layout
from batches import ALIBI4, BATCH_SPECS, POISON, TOLERANCE, make_batch, rel_error, textbook_attention

LAYERS = {
    "mha_d64": ca.AttentionSpec(num_heads=4, num_kv_heads=4, head_size=64),
    "gqa4_d32": ca.AttentionSpec(num_heads=8, num_kv_heads=2, head_size=32),
    "mqa_d80": ca.AttentionSpec(num_heads=4, num_kv_heads=1, head_size=80),
    "window": ca.AttentionSpec(num_heads=4, num_kv_heads=2, head_size=64, sliding_window=8),
    "alibi": ca.AttentionSpec(num_heads=4, num_kv_heads=2, head_size=64, alibi_slopes=ALIBI4),
    "soft_cap": ca.AttentionSpec(num_heads=4, num_kv_heads=2, head_size=64, scale=0.5, logits_soft_cap=3.0),
    "fp8_kv": ca.AttentionSpec(num_heads=4, num_kv_heads=2, head_size=64, kv_cache_dtype="fp8_e4m3"),
}
FP8_SCALES = (0.5, 2.0)


def _scales(spec):
    return FP8_SCALES if spec.is_fp8 else (1.0, 1.0)


def run_backend(name, batch, *, poison_out=True):
    """Run one backend through the public op on a copy of the batch's cache: (out, cache)."""
    spec = batch.spec
    attn = ca.Attention(spec, backend=name, device=batch.q.device)
    attn.k_scale.fill_(_scales(spec)[0])
    attn.v_scale.fill_(_scales(spec)[1])
    cache = batch.kv_cache.clone()
    out = torch.full_like(batch.q, float("nan")) if poison_out else torch.empty_like(batch.q)
    ops.attention(batch.q, batch.k, batch.v, cache, batch.meta, out, backend=name, scale=spec.softmax_scale,
                  sliding_window=spec.sliding_window, logits_soft_cap=spec.logits_soft_cap,
                  alibi_slopes=attn.alibi_slopes, k_scale=attn.k_scale, v_scale=attn.v_scale)
    return out, cache


def _batch(spec_name, layer, dtype=torch.float32, block_size=16, seed=0):
    k_scale, v_scale = _scales(layer)
    return make_batch(spec_name, layer, dtype=dtype, block_size=block_size, seed=seed, k_scale=k_scale, v_scale=v_scale)


@pytest.mark.parametrize("layer_name", list(LAYERS))
@pytest.mark.parametrize("spec_name", list(BATCH_SPECS))
def test_reference_matches_textbook(spec_name, layer_name):
    layer = LAYERS[layer_name]
    batch = _batch(spec_name, layer, seed=hash((spec_name, layer_name)) % 1000)
    out, _ = run_backend("reference", batch)
    truth = textbook_attention(batch, list(layer.alibi_slopes) if layer.alibi_slopes else None)
    n = batch.num_real_tokens
    assert rel_error(out[:n], truth[:n]) <= TOLERANCE[torch.float32]
    assert torch.all(out[n:] == 0), "padding tokens must produce zeros"


@pytest.mark.parametrize("head_size", [32, 96, 112, 192, 256])
@pytest.mark.parametrize("block_size", [1, 5, 16, 256])
def test_reference_head_and_block_sizes(head_size, block_size):
    layer = ca.AttentionSpec(num_heads=2, num_kv_heads=1, head_size=head_size)
    batch = _batch("mixed", layer, dtype=torch.float64, block_size=block_size, seed=head_size + block_size)
    out, _ = run_backend("reference", batch)
    n = batch.num_real_tokens
    assert rel_error(out[:n], textbook_attention(batch)[:n]) <= TOLERANCE[torch.float64]


def _cpu_backends():
    return [name for name in BACKENDS if name != "reference"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layer_name", list(LAYERS))
@pytest.mark.parametrize("spec_name", list(BATCH_SPECS))
@pytest.mark.parametrize("backend", _cpu_backends())
def test_backend_matches_reference(backend, spec_name, layer_name, dtype):
    layer = LAYERS[layer_name]
    reason = BACKENDS[backend].supports(layer, device="cpu", dtype=dtype, block_size=16)
    if reason is not None:
        # What a backend does not support must be refused up front, naming the backend and feature.
        with pytest.raises(ValueError, match=backend) as refused:
            ca.Attention(layer, backend=backend, device="cpu", dtype=dtype, block_size=16)
        assert reason in str(refused.value)
        return
    batch = _batch(spec_name, layer, dtype=dtype, seed=len(spec_name) * 7 + len(layer_name))
    ref_out, ref_cache = run_backend("reference", batch)
    out, cache = run_backend(backend, batch)
    n = batch.num_real_tokens
    assert not out.isnan().any(), "every output row must be written"
    assert rel_error(out[:n], ref_out[:n]) <= TOLERANCE[dtype]
    assert torch.all(out[n:] == 0)
    assert torch.equal(cache.view(torch.uint8), ref_cache.view(torch.uint8)), "cache must equal the reference bit for bit"
    unused = ~batch.used_blocks
    assert torch.all(cache[:, unused].float() == POISON), "unused blocks must stay untouched"


@pytest.mark.parametrize("layer_name", ["gqa4_d32", "window", "fp8_kv"])
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_head_major_cache_gives_the_same_bits(backend, layer_name):
    """A head-major cache (each head's page in one piece: ``PagedKVCache(layout="head_major")``) is
    the same cache through other strides: a backend that reads it returns the token-major cache's
    results and writes the same bytes, bit for bit; one that cannot refuses it by name."""
    layer = LAYERS[layer_name]
    if BACKENDS[backend].supports(layer, device="cpu", dtype=torch.float32, block_size=16) is not None:
        head_major = torch.zeros(2, 4, 16, 2, 32).transpose(2, 3).contiguous().transpose(2, 3)
        reason = BACKENDS[backend].call_reason(head_major, sliding_window=None, logits_soft_cap=None, alibi_slopes=None)
        assert (reason is None) == BACKENDS[backend].reads_head_major
        if reason is not None:
            assert "token-major" in reason and "layout='token_major'" in reason
        return
    batch = _batch("mixed", layer)
    out, cache = run_backend(backend, batch)
    head_major = dataclasses.replace(batch, kv_cache=batch.kv_cache.transpose(2, 3).contiguous().transpose(2, 3))
    assert cache_layout(head_major.kv_cache) == "head_major"
    hm_out, hm_cache = run_backend(backend, head_major)
    assert cache_layout(hm_cache) == "head_major"
    assert torch.equal(hm_out, out)
    assert torch.equal(hm_cache.contiguous().view(torch.uint8), cache.view(torch.uint8))


def test_store_writes_only_given_slots():
    layer = LAYERS["gqa4_d32"]
    batch = _batch("mixed", layer)
    cache = batch.kv_cache.clone()
    ops.store_kv(batch.k, batch.v, cache, batch.meta.slot_mapping, torch.tensor(1.0), torch.tensor(1.0))
    flat = cache.view(2, -1, layer.num_kv_heads, layer.head_size)
    before = batch.kv_cache.view(2, -1, layer.num_kv_heads, layer.head_size)
    slots = batch.meta.slot_mapping
    real = slots >= 0
    assert torch.equal(flat[0, slots[real]], batch.k[real])
    assert torch.equal(flat[1, slots[real]], batch.v[real])
    untouched = torch.ones(flat.shape[1], dtype=torch.bool)
    untouched[slots[real]] = False
    assert torch.equal(flat[:, untouched], before[:, untouched])
