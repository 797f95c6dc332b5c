"""The flash_attn3 backend (FlashAttention-3's ``flash_attn_interface``).

CPU (CI, the package absent): ``supports()`` reasons, and the adapter end to end against the
reference backend through a stand-in ``flash_attn_interface`` that implements the documented
``flash_attn_with_kvcache`` semantics in plain PyTorch (varlen queries over a paged cache,
bottom-right causal, window, soft-cap) with the package's input checks, recording every call.
The real package has not run here: no GPU machine this project uses has it installed.
"""

from __future__ import annotations

import sys

import pytest
import torch

import compiled_attn as ca
from compiled_attn.backends import BACKENDS, PRIORITY, select_backend
from compiled_attn.backends.flash_attn3 import FlashAttn3Backend, flash_attn3_paged, static_num_splits
from batches import BATCH_SPECS, make_batch
from test_flash_xformers import LAYERS, _attend, _module, _pretend_cuda, assert_matches_reference, decode_meta, run_op

PAGES = (16, 64)  # FlashAttention-3 takes pages of any size


def fake_interface_module():
    calls = []

    def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, qv=None, rotary_cos=None, rotary_sin=None,
                                cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, page_table=None,
                                cu_seqlens_q=None, cu_seqlens_k_new=None, max_seqlen_q=None, rotary_seqlens=None,
                                q_descale=None, k_descale=None, v_descale=None, softmax_scale=None, causal=False,
                                window_size=(-1, -1), attention_chunk=0, softcap=0.0, rotary_interleaved=True,
                                scheduler_metadata=None, num_splits=0, pack_gqa=None, sm_margin=0,
                                return_softmax_lse=False):
        assert causal is True, "our attention is causal"
        calls.append(dict(q=q, k=k_cache, v=v_cache, new_k=k, new_v=v, cache_seqlens=cache_seqlens.clone(),
                          page_table=page_table, cu_seqlens_q=cu_seqlens_q.clone(), max_seqlen_q=max_seqlen_q,
                          softmax_scale=softmax_scale, causal=causal, window_size=window_size, softcap=softcap,
                          num_splits=num_splits))
        # The package's own checks (flash_api.cpp), as far as this adapter can trip them.
        assert q.dtype in (torch.float16, torch.bfloat16) and k_cache.dtype == v_cache.dtype == q.dtype
        assert k_cache.dim() == 4, "paged k_cache is [num_pages, page_size, num_heads_k, head_dim]"
        assert page_table.dtype == torch.int32 and page_table.stride(-1) == 1
        assert cache_seqlens.dtype == torch.int32 and cache_seqlens.is_contiguous()
        assert cu_seqlens_q.dtype == torch.int32 and max_seqlen_q is not None, "varlen q needs max_seqlen_q"
        assert cu_seqlens_q.shape == (page_table.shape[0] + 1,) and cache_seqlens.shape == (page_table.shape[0],)
        assert q.shape[1] % k_cache.shape[2] == 0 and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256
        assert num_splits >= 1, "a fixed split count (0 = the package's heuristic, not capture-safe)"
        out = torch.full_like(q, float("nan"))  # rows past cu_seqlens_q[-1] are never written
        for b in range(page_table.shape[0]):
            q0, q1 = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
            sq, sk = q1 - q0, int(cache_seqlens[b])
            assert sq <= max_seqlen_q
            if sq == 0:
                continue
            keys = k_cache[page_table[b].long()].flatten(0, 1)[:sk]
            values = v_cache[page_table[b].long()].flatten(0, 1)[:sk]
            q_pos = torch.arange(sq) + sk - sq  # bottom-right causal
            out[q0:q1] = _attend(q[q0:q1], keys, values, q_pos, torch.arange(sk), scale=softmax_scale,
                                 window_left=window_size[0], softcap=softcap).to(q.dtype)
        return (out, None, None, None) if return_softmax_lse else out

    return _module("flash_attn_interface", calls=calls, flash_attn_with_kvcache=flash_attn_with_kvcache)


@pytest.fixture
def fake_interface(monkeypatch):
    module = fake_interface_module()
    monkeypatch.setitem(sys.modules, "flash_attn_interface", module)
    return module


def test_registered_but_not_auto_selected():
    assert BACKENDS["flash_attn3"] is FlashAttn3Backend
    assert "flash_attn3" not in PRIORITY["cuda"], "unmeasured backends are chosen by name only"


def test_supports_reasons(monkeypatch, fake_interface):
    spec = LAYERS["gqa4_d128"]
    _pretend_cuda(monkeypatch, capability=(9, 0))
    assert FlashAttn3Backend.supports(spec, device="cuda", dtype=torch.bfloat16, block_size=16) is None
    assert select_backend(spec, name="flash_attn3", device="cuda", dtype=torch.bfloat16, block_size=1) \
        is FlashAttn3Backend
    assert "alibi" in FlashAttn3Backend.supports(LAYERS["alibi"], device="cuda", dtype=torch.bfloat16)
    assert "fp8_kv_cache" in FlashAttn3Backend.supports(LAYERS["fp8_kv"], device="cuda", dtype=torch.bfloat16)
    assert "dtype" in FlashAttn3Backend.supports(spec, device="cuda", dtype=torch.float32)
    odd = ca.AttentionSpec(num_heads=4, num_kv_heads=2, head_size=100)
    assert "head_size 100" in FlashAttn3Backend.supports(odd, device="cuda", dtype=torch.bfloat16)
    assert "runs on cuda" in FlashAttn3Backend.supports(spec, device="cpu")
    _pretend_cuda(monkeypatch, capability=(8, 0))
    assert "compute capability" in FlashAttn3Backend.supports(spec, device="cuda", dtype=torch.bfloat16)


def test_missing_package_reason():
    if "flash_attn_interface" in sys.modules or FlashAttn3Backend.unavailable_reason() is None:
        pytest.skip("flash_attn_interface is installed here")
    assert FlashAttn3Backend.unavailable_reason() == "package 'flash_attn_interface' is not installed"


def cpu_cases():
    cases = [(spec, layer, torch.bfloat16, page) for spec in BATCH_SPECS for layer in ("gqa4_d128", "window", "soft_cap")
             for page in PAGES]
    return cases + [("mixed", "mqa_d64", torch.float16, 16), ("prefix_prefill", "mha_d96", torch.float16, 32)]


@pytest.mark.parametrize("spec_name,layer,dtype,page", cpu_cases())
def test_adapter_matches_reference(fake_interface, spec_name, layer, dtype, page):
    batch = make_batch(spec_name, LAYERS[layer], dtype=dtype, block_size=page, seed=len(spec_name) + page)
    assert_matches_reference("flash_attn3", batch)
    assert len(fake_interface.calls) == 1, "one call for the whole mixed batch"


@pytest.mark.parametrize("spec_name", ["small_decode", "large_decode"])
def test_decode_layout(fake_interface, spec_name):
    batch = make_batch(spec_name, LAYERS["gqa4_d128"], dtype=torch.bfloat16, block_size=16, pad_tokens=2, pad_seqs=2)
    assert_matches_reference("flash_attn3", batch, decode_meta(batch))


@pytest.mark.parametrize("layer", ["gqa4_d128", "window", "soft_cap"])
def test_arguments(fake_interface, layer):
    spec = LAYERS[layer]
    batch = make_batch("mixed", spec, dtype=torch.bfloat16, block_size=16)
    _, cache = run_op("flash_attn3", batch)
    (call,) = fake_interface.calls
    meta = batch.meta
    # kv_cache[0] / kv_cache[1] are FlashAttention-3's paged layout as they are: no copy.
    assert call["k"].data_ptr() == cache[0].data_ptr() and call["v"].data_ptr() == cache[1].data_ptr()
    assert call["new_k"] is None and call["new_v"] is None, "the store goes through slot_mapping"
    assert torch.equal(call["page_table"], meta.block_table) and torch.equal(call["cache_seqlens"], meta.seq_lens)
    assert torch.equal(call["cu_seqlens_q"], meta.query_start_loc)
    assert call["max_seqlen_q"] == max(meta.max_query_len, 2)
    assert call["causal"] is True and call["softmax_scale"] == spec.softmax_scale
    assert call["window_size"] == ((7, 0) if layer == "window" else (-1, -1))
    assert call["softcap"] == (3.0 if layer == "soft_cap" else 0.0)
    assert call["num_splits"] == 1, "a prefill-shaped bucket is not split"


def test_static_num_splits_follow_the_bucket_not_the_values():
    decode = dict(kv_heads=8, max_keys=8192, max_query_len=1, num_sms=132)
    assert static_num_splits(num_seqs=1, **decode) == 32
    assert static_num_splits(num_seqs=4, **decode) == 9
    assert static_num_splits(num_seqs=64, **decode) == 1
    assert static_num_splits(num_seqs=1, kv_heads=8, max_keys=512, max_query_len=1, num_sms=132) == 2


@pytest.mark.parametrize("feature,message", [("fp8_kv", "fp8_kv_cache"), ("alibi", "alibi")])
def test_forward_refuses(fake_interface, feature, message):
    batch = make_batch("mixed", LAYERS[feature], dtype=torch.bfloat16, block_size=16)
    with pytest.raises(ValueError, match=f"flash_attn3.*{message}"):
        run_op("flash_attn3", batch)
    assert fake_interface.calls == []


def test_op_opcheck_and_compile(fake_interface):
    batch = make_batch("mixed", LAYERS["gqa4_d128"], dtype=torch.bfloat16, block_size=16)
    meta, cache = batch.meta, batch.kv_cache
    args = (batch.q, cache[0], cache[1], meta.query_start_loc, meta.seq_lens, meta.block_table, 16,
            LAYERS["gqa4_d128"].softmax_scale, -1, 0.0, 1)
    torch.library.opcheck(flash_attn3_paged, args, test_utils=("test_schema", "test_faketensor"))
    compiled = torch.compile(lambda *a: flash_attn3_paged(*a) * 1, fullgraph=True)
    n = batch.num_real_tokens
    torch.testing.assert_close(compiled(*args)[:n], flash_attn3_paged(*args)[:n])


# ---------------------------------------------------------------------------------------------
# GPU, with the real package (skipped where it is not installed, as on the machines used so far)


@pytest.mark.gpu
@pytest.mark.parametrize("spec_name", list(BATCH_SPECS))
@pytest.mark.parametrize("layer,page", [("gqa4_d128", 16), ("window", 64), ("soft_cap", 256)])
def test_gpu_matches_reference(spec_name, layer, page):
    reason = FlashAttn3Backend.supports(LAYERS[layer], device="cuda", dtype=torch.bfloat16, block_size=page)
    if reason:
        pytest.skip(f"flash_attn3: {reason}")
    batch = make_batch(spec_name, LAYERS[layer], dtype=torch.bfloat16, block_size=page, device="cuda")
    assert_matches_reference("flash_attn3", batch)
