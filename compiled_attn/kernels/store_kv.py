"""store_kv: write the step's new K/V into the paged cache through ``slot_mapping``.

One program per new token stores all of its KV heads for K and V; a token whose slot is -1
(padding) stores nothing. fp8 caches get ``clamp(x / scale, ±448)`` rounded to e4m3.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _jit
from .paged_attention import _wait_for_previous_kernel, launch_constexprs

FP8_E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
STORE_KV_NUM_WARPS = 4  # one token's [KVH, D] tile is at most a few KiB: 4 warps are plenty


@triton.jit
def _round_to_e4m3(x):
    """Round fp32 ``x`` (|x| <= 448) to the nearest e4m3 value, ties to even, staying in fp32.

    Only for the interpreter, whose fp32 -> fp8 cast drops the carry of a rounded-up mantissa
    (7.6 becomes 4.0); the cast of an already representable value is exact there and on GPU.
    """
    a = tl.abs(x)
    bits = a.to(tl.int32, bitcast=True)
    # Normal range: keep 3 of fp32's 23 mantissa bits, round half to even; a carry moves the exponent.
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
    # Subnormal range (|x| < 2**-6): multiples of 2**-9; fp32 addition rounds half to even.
    subnormal = (a + 16384.0) - 16384.0
    r = tl.where(a < 0.015625, subnormal, normal)
    sign = x.to(tl.int32, bitcast=True) & -2147483648
    return (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _stored_by_attention(t, query_start_loc_ptr, seq_lens_ptr, num_seqs, CHUNK: tl.constexpr,
                         SHORT_QUERY_LEN: tl.constexpr):
    """Whether the prefill kernel that follows stores token ``t`` (``gluon_prefill.fuses_store``):
    it is in a sequence of over ``SHORT_QUERY_LEN`` new tokens and no cached prefix, in a
    ``CHUNK``-aligned run of keys all in the sequence."""
    lo = 0
    hi = num_seqs
    while lo < hi:  # the last sequence starting at or before t
        mid = (lo + hi) // 2
        if tl.load(query_start_loc_ptr + mid) <= t:
            lo = mid + 1
        else:
            hi = mid
    seq = lo - 1
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    prefix = seq_len - q_len
    pos = prefix + (t - q_start)
    chunk = pos - pos % CHUNK
    return (t < q_start + q_len) & (q_len > SHORT_QUERY_LEN) & (prefix == 0) & (chunk + CHUNK <= seq_len)


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, cache_ptr, slot_ptr, k_scale_ptr, v_scale_ptr, query_start_loc_ptr, seq_lens_ptr, num_seqs,
    s_kt, s_kh, s_kd, s_vt, s_vh, s_vd,
    s_ckv, s_cb, s_cs, s_ch, s_cd,
    KV_HEADS: tl.constexpr, HEAD: tl.constexpr, KV_HEADS_PAD: tl.constexpr, HEAD_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, IS_FP8: tl.constexpr, FP8_MAX: tl.constexpr, ROUND_FP8: tl.constexpr,
    SKIP_CHUNK: tl.constexpr, SHORT_QUERY_LEN: tl.constexpr, USE_GDC: tl.constexpr,
):
    _wait_for_previous_kernel(USE_GDC, True)
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    if SKIP_CHUNK:
        if _stored_by_attention(t.to(tl.int32), query_start_loc_ptr, seq_lens_ptr, num_seqs, SKIP_CHUNK,
                                SHORT_QUERY_LEN):
            return
    offs_h = tl.arange(0, KV_HEADS_PAD)
    offs_d = tl.arange(0, HEAD_PAD)
    mask = (offs_h < KV_HEADS)[:, None] & (offs_d < HEAD)[None, :]
    k = tl.load(k_ptr + t * s_kt + offs_h[:, None] * s_kh + offs_d[None, :] * s_kd, mask=mask, other=0.0)
    v = tl.load(v_ptr + t * s_vt + offs_h[:, None] * s_vh + offs_d[None, :] * s_vd, mask=mask, other=0.0)
    if IS_FP8:
        # Precise division (not x * (1/scale), not the approximate `/`) to round like torch.
        k = tl.math.div_rn(k.to(tl.float32), tl.load(k_scale_ptr).to(tl.float32))
        v = tl.math.div_rn(v.to(tl.float32), tl.load(v_scale_ptr).to(tl.float32))
        k = tl.minimum(tl.maximum(k, -FP8_MAX), FP8_MAX)
        v = tl.minimum(tl.maximum(v, -FP8_MAX), FP8_MAX)
        if ROUND_FP8:
            k = _round_to_e4m3(k)
            v = _round_to_e4m3(v)
    dst = cache_ptr + (slot // BLOCK_SIZE) * s_cb + (slot % BLOCK_SIZE) * s_cs
    dst = dst + offs_h[:, None] * s_ch + offs_d[None, :] * s_cd
    tl.store(dst, k.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + s_ckv, v.to(cache_ptr.dtype.element_ty), mask=mask)


def _launch_args(k, v, kv_cache, slot_mapping, k_scale, v_scale, skip_fused=None):
    """(grid, positional args, constexpr kwargs) of one store launch; shapes only, no data."""
    _, _, block_size, kv_heads, head_size = kv_cache.shape
    # Without skip_fused, placeholders that never change (no new specialisation as the batch does).
    query_start_loc, seq_lens, chunk, short_query_len = skip_fused or (slot_mapping, slot_mapping, 0, 0)
    args = (
        k, v, kv_cache, slot_mapping, k_scale, v_scale, query_start_loc, seq_lens,
        seq_lens.shape[0] if chunk else 0,
        *k.stride(), *v.stride(), *kv_cache.stride(),
    )
    constexprs = dict(
        KV_HEADS=kv_heads, HEAD=head_size, KV_HEADS_PAD=_jit.next_power_of_2(kv_heads),
        HEAD_PAD=_jit.next_power_of_2(head_size), BLOCK_SIZE=block_size,
        IS_FP8=kv_cache.dtype == torch.float8_e4m3fn, FP8_MAX=FP8_E4M3_MAX, num_warps=STORE_KV_NUM_WARPS,
        SKIP_CHUNK=chunk, SHORT_QUERY_LEN=short_query_len,
        ROUND_FP8=_jit.interpreting() or k.device.type != "cuda", **launch_constexprs(k),
    )
    return (k.shape[0],), args, constexprs


def check_store_args(k, v, kv_cache, slot_mapping) -> None:
    """Static (shape/dtype) checks with errors that name the fix; free under torch.compile."""
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError(f"kv_cache must be [2, num_blocks, block_size, kv_heads, head_size], got {tuple(kv_cache.shape)}")
    kv_shape = (slot_mapping.shape[0], *kv_cache.shape[3:])
    for name, t in (("k", k), ("v", v)):
        if tuple(t.shape) != kv_shape:
            raise ValueError(f"{name} must be {list(kv_shape)} (num_tokens, kv_heads, head_size), got {tuple(t.shape)}")
    if kv_cache.dtype not in (k.dtype, torch.float8_e4m3fn):
        raise ValueError(f"kv_cache dtype {kv_cache.dtype} must be k's dtype ({k.dtype}) or torch.float8_e4m3fn")
    if slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping must be int64 (or int32), got {slot_mapping.dtype}")


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor,
    v_scale: torch.Tensor,
    *,
    skip_fused: tuple | None = None,
) -> None:
    """Write ``k``/``v`` ``[T, KVH, D]`` into ``kv_cache`` ``[2, num_blocks, block_size, KVH, D]``.

    ``slot_mapping`` ``[T]`` int64 holds ``block * block_size + offset`` per token, -1 to skip.
    ``k_scale``/``v_scale`` are float32 scalar tensors, used when the cache is float8_e4m3fn.
    ``skip_fused`` ``(query_start_loc, seq_lens, chunk, short_query_len)`` skips the tokens that the
    prefill kernel launched next stores itself (``paged_attention.fused_store_plan``).

    Equivalent PyTorch code: :func:`store_kv_reference`.

    Examples need CUDA (or CPU tensors with ``TRITON_INTERPRET=1``):

    >>> cache = torch.zeros(2, 4, 16, 2, 64, device="cuda")  # doctest: +SKIP
    >>> k = v = torch.ones(3, 2, 64, device="cuda")  # doctest: +SKIP
    >>> one = torch.ones((), device="cuda")  # doctest: +SKIP
    >>> store_kv(k, v, cache, torch.tensor([17, -1, 3], device="cuda"), one, one)  # doctest: +SKIP
    """
    check_store_args(k, v, kv_cache, slot_mapping)
    if k.shape[0] == 0:
        return
    grid, args, constexprs = _launch_args(k, v, kv_cache, slot_mapping, k_scale, v_scale, skip_fused)
    with _jit.launching(globals()):
        _store_kv_kernel[grid](*args, **constexprs)


def store_kv_reference(k, v, kv_cache, slot_mapping, k_scale, v_scale) -> None:
    """The same store in plain PyTorch (the library's shared implementation)."""
    from ..backends.paged_torch import store_kv as torch_store_kv

    torch_store_kv(k, v, kv_cache, slot_mapping, k_scale, v_scale)


# ---- op registration -------------------------------------------------------------------------
# On CUDA a triton_op (torch.compile sees the kernel through wrap_triton). Elsewhere (the CPU
# interpreter, where wrap_triton cannot trace) the triton_op forwards to an opaque custom op.


@torch.library.custom_op("compiled_attn::_triton_store_kv_opaque", mutates_args=("kv_cache",))
def _store_kv_opaque(
    k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
    k_scale: torch.Tensor, v_scale: torch.Tensor,
) -> None:
    store_kv(k, v, kv_cache, slot_mapping, k_scale, v_scale)


@_store_kv_opaque.register_fake
def _(k, v, kv_cache, slot_mapping, k_scale, v_scale) -> None:
    return None


@torch.library.triton_op("compiled_attn::triton_store_kv", mutates_args=("kv_cache",))
def triton_store_kv(
    k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
    k_scale: torch.Tensor, v_scale: torch.Tensor,
) -> None:
    """``torch.ops.compiled_attn.triton_store_kv``: :func:`store_kv` as an operator."""
    check_store_args(k, v, kv_cache, slot_mapping)
    if k.device.type != "cuda" or _jit.interpreting() or k.shape[0] == 0:
        torch.ops.compiled_attn._triton_store_kv_opaque(k, v, kv_cache, slot_mapping, k_scale, v_scale)
        return
    _jit.refresh(globals())
    grid, args, constexprs = _launch_args(k, v, kv_cache, slot_mapping, k_scale, v_scale)
    torch.library.wrap_triton(_store_kv_kernel)[grid](*args, **constexprs)
