"""The flash_attn and xformers backends.

CPU (CI, neither package installed): selection and ``supports()`` reasons with the packages
absent or present-but-unusable; the argument mapping of both adapters, checked against stand-in
``flash_attn`` / ``xformers`` modules that implement the packages' documented semantics in plain
PyTorch (and record every call), end to end against the reference backend; opcheck and
torch.compile of our wrapper ops. Where the real xformers is installed, its Triton split-K kernel
also runs on CPU under the Triton interpreter with our mask.

GPU (``-m gpu``, the real packages): both backends against the reference on the named batch specs,
cache bit-equality, untouched unused blocks, zero padding rows; an ``Attention`` layer under
``torch.compile(fullgraph=True)``; CUDA-graph capture and replay with new data.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch

import compiled_attn as ca
from compiled_attn import ops
from compiled_attn.backends import BACKENDS, PRIORITY, select_backend
from compiled_attn.backends import flash_attn as flash_backend_module
from compiled_attn.backends.flash_attn import FlashAttnBackend, flash_window
from compiled_attn.backends.xformers import XFormersBackend
from batches import ALIBI4, BATCH_SPECS, POISON, TOLERANCE, make_batch, rel_error

LAYERS = {
    "gqa4_d128": ca.AttentionSpec(num_heads=8, num_kv_heads=2, head_size=128),
    "mqa_d64": ca.AttentionSpec(num_heads=4, num_kv_heads=1, head_size=64),
    "mha_d96": ca.AttentionSpec(num_heads=2, num_kv_heads=2, head_size=96),
    "window": ca.AttentionSpec(num_heads=4, num_kv_heads=2, head_size=64, sliding_window=8),
    "alibi": ca.AttentionSpec(num_heads=4, num_kv_heads=2, head_size=64, alibi_slopes=ALIBI4),
    "soft_cap": ca.AttentionSpec(num_heads=4, num_kv_heads=2, head_size=64, scale=0.5, logits_soft_cap=3.0),
    "alibi_soft_cap": ca.AttentionSpec(num_heads=4, num_kv_heads=2, head_size=64, alibi_slopes=ALIBI4,
                                       logits_soft_cap=30.0),
    "fp8_kv": ca.AttentionSpec(num_heads=4, num_kv_heads=2, head_size=64, kv_cache_dtype="fp8_e4m3"),
}
DECODE_SPECS = ("small_decode", "large_decode")
FLASH_PAGE = 256
XFORMERS_PAGES = (64, 128)
BACKEND_CLASSES = {"flash_attn": FlashAttnBackend, "xformers": XFormersBackend}


# ---------------------------------------------------------------------------------------------
# Shared helpers


def run_op(name, batch, meta=None):
    """One backend through the public op on a copy of the batch's cache: (out, cache)."""
    spec = batch.spec
    device = batch.q.device
    slopes = None if spec.alibi_slopes is None else torch.tensor(spec.alibi_slopes, device=device)
    one = torch.ones((), device=device)
    cache = batch.kv_cache.clone()
    out = torch.full_like(batch.q, float("nan"))
    ops.attention(batch.q, batch.k, batch.v, cache, meta or batch.meta, out, backend=name, scale=spec.softmax_scale,
                  sliding_window=spec.sliding_window, logits_soft_cap=spec.logits_soft_cap, alibi_slopes=slopes,
                  k_scale=one, v_scale=one)
    return out, cache


def assert_matches_reference(name, batch, meta=None):
    ref_out, ref_cache = run_op("reference", batch)
    out, cache = run_op(name, batch, meta)
    n = batch.num_real_tokens
    assert not out.isnan().any(), "every output row must be written"
    err = rel_error(out[:n], ref_out[:n])
    assert err <= TOLERANCE[batch.q.dtype], f"relative error {err:.2e}"
    assert torch.all(out[n:] == 0), "padding tokens must produce zeros"
    assert torch.equal(cache.view(torch.uint8), ref_cache.view(torch.uint8)), "cache must equal the reference"
    assert torch.all(cache[:, ~batch.used_blocks].float() == POISON), "unused blocks must stay untouched"


def decode_meta(batch):
    """The batch's metadata as a decode bucket would describe it (every sequence has <= 1 new token)."""
    assert max(batch.query_lens) == 1
    return dataclasses.replace(batch.meta, max_query_len=1)


def _pretend_cuda(monkeypatch, capability=(9, 0)):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)


def _module(name, **attrs):
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    module.__dict__.update(attrs)
    return module


def _attend(q, keys, values, q_pos, key_pos, *, scale, window_left=-1, softcap=0.0, slopes=None):
    """Documented flash-attn math for one sequence, in fp32: q [sq, H, D] at positions q_pos,
    keys/values [sk, KVH, D] at key_pos; causal, optional window/soft-cap/ALiBi (flash's order:
    cap first, then the bias). Rows that see no key are zero."""
    group = q.shape[1] // keys.shape[1]
    kf = keys.float().repeat_interleave(group, 1)
    vf = values.float().repeat_interleave(group, 1)
    s = torch.einsum("qhd,khd->hqk", q.float(), kf) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    dist = q_pos[:, None] - key_pos[None, :]
    if slopes is not None:
        s = s - slopes.float()[:, None, None] * dist.abs()
    visible = dist >= 0
    if window_left >= 0:
        visible &= dist <= window_left
    s = s.masked_fill(~visible, float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(s, -1).nan_to_num(0.0), vf)


# ---------------------------------------------------------------------------------------------
# A stand-in flash_attn: the documented API and checks, in plain PyTorch, recording its calls.


def _check_flash_inputs(q, k_cache, v_cache, block_table, window_size, causal):
    assert q.dtype in (torch.float16, torch.bfloat16), "FlashAttention only support fp16 and bf16 data type"
    assert k_cache.dtype == v_cache.dtype == q.dtype
    assert q.stride(-1) == k_cache.stride(-1) == v_cache.stride(-1) == 1
    assert k_cache.dim() == 4, "paged k_cache is [num_blocks, page_block_size, nheads_k, headdim]"
    assert k_cache.shape[1] % 256 == 0, "Paged KV cache block size must be divisible by 256"
    assert block_table.dtype == torch.int32 and block_table.stride(-1) == 1
    assert q.shape[-1] % 8 == 0 and q.shape[-1] <= 256
    assert causal is True
    assert isinstance(window_size, tuple) and len(window_size) == 2


def fake_flash_module(version="2.8.3"):
    calls = []

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                               alibi_slopes=None, deterministic=False, return_attn_probs=False, block_table=None):
        calls.append(dict(kind="varlen", q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q.clone(),
                          cu_seqlens_k=cu_seqlens_k.clone(), max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                          softmax_scale=softmax_scale, causal=causal, window_size=window_size, softcap=softcap,
                          alibi_slopes=alibi_slopes, block_table=block_table))
        _check_flash_inputs(q, k, v, block_table, window_size, causal)
        assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32
        assert cu_seqlens_q.shape == cu_seqlens_k.shape == (block_table.shape[0] + 1,)
        if max_seqlen_q == 1:
            # flash-attn then folds GQA heads into the query rows, assuming token b is sequence b.
            assert q.shape[0] == block_table.shape[0]
        out = torch.full_like(q, float("nan"))  # rows past cu_seqlens_q[-1] are never written
        for b in range(block_table.shape[0]):
            q0, q1 = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
            sk = int(cu_seqlens_k[b + 1] - cu_seqlens_k[b])
            sq = q1 - q0
            assert sq <= max_seqlen_q and sk <= max_seqlen_k
            if sq == 0:
                continue
            keys = k[block_table[b].long()].flatten(0, 1)[:sk]
            values = v[block_table[b].long()].flatten(0, 1)[:sk]
            q_pos = torch.arange(sq) + sk - sq
            left = window_size[0] if window_size[0] < max_seqlen_k else -1
            out[q0:q1] = _attend(q[q0:q1], keys, values, q_pos, torch.arange(sk), scale=softmax_scale,
                                 window_left=left, softcap=softcap, slopes=alibi_slopes).to(q.dtype)
        return out

    def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                                cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                                softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
        calls.append(dict(kind="kvcache", q=q, k=k_cache, v=v_cache, new_k=k, new_v=v,
                          cache_seqlens=cache_seqlens.clone(), block_table=block_table, softmax_scale=softmax_scale,
                          causal=causal, window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
                          num_splits=num_splits))
        _check_flash_inputs(q, k_cache, v_cache, block_table, window_size, causal)
        assert q.dim() == 4 and cache_seqlens.dtype == torch.int32
        assert cache_seqlens.shape == (q.shape[0],) and block_table.shape[0] == q.shape[0]
        assert k is None and v is None
        out = torch.empty_like(q)
        for b in range(q.shape[0]):
            sk, sq = int(cache_seqlens[b]), q.shape[1]
            keys = k_cache[block_table[b].long()].flatten(0, 1)[:sk]
            values = v_cache[block_table[b].long()].flatten(0, 1)[:sk]
            out[b] = _attend(q[b], keys, values, torch.arange(sq) + sk - sq, torch.arange(sk), scale=softmax_scale,
                             window_left=window_size[0], softcap=softcap, slopes=alibi_slopes).to(q.dtype)
        return out

    return _module("flash_attn", __version__=version, calls=calls, flash_attn_varlen_func=flash_attn_varlen_func,
                   flash_attn_with_kvcache=flash_attn_with_kvcache)


@pytest.fixture
def fake_flash(monkeypatch):
    module = fake_flash_module()
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    return module


# ---------------------------------------------------------------------------------------------
# A stand-in xformers: the mask dataclasses our adapter builds, and the split-K op's documented
# semantics for a paged gappy mask (row r sees keys [seqstart[r], seqlen[r]) of block-table row r).


@dataclasses.dataclass
class _SeqLenInfo:
    seqstart: torch.Tensor
    max_seqlen: int
    min_seqlen: int
    seqstart_py: list


@dataclasses.dataclass
class _GappySeqInfo(_SeqLenInfo):
    seqlen: torch.Tensor
    seqlen_py: list


@dataclasses.dataclass
class PagedBlockDiagonalGappyKeysMask:
    q_seqinfo: _SeqLenInfo
    k_seqinfo: _GappySeqInfo
    block_tables: torch.Tensor
    page_size: int


def fake_xformers_modules(built_with_cuda=True):
    calls = []

    class FwOp:
        OPERATOR = True
        BLOCK_N = 64

    def memory_efficient_attention_forward(query, key, value, attn_bias=None, p=0.0, scale=None, *, op=None,
                                           output_dtype=None):
        calls.append(dict(query=query, key=key, value=value, attn_bias=attn_bias, scale=scale, op=op))
        assert op is FwOp, "the split-K op must be forced"
        assert isinstance(attn_bias, PagedBlockDiagonalGappyKeysMask)
        assert query.dim() == key.dim() == value.dim() == 5 and query.shape[0] == key.shape[0] == 1
        _, rows, groups, heads, dim = query.shape
        assert key.shape[2:] == (groups, heads, dim) and key.stride(3) == 0, "GQA via BMGHK with stride-0 heads"
        page = attn_bias.page_size
        assert page % FwOp.BLOCK_N == 0 and key.shape[1] % page == 0
        q_info, k_info = attn_bias.q_seqinfo, attn_bias.k_seqinfo
        assert q_info.seqstart_py[-1] == rows and q_info.max_seqlen == q_info.min_seqlen == 1
        assert q_info.seqstart.tolist() == list(range(rows + 1))
        assert k_info.seqstart.dtype == k_info.seqlen.dtype == torch.int32 and k_info.seqstart.shape == (rows + 1,)
        assert attn_bias.block_tables.shape[0] == rows and attn_bias.block_tables.dtype == torch.int32
        paged_k = key[0, :, :, 0].unflatten(0, (-1, page))
        paged_v = value[0, :, :, 0].unflatten(0, (-1, page))
        out = torch.empty_like(query)
        for r in range(rows):
            start, end = int(k_info.seqstart[r]), int(k_info.seqlen[r])
            table = attn_bias.block_tables[r].long()
            keys = paged_k[table].flatten(0, 1)[start:end]
            values = paged_v[table].flatten(0, 1)[start:end]
            q = query[0, r].flatten(0, 1)[None]  # [1, G*H, D]
            res = _attend(q, keys, values, torch.tensor([end - 1]), torch.arange(start, end), scale=scale)
            out[0, r] = res[0].unflatten(0, (groups, heads)).to(query.dtype)
        return out

    attn_bias = _module("xformers.ops.fmha.attn_bias", _SeqLenInfo=_SeqLenInfo, _GappySeqInfo=_GappySeqInfo,
                        PagedBlockDiagonalGappyKeysMask=PagedBlockDiagonalGappyKeysMask)
    triton_splitk = _module("xformers.ops.fmha.triton_splitk", FwOp=FwOp)
    common = _module("xformers.ops.fmha.common", _built_with_cuda=built_with_cuda)
    fmha = _module("xformers.ops.fmha", memory_efficient_attention_forward=memory_efficient_attention_forward,
                   attn_bias=attn_bias, triton_splitk=triton_splitk, common=common, calls=calls)
    xops = _module("xformers.ops", fmha=fmha)
    root = _module("xformers", __version__="0.0.35", ops=xops)
    return {"xformers": root, "xformers.ops": xops, "xformers.ops.fmha": fmha,
            "xformers.ops.fmha.attn_bias": attn_bias, "xformers.ops.fmha.triton_splitk": triton_splitk,
            "xformers.ops.fmha.common": common}


@pytest.fixture
def fake_xformers(monkeypatch):
    modules = fake_xformers_modules()
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return modules["xformers.ops.fmha"]


# ---------------------------------------------------------------------------------------------
# CPU: registry, selection, reasons


def test_registered_with_cuda_priority():
    assert BACKENDS["flash_attn"] is FlashAttnBackend and BACKENDS["xformers"] is XFormersBackend
    order = PRIORITY["cuda"]
    assert order.index("flash_attn") < order.index("xformers") < order.index("torch_native")
    if "triton" in order:
        assert order.index("triton") < order.index("flash_attn")
    assert "flash_attn" not in PRIORITY["cpu"] and "xformers" not in PRIORITY["cpu"]
    for backend in (FlashAttnBackend, XFormersBackend):
        assert backend.cuda_graph_support == "full"


@pytest.mark.parametrize("name,package", [("flash_attn", "flash_attn"), ("xformers", "xformers")])
def test_missing_package_reason_and_fallback(monkeypatch, name, package):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == package else real_find_spec(n, *a))
    monkeypatch.delitem(sys.modules, package, raising=False)
    _pretend_cuda(monkeypatch)
    spec = LAYERS["mqa_d64"]
    reason = BACKENDS[name].supports(spec, device="cuda", dtype=torch.bfloat16, block_size=256)
    assert reason == f"package '{package}' is not installed"
    # Auto selection skips it; forcing it fails loudly with the reason.
    assert select_backend(spec, device="cuda", dtype=torch.bfloat16, block_size=256).name != name
    with pytest.raises(ValueError, match=f"backend '{name}' cannot serve this layer: package '{package}'"):
        select_backend(spec, name=name, device="cuda", dtype=torch.bfloat16, block_size=256)
    monkeypatch.setenv("COMPILED_ATTN_BACKEND", name)
    with pytest.raises(ValueError, match="is not installed"):
        select_backend(spec, device="cuda", dtype=torch.bfloat16, block_size=256)


def test_selection_prefers_flash_then_xformers(monkeypatch, fake_flash, fake_xformers):
    _pretend_cuda(monkeypatch)
    monkeypatch.setitem(PRIORITY, "cuda", ("flash_attn", "xformers", "torch_native", "reference"))
    spec = LAYERS["gqa4_d128"]
    pick = lambda **kw: select_backend(spec, device="cuda", dtype=torch.bfloat16, **kw).name  # noqa: E731
    assert pick(block_size=256) == "flash_attn"
    assert pick(block_size=128) == "xformers"  # flash needs pages of 256*k
    assert pick(block_size=16) == "torch_native"  # neither takes 16
    assert select_backend(LAYERS["alibi"], device="cuda", dtype=torch.bfloat16, block_size=128).name == "torch_native"


def _reason(backend, spec, monkeypatch, *, device="cuda", dtype=torch.bfloat16, block_size=None, capability=(9, 0)):
    _pretend_cuda(monkeypatch, capability)
    return backend.supports(spec, device=device, dtype=dtype, block_size=block_size)


FLASH_CASES = {
    # name: (layer, kwargs, expected fragment or None)
    "ok": ("gqa4_d128", {}, None),
    "page_256": ("gqa4_d128", {"block_size": 256}, None),
    "page_512": ("gqa4_d128", {"block_size": 512}, None),
    "page_16": ("gqa4_d128", {"block_size": 16},
                "block_size 16 is not supported: FlashAttention-2's paged KV needs pages that are a multiple of 256"),
    "page_128": ("gqa4_d128", {"block_size": 128}, "multiple of 256"),
    "fp32": ("gqa4_d128", {"dtype": torch.float32}, "dtype torch.float32 is not supported"),
    "fp16": ("gqa4_d128", {"dtype": torch.float16}, None),
    "d96": ("mha_d96", {}, None),
    "window": ("window", {}, None),
    "alibi": ("alibi", {}, None),
    "soft_cap": ("soft_cap", {}, None),
    "alibi_and_soft_cap": ("alibi_soft_cap", {}, "alibi together with logits_soft_cap"),
    "fp8": ("fp8_kv", {}, "does not support fp8_kv_cache"),
    "cpu": ("gqa4_d128", {"device": "cpu"}, "runs on cuda, not cpu"),
    "turing": ("gqa4_d128", {"capability": (7, 5)}, "needs compute capability >= (8, 0)"),
    "blackwell": ("gqa4_d128", {"capability": (10, 0)}, "compute capability 8.x and 9.x only"),
}


@pytest.mark.parametrize("case", list(FLASH_CASES))
def test_flash_supports_reasons(monkeypatch, fake_flash, case):
    layer, kwargs, expected = FLASH_CASES[case]
    reason = _reason(FlashAttnBackend, LAYERS[layer], monkeypatch, **kwargs)
    if expected is None:
        assert reason is None
    else:
        assert reason is not None and expected in reason, reason


@pytest.mark.parametrize("head_size,ok", [(8, True), (72, True), (256, True), (100, False), (264, False)])
def test_flash_head_sizes(monkeypatch, fake_flash, head_size, ok):
    spec = ca.AttentionSpec(num_heads=2, num_kv_heads=1, head_size=head_size)
    reason = _reason(FlashAttnBackend, spec, monkeypatch)
    assert (reason is None) == ok, reason
    if not ok:
        assert f"head_size {head_size} is not supported (needs a multiple of 8, at most 256)" == reason


def test_flash_unusable_installs(monkeypatch):
    _pretend_cuda(monkeypatch)
    spec = LAYERS["gqa4_d128"]
    monkeypatch.setitem(sys.modules, "flash_attn", fake_flash_module(version="2.5.9"))
    reason = FlashAttnBackend.supports(spec, device="cuda")
    assert "flash_attn 2.5.9 is not supported (needs 2.x, at least 2.6)" in reason
    monkeypatch.setitem(sys.modules, "flash_attn", fake_flash_module(version="3.0.0b1"))
    assert "needs 2.x" in FlashAttnBackend.supports(spec, device="cuda")
    broken = _module("flash_attn", __version__="2.8.3")  # imports, but without the functions
    monkeypatch.setitem(sys.modules, "flash_attn", broken)
    assert "has no flash_attn_varlen_func" in FlashAttnBackend.supports(spec, device="cuda")
    # A build that cannot load its CUDA extension: importing raises.
    monkeypatch.setitem(sys.modules, "flash_attn", fake_flash_module())

    def broken_import():
        raise ImportError("libcudart.so.12: cannot open shared object file")

    monkeypatch.setattr(flash_backend_module, "_flash", broken_import)
    reason = FlashAttnBackend.supports(spec, device="cuda")
    assert reason == ("package 'flash_attn' is installed but failed to import "
                      "(ImportError: libcudart.so.12: cannot open shared object file)")


XFORMERS_CASES = {
    "ok": ("gqa4_d128", {}, None),
    "page_64": ("gqa4_d128", {"block_size": 64}, None),
    "page_128": ("gqa4_d128", {"block_size": 128}, None),
    "page_256": ("gqa4_d128", {"block_size": 256}, None),
    "page_16": ("gqa4_d128", {"block_size": 16}, "block_size 16 is not supported: xFormers' paged split-K kernel "
                "needs pages that are a multiple of its BLOCK_N (64)"),
    "page_96": ("gqa4_d128", {"block_size": 96}, "multiple of its BLOCK_N (64)"),
    "fp32": ("gqa4_d128", {"dtype": torch.float32}, "dtype torch.float32 is not supported"),
    "d96": ("mha_d96", {}, "head_size 96 is not supported (supported: 16, 32, 64, 128, 256)"),
    "window": ("window", {}, None),
    "alibi": ("alibi", {}, "does not support alibi"),
    "soft_cap": ("soft_cap", {}, "does not support logits_soft_cap"),
    "fp8": ("fp8_kv", {}, "does not support fp8_kv_cache"),
    "cpu": ("gqa4_d128", {"device": "cpu"}, "runs on cuda, not cpu"),
    "turing": ("gqa4_d128", {"capability": (7, 5)}, "needs compute capability >= (8, 0)"),
    "blackwell": ("gqa4_d128", {"capability": (10, 0)}, None),
}


@pytest.mark.parametrize("case", list(XFORMERS_CASES))
def test_xformers_supports_reasons(monkeypatch, fake_xformers, case):
    layer, kwargs, expected = XFORMERS_CASES[case]
    reason = _reason(XFormersBackend, LAYERS[layer], monkeypatch, **kwargs)
    if expected is None:
        assert reason is None
    else:
        assert reason is not None and expected in reason, reason


def test_xformers_without_cuda_build(monkeypatch):
    for name, module in fake_xformers_modules(built_with_cuda=False).items():
        monkeypatch.setitem(sys.modules, name, module)
    reason = _reason(XFormersBackend, LAYERS["gqa4_d128"], monkeypatch)
    assert "xformers was not built for this torch/CUDA" in reason
    monkeypatch.setitem(sys.modules, "xformers.ops.fmha", None)
    assert "failed to import" in _reason(XFormersBackend, LAYERS["gqa4_d128"], monkeypatch)


def test_layer_refuses_up_front(monkeypatch, fake_flash, fake_xformers):
    _pretend_cuda(monkeypatch)
    with pytest.raises(ValueError, match="flash_attn.*alibi together with logits_soft_cap"):
        select_backend(LAYERS["alibi_soft_cap"], name="flash_attn", device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="xformers.*does not support alibi"):
        select_backend(LAYERS["alibi"], name="xformers", device="cuda", dtype=torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# CPU: the flash_attn adapter against the stand-in


def flash_cpu_cases():
    cases = []
    for spec_name in BATCH_SPECS:
        for layer in ("gqa4_d128", "window", "alibi", "soft_cap"):
            cases.append((spec_name, layer, torch.bfloat16))
    cases += [("mixed", "mqa_d64", torch.float16), ("prefix_prefill", "mha_d96", torch.float16)]
    return cases


@pytest.mark.parametrize("spec_name,layer,dtype", flash_cpu_cases())
def test_flash_adapter_matches_reference(fake_flash, spec_name, layer, dtype):
    batch = make_batch(spec_name, LAYERS[layer], dtype=dtype, block_size=FLASH_PAGE, seed=len(spec_name) + len(layer))
    assert_matches_reference("flash_attn", batch)
    assert [c["kind"] for c in fake_flash.calls] == ["varlen"]
    if spec_name in DECODE_SPECS:
        fake_flash.calls.clear()
        assert_matches_reference("flash_attn", batch, decode_meta(batch))
        assert [c["kind"] for c in fake_flash.calls] == ["kvcache"]


@pytest.mark.parametrize("layer", ["gqa4_d128", "window", "alibi", "soft_cap"])
def test_flash_varlen_arguments(fake_flash, layer):
    spec = LAYERS[layer]
    batch = make_batch("mixed", spec, dtype=torch.bfloat16, block_size=FLASH_PAGE)
    _, cache = run_op("flash_attn", batch)
    (call,) = fake_flash.calls
    meta = batch.meta
    # kv_cache[0] / kv_cache[1] are passed as they are: flash-attn's paged layout, no copy.
    assert call["k"].data_ptr() == cache[0].data_ptr() and call["k"].shape == cache[0].shape
    assert call["v"].data_ptr() == cache[1].data_ptr() and call["v"].stride() == cache[1].stride()
    assert torch.equal(call["cu_seqlens_q"], meta.query_start_loc)
    expected_k = [0] + torch.cumsum(meta.seq_lens, 0).tolist()
    assert call["cu_seqlens_k"].dtype == torch.int32 and call["cu_seqlens_k"].tolist() == expected_k
    assert call["max_seqlen_q"] == max(meta.max_query_len, 2)
    assert call["max_seqlen_k"] == meta.block_table.shape[1] * FLASH_PAGE
    assert call["block_table"].dtype == torch.int32 and torch.equal(call["block_table"], meta.block_table)
    assert call["causal"] is True and call["softmax_scale"] == spec.softmax_scale
    assert call["window_size"] == flash_window(spec.sliding_window)
    assert call["window_size"] == ((7, 0) if layer == "window" else (-1, -1))
    assert call["softcap"] == (3.0 if layer == "soft_cap" else 0.0)
    if layer == "alibi":
        assert call["alibi_slopes"].dtype == torch.float32 and call["alibi_slopes"].tolist() == ALIBI4
    else:
        assert call["alibi_slopes"] is None


def test_flash_decode_arguments(fake_flash):
    spec = LAYERS["window"]
    batch = make_batch("large_decode", spec, dtype=torch.bfloat16, block_size=FLASH_PAGE)
    meta = decode_meta(batch)
    _, cache = run_op("flash_attn", batch, meta)
    (call,) = fake_flash.calls
    assert call["kind"] == "kvcache"
    assert call["q"].shape == (meta.num_seqs, 1, spec.num_heads, spec.head_size)
    assert torch.equal(call["cache_seqlens"], meta.seq_lens)
    assert call["new_k"] is None and call["new_v"] is None, "the store goes through slot_mapping, not flash's append"
    assert call["k"].data_ptr() == cache[0].data_ptr()
    assert call["window_size"] == (7, 0) and call["num_splits"] == 0
    # Sequence b's query is its token's row.
    starts = meta.query_start_loc[:-1].long()
    real = meta.query_start_loc[1:] > meta.query_start_loc[:-1]
    assert torch.equal(call["q"][real.nonzero()[:, 0], 0], batch.q[starts[real]])


@pytest.mark.parametrize("spec_name", DECODE_SPECS)
def test_flash_decode_layout_passes_q_as_is(fake_flash, spec_name):
    """A decode bucket's layout (token i in sequence i, padding sequences last): no gather/scatter."""
    batch = make_batch(spec_name, LAYERS["gqa4_d128"], dtype=torch.bfloat16, block_size=FLASH_PAGE,
                       pad_tokens=2, pad_seqs=2)
    meta = decode_meta(batch)
    assert batch.q.shape[0] == meta.num_seqs
    assert_matches_reference("flash_attn", batch, meta)
    (call,) = fake_flash.calls
    assert call["kind"] == "kvcache" and call["q"].data_ptr() == batch.q.data_ptr()


@pytest.mark.parametrize("feature", ["fp8_kv", "alibi_soft_cap"])
def test_flash_forward_refuses(fake_flash, feature):
    batch = make_batch("mixed", LAYERS[feature], dtype=torch.bfloat16, block_size=FLASH_PAGE)
    with pytest.raises(ValueError, match="flash_attn.*does not support"):
        run_op("flash_attn", batch)
    assert fake_flash.calls == []


def test_xformers_refuses_steps_over_its_launch_limit(fake_xformers, monkeypatch):
    batch = make_batch("mixed", LAYERS["gqa4_d128"], dtype=torch.bfloat16, block_size=64)
    # 24 tokens x 2 KV heads = 48 launch rows: over a limit of 40, a clear error before any launch.
    monkeypatch.setattr(XFormersBackend, "max_launch_rows", 40)
    with pytest.raises(ValueError, match="24 tokens x 2 KV heads .* keep steps to 20 tokens"):
        run_op("xformers", batch)
    assert fake_xformers.calls == []


@pytest.mark.parametrize("name", ["flash_attn", "xformers"])
def test_forward_refuses_unsupported_pages(fake_flash, fake_xformers, name):
    # A layer built without block_size passes selection; the cache's page size is checked at the call.
    batch = make_batch("mixed", LAYERS["gqa4_d128"], dtype=torch.bfloat16, block_size=16)
    with pytest.raises(ValueError, match=f"'{name}' cannot serve this call: block_size 16 is not supported"):
        run_op(name, batch)
    assert fake_flash.calls == [] and fake_xformers.calls == []


def _varlen_args(batch):
    meta = batch.meta
    cache = batch.kv_cache
    cu_k = torch.nn.functional.pad(torch.cumsum(meta.seq_lens, 0, dtype=torch.int32), (1, 0))
    return (batch.q, cache[0], cache[1], meta.query_start_loc, cu_k, meta.block_table, None, meta.max_query_len,
            meta.block_table.shape[1] * cache.shape[2], batch.spec.softmax_scale, -1, 0.0)


def test_flash_ops_opcheck(fake_flash):
    # No padding tokens: flash-attn leaves their rows unspecified, which no comparison can check.
    batch = make_batch("mixed", LAYERS["gqa4_d128"], dtype=torch.bfloat16, block_size=FLASH_PAGE, pad_tokens=0)
    torch.library.opcheck(torch.ops.compiled_attn.flash_attn_varlen_paged.default, _varlen_args(batch))
    meta, cache = batch.meta, batch.kv_cache
    q = batch.q[: meta.num_seqs]
    slopes = torch.tensor([0.5] * 8)
    torch.library.opcheck(torch.ops.compiled_attn.flash_attn_paged_decode.default,
                          (q, cache[0], cache[1], meta.seq_lens, meta.block_table, slopes, 0.1, 7, 0.0, 0))


def test_flash_op_compiles_fullgraph(fake_flash):
    torch._dynamo.reset()
    batch = make_batch("chunked_prefill", LAYERS["gqa4_d128"], dtype=torch.bfloat16, block_size=FLASH_PAGE,
                       pad_tokens=0)
    args = _varlen_args(batch)

    def f(q, k_cache, v_cache, cu_q, cu_k, table):
        out = torch.ops.compiled_attn.flash_attn_varlen_paged(q, k_cache, v_cache, cu_q, cu_k, table, *args[6:])
        return out.float().sum(-1) * 2

    expected = f(*args[:6])
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(*args[:6])
    torch.testing.assert_close(got, expected)


# ---------------------------------------------------------------------------------------------
# CPU: the xformers adapter against the stand-in


def xformers_cpu_cases():
    cases = []
    for spec_name in BATCH_SPECS:
        for layer in ("gqa4_d128", "window"):
            cases.append((spec_name, layer, torch.bfloat16, 64))
    cases += [("mixed", "mqa_d64", torch.float16, 128), ("chunked_prefill", "window", torch.float16, 128)]
    return cases


@pytest.mark.parametrize("spec_name,layer,dtype,page", xformers_cpu_cases())
def test_xformers_adapter_matches_reference(fake_xformers, spec_name, layer, dtype, page):
    batch = make_batch(spec_name, LAYERS[layer], dtype=dtype, block_size=page, seed=len(spec_name) * 3 + page)
    assert_matches_reference("xformers", batch)
    assert len(fake_xformers.calls) == 1


@pytest.mark.parametrize("spec_name", DECODE_SPECS)
def test_xformers_decode_layout(fake_xformers, spec_name):
    """A decode bucket's layout reads the block table as it is: row t is sequence t."""
    batch = make_batch(spec_name, LAYERS["window"], dtype=torch.bfloat16, block_size=64, pad_tokens=2, pad_seqs=2)
    meta = decode_meta(batch)
    assert_matches_reference("xformers", batch, meta)
    (call,) = fake_xformers.calls
    mask = call["attn_bias"]
    assert torch.equal(mask.block_tables, meta.block_table)
    assert mask.k_seqinfo.seqlen.tolist() == meta.seq_lens.tolist()


def test_xformers_mask_arguments(fake_xformers):
    spec = LAYERS["window"]
    batch = make_batch("chunked_prefill", spec, dtype=torch.bfloat16, block_size=64)
    _, cache = run_op("xformers", batch)
    (call,) = fake_xformers.calls
    meta = batch.meta
    num_tokens = batch.q.shape[0]
    # GQA through BMGHK: query [1, T, KVH, group, D]; K/V a free view of the cache with stride-0 heads.
    assert call["query"].shape == (1, num_tokens, spec.num_kv_heads, spec.gqa_ratio, spec.head_size)
    assert call["key"].data_ptr() == cache[0].data_ptr() and call["value"].data_ptr() == cache[1].data_ptr()
    assert call["key"].stride(3) == 0 and call["scale"] == spec.softmax_scale
    mask = call["attn_bias"]
    assert mask.page_size == 64
    # Token t of sequence s at position p: block-table row of s, keys [max(0, p + 1 - w), p + 1).
    starts = meta.query_start_loc.tolist()
    expected_rows, expected_start, expected_end = [], [], []
    for s, (q_len, seq_len) in enumerate(zip(*BATCH_SPECS["chunked_prefill"])):
        for i in range(q_len):
            p = seq_len - q_len + i
            expected_rows.append(meta.block_table[s])
            expected_start.append(max(0, p + 1 - spec.sliding_window))
            expected_end.append(p + 1)
    n = batch.num_real_tokens
    assert n == starts[-1]
    assert torch.equal(mask.block_tables[:n], torch.stack(expected_rows))
    assert mask.k_seqinfo.seqstart[:n].tolist() == expected_start
    assert mask.k_seqinfo.seqlen[:n].tolist() == expected_end
    assert mask.k_seqinfo.seqlen[n:].tolist() == [0] * (num_tokens - n), "padding tokens see no key"
    assert mask.k_seqinfo.seqstart[n:num_tokens].tolist() == [0] * (num_tokens - n)


@pytest.mark.parametrize("feature", ["alibi", "soft_cap", "fp8_kv"])
def test_xformers_forward_refuses(fake_xformers, feature):
    batch = make_batch("mixed", LAYERS[feature], dtype=torch.bfloat16, block_size=64)
    with pytest.raises(ValueError, match="xformers.*does not support"):
        run_op("xformers", batch)
    assert fake_xformers.calls == []


def test_xformers_op_opcheck_and_compile(fake_xformers):
    torch._dynamo.reset()
    batch = make_batch("spec_decode", LAYERS["gqa4_d128"], dtype=torch.bfloat16, block_size=64)
    t = batch.q.shape[0]
    rows = batch.meta.block_table[torch.zeros(t, dtype=torch.long)]
    start = torch.zeros(t, dtype=torch.int32)
    end = torch.full((t,), 3, dtype=torch.int32)
    args = (batch.q, batch.kv_cache[0], batch.kv_cache[1], rows, start, end, 0.125)
    torch.library.opcheck(torch.ops.compiled_attn.xformers_paged_rows.default, args)

    def f(q, k_cache, v_cache, rows, start, end):
        return torch.ops.compiled_attn.xformers_paged_rows(q, k_cache, v_cache, rows, start, end, 0.125) + 1

    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="aot_eager")(*args[:6]), f(*args[:6]))


_REAL_XFORMERS_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from xformers.ops.fmha import triton_splitk
    from xformers.ops.fmha.common import Inputs
    # Interpreter only: let the CUDA-only op accept CPU tensors (bypasses its device check).
    triton_splitk.FwOp.SUPPORTED_DEVICES = {"cuda", "cpu"}
    sys.path.insert(0, "tests")
    import compiled_attn as ca
    from compiled_attn.backends.xformers import build_paged_rows_mask
    from test_flash_xformers import LAYERS, assert_matches_reference
    from batches import make_batch
    results = []
    for spec_name, layer, page in [("mixed", "window", 64), ("spec_decode", "mqa_d64", 128)]:
        batch = make_batch(spec_name, LAYERS[layer], dtype=torch.float16, block_size=page, seed=5)
        assert_matches_reference("xformers", batch)
        results.append([spec_name, layer, page])
    # The real dataclasses accept our fields, and the op finds nothing wrong but the device.
    table = torch.zeros(3, 2, dtype=torch.int32)
    mask = build_paged_rows_mask(table, torch.zeros(3, dtype=torch.int32), torch.ones(3, dtype=torch.int32), 64)
    q = torch.zeros(1, 3, 1, 2, 64, dtype=torch.float16)
    k = torch.zeros(1, 128, 1, 1, 64, dtype=torch.float16).expand(1, 128, 1, 2, 64)
    reasons = triton_splitk.FwOp.not_supported_reasons(Inputs(query=q, key=k, value=k, attn_bias=mask, scale=0.1))
    print(json.dumps({"results": results, "reasons": reasons}))
""")


@pytest.mark.skipif(importlib.util.find_spec("xformers") is None, reason="xformers is not installed")
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_real_xformers_kernel_under_triton_interpreter():
    """The real xFormers split-K kernel, run by the Triton interpreter on CPU, on our mask."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", _REAL_XFORMERS_SCRIPT], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(report["results"]) == 2
    assert report["reasons"] == []


# ---------------------------------------------------------------------------------------------
# GPU: the real packages


@pytest.fixture
def flash_package():
    return pytest.importorskip("flash_attn", reason="flash-attn is not installed on this machine")


@pytest.fixture
def xformers_package(monkeypatch):
    pytest.importorskip("xformers.ops.fmha", reason="xformers is not installed on this machine")
    common = importlib.import_module("xformers.ops.fmha.common")
    # Test harness only: where xformers' compiled extension does not match the installed torch it
    # disables every CUDA op; its Triton split-K op needs no extension and works once re-enabled.
    monkeypatch.setattr(common, "_built_with_cuda", True)
    return importlib.import_module("xformers")


def _gpu_package(name, request):
    request.getfixturevalue("flash_package" if name == "flash_attn" else "xformers_package")


def gpu_cases():
    cases = []
    for spec_name in BATCH_SPECS:
        for layer in LAYERS:
            cases.append(("flash_attn", spec_name, layer, torch.bfloat16, FLASH_PAGE))
            cases.append(("xformers", spec_name, layer, torch.bfloat16, 64))
    for spec_name in ("mixed", "large_decode"):
        cases.append(("flash_attn", spec_name, "gqa4_d128", torch.float16, 512))
        cases.append(("xformers", spec_name, "gqa4_d128", torch.float16, 128))
        cases.append(("xformers", spec_name, "window", torch.bfloat16, 128))
    return cases


@pytest.mark.gpu
@pytest.mark.parametrize("name,spec_name,layer,dtype,page", gpu_cases())
def test_gpu_matches_reference(request, name, spec_name, layer, dtype, page):
    _gpu_package(name, request)
    spec = LAYERS[layer]
    backend = BACKEND_CLASSES[name]
    reason = backend.supports(spec, device="cuda", dtype=dtype, block_size=page)
    if reason is not None:
        with pytest.raises(ValueError, match=name) as refused:
            ca.Attention(spec, backend=name, device="cuda", dtype=dtype, block_size=page)
        assert reason in str(refused.value)
        return
    seed = len(spec_name) * 11 + len(layer)
    batch = make_batch(spec_name, spec, dtype=dtype, block_size=page, seed=seed, device="cuda")
    assert_matches_reference(name, batch)
    if spec_name in DECODE_SPECS:
        assert_matches_reference(name, batch, decode_meta(batch))


GPU_GRAPH_CASES = [("flash_attn", "mixed", FLASH_PAGE, False), ("flash_attn", "large_decode", FLASH_PAGE, True),
                   ("xformers", "mixed", 64, False), ("xformers", "large_decode", 128, True)]


@pytest.mark.gpu
@pytest.mark.parametrize("name,spec_name,page,decode_bucket", GPU_GRAPH_CASES)
def test_gpu_attention_layer_compiles_fullgraph(request, name, spec_name, page, decode_bucket):
    _gpu_package(name, request)
    torch._dynamo.reset()
    spec = LAYERS["window"]
    batch = make_batch(spec_name, spec, dtype=torch.bfloat16, block_size=page, seed=3, device="cuda")
    meta = decode_meta(batch) if decode_bucket else batch.meta
    attn = ca.Attention(spec, backend=name, device="cuda", dtype=torch.bfloat16, block_size=page)

    def step(q, k, v, cache, meta):
        return attn(q * 1.0, k, v, cache, meta).float() * 2.0

    cache = batch.kv_cache.clone()
    got = torch.compile(step, fullgraph=True)(batch.q, batch.k, batch.v, cache, meta)
    ref_out, ref_cache = run_op("reference", batch)
    n = batch.num_real_tokens
    assert rel_error(got[:n] / 2.0, ref_out[:n]) <= TOLERANCE[torch.bfloat16]
    assert torch.all(got[n:] == 0)
    assert torch.equal(cache.view(torch.uint8), ref_cache.view(torch.uint8))


@pytest.mark.gpu
@pytest.mark.parametrize("name,spec_name,page,decode_bucket", GPU_GRAPH_CASES)
def test_gpu_cuda_graph_replay_with_new_data(request, name, spec_name, page, decode_bucket):
    _gpu_package(name, request)
    spec = LAYERS["gqa4_d128"]
    first = make_batch(spec_name, spec, dtype=torch.bfloat16, block_size=page, seed=1, device="cuda")
    second = make_batch(spec_name, spec, dtype=torch.bfloat16, block_size=page, seed=2, device="cuda")
    pick_meta = decode_meta if decode_bucket else (lambda b: b.meta)
    attn = ca.Attention(spec, backend=name, device="cuda", dtype=torch.bfloat16, block_size=page)
    # Static buffers, filled with the first batch; the graph is captured once.
    q, k, v, cache = (t.clone() for t in (first.q, first.k, first.v, first.kv_cache))
    fields = ("query_start_loc", "seq_lens", "block_table", "slot_mapping")
    meta = dataclasses.replace(pick_meta(first), **{f: getattr(first.meta, f).clone() for f in fields})
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up outside capture (Triton JIT, workspace allocation)
            attn(q, k, v, cache, meta)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attn(q, k, v, cache, meta)
    for batch in (second, first):
        for static, new in ((q, batch.q), (k, batch.k), (v, batch.v), (cache, batch.kv_cache)):
            static.copy_(new)
        for field in fields:
            getattr(meta, field).copy_(getattr(batch.meta, field))
        graph.replay()
        torch.cuda.synchronize()
        ref_out, ref_cache = run_op("reference", batch)
        n = batch.num_real_tokens
        assert rel_error(out[:n], ref_out[:n]) <= TOLERANCE[torch.bfloat16]
        assert torch.all(out[n:] == 0)
        assert torch.equal(cache.view(torch.uint8), ref_cache.view(torch.uint8))
        assert torch.all(cache[:, ~batch.used_blocks].float() == POISON)
