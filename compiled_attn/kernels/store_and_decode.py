"""store_and_decode: one kernel stores each decode token's K/V and computes its attention
(TensorRT-LLM style: the cache append fused into the decode kernel).

Decode only: one new token per sequence, token ``b`` is sequence ``b`` (T == B), at position
``seq_lens[b] - 1``. Grid ``(B * num_kv_heads, 1, num_splits)``, a sequence's KV heads on
consecutive programs (``HEADS_FIRST``, as in :mod:`~compiled_attn.kernels.paged_attention`); a
program's tile is the ``G`` query heads of one KV head (GQA). The program of split 0 stores the
token's K/V (quantised for fp8) and seeds its softmax with the new key straight from registers;
every program reads only positions ``< seq_len - 1`` from the cache, so no program waits for the
store. Loads that do not depend on ``seq_len`` (q, the new K/V, the slot) are issued with it, so
the only chain of dependent reads is seq_len -> block table -> K/V. With more than one split the
partials are merged as in :mod:`~compiled_attn.kernels.paged_attention` (by the
last program of a tile, or by a reduction launch for many splits). Padding sequences
(``seq_len == 0``) store nothing and get zeros.

Exposed as ``torch.ops.compiled_attn.store_and_decode`` — one schema, so another implementation
(a fused CUDA kernel) can be registered behind it for a device with ``register_kernel``.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from . import _jit
from .paged_attention import (
    LOG2E,
    _attend_range,
    _launch_next_kernel,
    _program_tile,
    _query_for_dot,
    _score_params,
    _split_tiles,
    _store_result,
    _tanh,
    _wait_for_previous_kernel,
    attention_grid,
    check_attention_args,
    check_scale,
    choose_num_splits,
    kernel_constexprs,
    launch_constexprs,
    launch_planned,
    num_sms,
    offsets_fit_int32,
    short_split_tile_n,
    split_workspace,
    tile_config,
)
from .store_kv import FP8_E4M3_MAX, _round_to_e4m3, check_store_args


@triton.jit
def _store_and_decode_kernel(
    q_ptr, k_ptr, v_ptr, cache_ptr, seq_lens_ptr, block_table_ptr, slot_ptr, out_ptr,
    k_scale_ptr, v_scale_ptr, slopes_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, sem_ptr,
    num_tokens, scale, window, softcap,
    s_qt, s_qh, s_qd, s_kt, s_kh, s_kd, s_vt, s_vh, s_vd, s_ot, s_oh, s_od,
    s_ckv, s_cb, s_cs, s_ch, s_cd, s_bt,
    G: tl.constexpr, NUM_HEADS: tl.constexpr, HEAD: tl.constexpr, HEAD_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, TILE_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    FUSED_REDUCE: tl.constexpr, USE_WINDOW: tl.constexpr, USE_ALIBI: tl.constexpr, USE_SOFTCAP: tl.constexpr,
    IS_FP8: tl.constexpr, FP8_MAX: tl.constexpr, ROUND_FP8: tl.constexpr, DOT_FP32: tl.constexpr,
    FP8_DOT_FP16: tl.constexpr, MERGE_CHUNK: tl.constexpr, ONE_KEY_LOOP: tl.constexpr, USE_GDC: tl.constexpr,
    EARLY_LAUNCH_NEXT: tl.constexpr, HEADS_FIRST: tl.constexpr, INT32_OFFSETS: tl.constexpr,
):
    _wait_for_previous_kernel(USE_GDC, EARLY_LAUNCH_NEXT)
    b, kvh, _ = _program_tile(NUM_HEADS // G, HEADS_FIRST)
    b = b.to(tl.int64)
    split = tl.program_id(2)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_PAD)
    d_ok = offs_d < HEAD
    head = kvh * G + offs_m
    row_valid = offs_m < G
    # Every load that does not need seq_len is issued with it, so their latencies overlap: the
    # critical path is seq_len -> block table -> K/V. (A padding sequence reads its padding row.)
    seq_len = tl.load(seq_lens_ptr + b)
    q = tl.load(q_ptr + b * s_qt + head[:, None] * s_qh + offs_d[None, :] * s_qd,
                mask=row_valid[:, None] & d_ok[None, :], other=0.0)
    k_new = tl.load(k_ptr + b * s_kt + kvh * s_kh + offs_d * s_kd, mask=d_ok, other=0.0)
    v_new = tl.load(v_ptr + b * s_vt + kvh * s_vh + offs_d * s_vd, mask=d_ok, other=0.0)
    slot = tl.load(slot_ptr + b).to(tl.int64)
    k_scale, v_scale = 1.0, 1.0
    if IS_FP8:
        k_scale = tl.load(k_scale_ptr).to(tl.float32)
        v_scale = tl.load(v_scale_ptr).to(tl.float32)
    if seq_len <= 0:
        if ((NUM_SPLITS == 1) or FUSED_REDUCE) and split == 0:  # else the reduction launch writes zeros
            dst = out_ptr + b * s_ot + head[:, None] * s_oh + offs_d[None, :] * s_od
            zeros = tl.zeros([BLOCK_M, HEAD_PAD], dtype=out_ptr.dtype.element_ty)
            tl.store(dst, zeros, mask=row_valid[:, None] & d_ok[None, :])
        return

    # The new token's K/V as the cache will hold them; split 0 stores them.
    if IS_FP8:
        k_new = tl.math.div_rn(k_new.to(tl.float32), k_scale)
        v_new = tl.math.div_rn(v_new.to(tl.float32), v_scale)
        k_new = tl.minimum(tl.maximum(k_new, -FP8_MAX), FP8_MAX)
        v_new = tl.minimum(tl.maximum(v_new, -FP8_MAX), FP8_MAX)
        if ROUND_FP8:  # interpreter: see store_kv._round_to_e4m3
            k_new = _round_to_e4m3(k_new)
            v_new = _round_to_e4m3(v_new)
    k_new = k_new.to(cache_ptr.dtype.element_ty)
    v_new = v_new.to(cache_ptr.dtype.element_ty)
    if (split == 0) & (slot >= 0):
        dst = cache_ptr + (slot // BLOCK_SIZE) * s_cb + (slot % BLOCK_SIZE) * s_cs + kvh * s_ch + offs_d * s_cd
        tl.store(dst, k_new, mask=d_ok)
        tl.store(dst + s_ckv, v_new, mask=d_ok)

    q = _query_for_dot(q, IS_FP8, DOT_FP32, FP8_DOT_FP16)
    qk_scale, softcap, slopes = _score_params(scale, softcap, k_scale_ptr, slopes_ptr, head, row_valid,
                                              BLOCK_M, IS_FP8, USE_ALIBI)

    # Split 0 starts from the new key (position pos, ALiBi bias 0, always visible).
    pos = seq_len - 1
    s_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], axis=1) * qk_scale
    if USE_SOFTCAP:
        s_new = softcap * _tanh(s_new / softcap)
    s_new = s_new * LOG2E  # the softmax state is in log2 units (see _attend_tile)
    seeded = row_valid & (split == 0)
    m_i = tl.where(seeded, s_new, float("-inf"))
    l_i = tl.where(seeded, 1.0, 0.0)
    acc = tl.where(seeded[:, None], v_new.to(tl.float32)[None, :], 0.0)

    # Cached keys [key_start, pos), split evenly by tiles.
    key_start = 0
    if USE_WINDOW:
        key_start = tl.maximum(pos - window + 1, 0)
    first_tile, last_tile = _split_tiles(key_start // TILE_N, tl.cdiv(pos, TILE_N), split, NUM_SPLITS)
    q_pos = tl.full([BLOCK_M], 0, dtype=tl.int32) + pos
    bt_row_ptr = block_table_ptr + b * s_bt
    # Every cached key is before the query (as if the first query sat at pos - 1): only the tile
    # holding key pos - 1 needs bounds.
    acc, m_i, l_i = _attend_range(
        acc, m_i, l_i, q, cache_ptr, bt_row_ptr, kvh, first_tile, last_tile, pos - 1, pos, q_pos,
        slopes, qk_scale, window, softcap, s_ckv, s_cb, s_cs, s_ch, s_cd,
        HEAD, HEAD_PAD, BLOCK_SIZE, TILE_N, USE_WINDOW, USE_ALIBI, USE_SOFTCAP, DOT_FP32, ONE_KEY_LOOP,
        INT32_OFFSETS,
    )
    if not EARLY_LAUNCH_NEXT:
        _launch_next_kernel(USE_GDC)
    if IS_FP8:
        acc = acc * v_scale
    tok = tl.full([BLOCK_M], 0, dtype=tl.int64) + b
    _store_result(
        acc, m_i, l_i, out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, sem_ptr, b * (NUM_HEADS // G) + kvh,
        tok, head, row_valid, split, num_tokens, s_ot, s_oh, s_od, NUM_HEADS, HEAD, HEAD_PAD, NUM_SPLITS,
        FUSED_REDUCE, BLOCK_M, MERGE_CHUNK,
    )


def _check(q, k, v, kv_cache, seq_lens, block_table, slot_mapping, out) -> None:
    query_start_loc = seq_lens.new_empty(seq_lens.shape[0] + 1)  # shape-only stand-in for the checks
    check_attention_args(q, kv_cache, query_start_loc, seq_lens, block_table, out)
    check_store_args(k, v, kv_cache, slot_mapping)
    if q.shape[0] != seq_lens.shape[0]:
        raise ValueError(f"store_and_decode takes one token per sequence: q has {q.shape[0]} tokens for "
                         f"{seq_lens.shape[0]} sequences; use paged_attention for prefill or spec-decode")


def _launch_plan(q, k, v, kv_cache, seq_lens, block_table, slot_mapping, out, *, scale, sliding_window,
                 logits_soft_cap, alibi_slopes, k_scale, v_scale, num_splits, tile_n):
    check_scale(scale)
    num_seqs, num_heads, head_size = q.shape
    _, _, block_size, kv_heads, _ = kv_cache.shape
    group = num_heads // kv_heads
    interpret = _jit.interpreting() or q.device.type != "cuda"
    fp8 = kv_cache.dtype == torch.float8_e4m3fn
    block_m, _, default_tile_n, num_warps, num_stages = tile_config(
        num_queries_per_kv=group, head_size=head_size, max_query_len=1, interpret=interpret, fp8=fp8)
    max_context = block_table.shape[1] * block_size
    if not num_splits:
        num_splits = choose_num_splits(
            num_query_blocks=num_seqs, num_kv_heads=kv_heads, max_context=max_context,
            max_query_len=1, num_sms=num_sms(q.device), fp8=fp8, group=group)
    tile_n = tile_n or short_split_tile_n(default_tile_n, max_context=max_context, num_splits=num_splits,
                                          max_query_len=1, fp8=fp8, block_size=block_size)
    # The reduction reads validity from seq_lens (padding sequences have length 0), so its
    # query_start_loc argument is a placeholder.
    launch = launch_constexprs(q)
    scratch, reduce_launch = split_workspace(
        q, out, seq_lens, seq_lens, num_splits=num_splits, num_rows=num_seqs, tiles=num_seqs * kv_heads,
        block_m=block_m, placeholder=k_scale, valid_from_seq_lens=True, launch=launch, kernel="store_and_decode")
    args = (
        q, k, v, kv_cache, seq_lens, block_table, slot_mapping, out, k_scale, v_scale,
        alibi_slopes if alibi_slopes is not None else k_scale, *scratch,
        num_seqs, float(scale), int(sliding_window or 0), float(logits_soft_cap or 0.0),
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *kv_cache.stride(), block_table.stride(0),
    )
    constexprs = dict(
        kernel_constexprs(
            group=group, num_heads=num_heads, head_size=head_size, block_size=block_size, block_m=block_m,
            tile_n=tile_n, num_splits=num_splits, fused_reduce=num_splits > 1 and reduce_launch is None,
            max_context=max_context, max_query_len=1, fp8=fp8, dot_fp32=interpret or q.dtype == torch.float32,
            window=bool(sliding_window), int32_offsets=offsets_fit_int32(kv_cache), alibi=alibi_slopes is not None,
            softcap=bool(logits_soft_cap), kernel="store_and_decode"),
        FP8_MAX=FP8_E4M3_MAX, ROUND_FP8=interpret, num_warps=num_warps, num_stages=num_stages, **launch,
    )
    grid = attention_grid(num_seqs, kv_heads, num_splits, constexprs["HEADS_FIRST"])
    return (grid, args, constexprs), reduce_launch


def store_and_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    slot_mapping: torch.Tensor,
    out: torch.Tensor,
    *,
    scale: float,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    k_scale: torch.Tensor,
    v_scale: torch.Tensor,
    num_splits: int | None = None,
    tile_n: int | None = None,
) -> torch.Tensor:
    """Store one decode token per sequence and write its attention into ``out``.

    q/out ``[B, H, D]``, k/v ``[B, KVH, D]``, kv_cache ``[2, num_blocks, block_size, KVH, D]``,
    seq_lens ``[B]`` int32 (context including the new token; 0 = padding), block_table
    ``[B, max_blocks]`` int32, slot_mapping ``[B]`` int64 (the new token's slot, -1 = don't store).

    Equivalent PyTorch code: :func:`store_and_decode_reference`.

    >>> seq_lens = torch.tensor([5, 17], dtype=torch.int32, device="cuda")  # doctest: +SKIP
    >>> block_table = torch.tensor([[0, 0], [2, 1]], dtype=torch.int32, device="cuda")  # doctest: +SKIP
    >>> slots = torch.tensor([4, 16], device="cuda")  # doctest: +SKIP
    >>> q = torch.randn(2, 8, 128, device="cuda", dtype=torch.bfloat16)  # doctest: +SKIP
    >>> k = v = torch.randn(2, 2, 128, device="cuda", dtype=torch.bfloat16)  # doctest: +SKIP
    >>> cache = torch.zeros(2, 3, 16, 2, 128, device="cuda", dtype=torch.bfloat16)  # doctest: +SKIP
    >>> one = torch.ones((), device="cuda")  # doctest: +SKIP
    >>> out = store_and_decode(q, k, v, cache, seq_lens, block_table, slots, torch.empty_like(q),  # doctest: +SKIP
    ...                        scale=128 ** -0.5, k_scale=one, v_scale=one)
    """
    _check(q, k, v, kv_cache, seq_lens, block_table, slot_mapping, out)
    if q.shape[0] == 0:
        return out
    attn, reduce = _launch_plan(
        q, k, v, kv_cache, seq_lens, block_table, slot_mapping, out, scale=scale, sliding_window=sliding_window,
        logits_soft_cap=logits_soft_cap, alibi_slopes=alibi_slopes, k_scale=k_scale, v_scale=v_scale,
        num_splits=num_splits, tile_n=tile_n)
    with _jit.launching(globals()):
        launch_planned(_store_and_decode_kernel, attn, reduce)
    return out


def store_and_decode_reference(
    q, k, v, kv_cache, seq_lens, block_table, slot_mapping, out=None, *, scale, sliding_window=None,
    logits_soft_cap=None, alibi_slopes=None, k_scale, v_scale, **_ignored,
) -> torch.Tensor:
    """store_kv, then the reference backend's attention with one query per sequence."""
    from ..backends.paged_torch import store_kv as torch_store_kv
    from ..backends.reference import reference_attention
    from ..metadata import AttentionMetadata

    torch_store_kv(k, v, kv_cache, slot_mapping, k_scale, v_scale)
    num_seqs = seq_lens.shape[0]
    starts = torch.arange(num_seqs + 1, dtype=torch.int32, device=q.device)
    meta = AttentionMetadata(starts, seq_lens, block_table, slot_mapping, 1)
    result = reference_attention(
        q, kv_cache, meta, scale=scale, sliding_window=sliding_window, logits_soft_cap=logits_soft_cap,
        alibi_slopes=alibi_slopes, k_scale=k_scale, v_scale=v_scale).to(q.dtype)
    if out is not None:
        out.copy_(result)
        return out
    return result


# ---- op registration (see store_kv.py for the CUDA / interpreter split) ---------------------


@torch.library.custom_op("compiled_attn::_triton_store_and_decode_opaque", mutates_args=("kv_cache", "out"))
def _store_and_decode_opaque(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, seq_lens: torch.Tensor,
    block_table: torch.Tensor, slot_mapping: torch.Tensor, out: torch.Tensor, k_scale: torch.Tensor,
    v_scale: torch.Tensor, alibi_slopes: torch.Tensor | None, scale: float, sliding_window: int,
    logits_soft_cap: float,
) -> None:
    store_and_decode(
        q, k, v, kv_cache, seq_lens, block_table, slot_mapping, out, scale=scale, sliding_window=sliding_window,
        logits_soft_cap=logits_soft_cap, alibi_slopes=alibi_slopes, k_scale=k_scale, v_scale=v_scale)


@_store_and_decode_opaque.register_fake
def _(q, k, v, kv_cache, seq_lens, block_table, slot_mapping, out, k_scale, v_scale, alibi_slopes, scale,
      sliding_window, logits_soft_cap) -> None:
    return None


@torch.library.triton_op("compiled_attn::store_and_decode", mutates_args=("kv_cache", "out"))
def store_and_decode_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, seq_lens: torch.Tensor,
    block_table: torch.Tensor, slot_mapping: torch.Tensor, out: torch.Tensor, k_scale: torch.Tensor,
    v_scale: torch.Tensor, alibi_slopes: torch.Tensor | None, scale: float, sliding_window: int,
    logits_soft_cap: float,
) -> None:
    """``torch.ops.compiled_attn.store_and_decode`` (0 = no window / no soft-cap).

    Another implementation registered for a device with ``torch.library.register_kernel``
    replaces the Triton one there, in eager calls and (traced like any PyTorch code) under
    ``torch.compile``, where this function is what the compiler decomposes the op into.
    """
    override = _registered_kernel(q.device.type)
    if override is not None:
        override(q, k, v, kv_cache, seq_lens, block_table, slot_mapping, out, k_scale, v_scale, alibi_slopes,
                 scale, sliding_window, logits_soft_cap)
        return
    _check(q, k, v, kv_cache, seq_lens, block_table, slot_mapping, out)
    if q.device.type != "cuda" or _jit.interpreting() or q.shape[0] == 0:
        torch.ops.compiled_attn._triton_store_and_decode_opaque(
            q, k, v, kv_cache, seq_lens, block_table, slot_mapping, out, k_scale, v_scale, alibi_slopes, scale,
            sliding_window, logits_soft_cap)
        return
    _jit.refresh(globals())
    attn, reduce = _launch_plan(
        q, k, v, kv_cache, seq_lens, block_table, slot_mapping, out, scale=scale, sliding_window=sliding_window,
        logits_soft_cap=logits_soft_cap, alibi_slopes=alibi_slopes, k_scale=k_scale, v_scale=v_scale,
        num_splits=None, tile_n=None)
    launch_planned(_store_and_decode_kernel, attn, reduce, torch.library.wrap_triton)


def _registered_kernel(device_type: str):
    """The enabled ``register_kernel`` implementation of the op for ``device_type``, if any."""
    kernels = getattr(store_and_decode_op, "_backend_fns", {})
    disabled = getattr(store_and_decode_op, "_disabled_kernel", set())
    return kernels.get(device_type) if device_type not in disabled else None
