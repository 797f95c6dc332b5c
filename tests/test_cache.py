from __future__ import annotations

import pytest
import torch

from compiled_attn import AttentionSpec, BlockAllocator, CacheFullError, PagedKVCache
from compiled_attn.cache import cache_layout

SPEC = AttentionSpec(num_heads=4, num_kv_heads=2, head_size=32)


def test_allocate_free_fork():
    alloc = BlockAllocator(6)
    a = alloc.allocate(4)
    assert len(set(a)) == 4 and alloc.num_free == 2
    shared = alloc.fork(a[:2])
    alloc.free(a)
    assert alloc.num_free == 4, "forked blocks stay allocated until their last owner frees them"
    assert all(alloc.refcount(b) == 1 for b in shared)
    alloc.free(shared)
    assert alloc.num_free == 6
    with pytest.raises(ValueError, match="not allocated"):
        alloc.free([a[0]])


def test_full_pool_refuses_without_losing_anything():
    alloc = BlockAllocator(4)
    held = alloc.allocate(3)
    with pytest.raises(CacheFullError, match="need 2 blocks but only 1 of 4 are free"):
        alloc.allocate(2)
    assert alloc.num_free == 1 and all(alloc.refcount(b) == 1 for b in held)


def test_shuffled_pool_is_a_permutation():
    alloc = BlockAllocator(32, shuffle_seed=3)
    blocks = alloc.allocate(32)
    assert sorted(blocks) == list(range(32)) and blocks != list(range(32))


def test_cache_layout_and_copy_blocks():
    cache = PagedKVCache(num_layers=3, num_blocks=5, block_size=4, spec=SPEC, dtype=torch.float16)
    assert cache.layer(1).shape == (2, 5, 4, 2, 32) and cache.layer(1).dtype == torch.float16
    cache.kv.normal_()
    before = cache.kv.clone()
    cache.copy_blocks([(0, 3), (1, 4)])
    assert torch.equal(cache.kv[:, :, 3], before[:, :, 0]) and torch.equal(cache.kv[:, :, 4], before[:, :, 1])
    assert torch.equal(cache.kv[:, :, :3], before[:, :, :3])


def test_head_major_layout():
    """Same shape and block operations; in memory each head's page of block_size tokens is one piece."""
    token = PagedKVCache(num_layers=2, num_blocks=5, block_size=4, spec=SPEC, dtype=torch.float32)
    head = PagedKVCache(num_layers=2, num_blocks=5, block_size=4, spec=SPEC, dtype=torch.float32, layout="head_major")
    assert head.layer(0).shape == token.layer(0).shape and head.layout == "head_major"
    assert cache_layout(head.layer(1)) == "head_major" and cache_layout(token.layer(1)) == "token_major"
    assert head.kv.transpose(3, 4).is_contiguous()
    token.kv.normal_(generator=torch.Generator().manual_seed(0))
    head.kv.copy_(token.kv)
    for cache in (token, head):
        cache.copy_blocks([(0, 3), (1, 4)])
    assert torch.equal(head.kv, token.kv)
    with pytest.raises(ValueError, match="layout must be one of token_major, head_major"):
        PagedKVCache(num_layers=1, num_blocks=2, block_size=4, spec=SPEC, layout="NHD")


def test_model_cache_follows_its_backend(monkeypatch):
    """new_cache allocates the memory order the model's attention backend reads fastest."""
    from compiled_attn.backends import BACKENDS
    from compiled_attn.models import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM.random(LlamaConfig.preset("tiny"), seed=0, backend="reference", device="cpu")
    assert model.new_cache(num_blocks=4).layout == "token_major"
    monkeypatch.setattr(BACKENDS["reference"], "kv_cache_layout", classmethod(lambda cls, spec: "head_major"))
    assert cache_layout(model.new_cache(num_blocks=4).layer(0)) == "head_major"


def test_triton_backends_keep_fp8_caches_head_major():
    from compiled_attn.backends import BACKENDS

    fp8 = AttentionSpec(num_heads=4, num_kv_heads=2, head_size=32, kv_cache_dtype="fp8_e4m3")
    for name in ("triton", "trtllm"):
        assert BACKENDS[name].kv_cache_layout(fp8) == "head_major"
        assert BACKENDS[name].kv_cache_layout(SPEC) == "token_major"


def test_fp8_cache_dtype():
    spec = AttentionSpec(num_heads=4, num_kv_heads=2, head_size=32, kv_cache_dtype="fp8_e4m3")
    cache = PagedKVCache(num_layers=1, num_blocks=2, block_size=4, spec=spec, dtype=torch.bfloat16)
    assert cache.layer(0).dtype == torch.float8_e4m3fn

