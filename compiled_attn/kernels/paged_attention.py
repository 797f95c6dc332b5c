"""Unified paged attention: prefill, prefix-prefill, chunked prefill, decode and spec-decode of a
flattened mixed batch in one launch (plus, for contexts split many ways, a reduction launch).

Grid (static: from T, B, KV heads and the split count, never from tensor values)::

    ((T // BLOCK_Q + B) * num_kv_heads,  1,  num_splits)

Axis 0 enumerates query blocks x KV heads, heads fastest (``HEADS_FIRST``; else the blocks on
axis 0 and the heads on axis 1). Sequence ``s`` owns blocks ``query_start_loc[s] // BLOCK_Q + s``
onward (one per ``BLOCK_Q`` of its new tokens), found by a binary search over
``query_start_loc`` inside the kernel; programs past a sequence's last block exit at once.
With ``LONGEST_FIRST`` the grid runs the blocks last to first, so the blocks that see the most
keys start first and the tail of the launch is short ones.
A program's tile packs ``BLOCK_Q`` query tokens × the ``G`` query heads of one KV head
(``BLOCK_M = BLOCK_Q * G`` rows, GQA), so every K/V tile is read once per KV group. It walks
the sequence's keys ``TILE_N`` at a time (each key row finds its cache block through the block
table), causal, optionally windowed, with an online softmax in fp32 (log2 units: ``exp2``
only). Tiles wholly below the causal diagonal run without bounds checks or masks; only the
diagonal tiles pay for them.

Split-KV (flash-decoding): when the batch is decode-like (``max_query_len`` small) and too small
to fill the GPU, axis 2 splits each query block's key range into ``num_splits`` equal parts;
each writes a partial (max, sum, acc). Where :func:`fuse_split_merge` says so, the last program of a
tile to finish merges them (a per-tile atomic counter, see :func:`split_counters`); otherwise,
or while ``torch.compile`` traces the triton_op, :func:`_reduce_splits_kernel` merges them in a
second launch. The split count comes from static shapes (batch, KV heads, block-table width)
and the SM count.

Programmatic dependent launch (sm_90+, ``PROGRAMMATIC_LAUNCH``): every kernel here may be launched
while the kernel before it on the stream is finishing; its programs wait for that kernel before
touching memory (:func:`_wait_for_previous_kernel`) and then, early or after their key loops, let
the next kernel launch. CUDA graphs keep these edges, so a replayed step loses less to launch gaps.

Precision: all softmax arithmetic is fp32. On GPU ``tl.dot`` takes fp16/bf16 tiles (fp32 tiles
with ``input_precision="ieee"`` for fp32 inputs) and accumulates in fp32. Under the Triton
interpreter every dot is fp32 (the interpreter's bf16 math is wrong). fp8 K/V are converted
exactly to fp16 and dotted with an fp16 copy of q (:func:`_query_for_dot`), and the scales are
folded into the scores (``k_scale``) and the output (``v_scale``).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..split_kv import compute_capability, num_sms, split_count
from . import _jit, gluon_prefill

# ---- tunables (not autotuned: one config per static shape keeps CUDA-graph capture simple) ----
# Values from benchmarks/tune_h100.json (H100, scripts/tune_kernels.py, graph-replayed).
# Query rows (tokens x heads of a group) per prefill program, one warpgroup: on sm_90 (Triton 3.6)
# 255 registers and 98.5 KB of shared memory, so two programs share an SM and each one's prologue,
# diagonal tile and epilogue overlap the other's key loop. 256 rows on two warpgroups (131 KB, one
# an SM) were slower on every prefill case: 3-6% on average at head size 128, 1-8% at 96, 13-17% at
# 64 (tune_h100.json "prefill_two_programs", "prefill_two_programs_heads").
PREFILL_BLOCK_M = 128
PREFILL_NUM_WARPS = 4
DECODE_MAX_BLOCK_M = 128  # spec-decode rows (query tokens x group) per program, at most
DECODE_BLOCK_M = 16  # smallest tl.dot M; decode rows are G heads of one token
TILE_N_GPU = 64  # keys per inner iteration on GPU (head_size <= 128), prefill-shaped steps
DECODE_TILE_N_GPU = 64  # the same for decode-shaped steps (max_query_len <= SPLIT_MAX_QUERY_LEN)
DECODE_TILE_N_GPU_FP8 = 128  # fp8 K/V: twice the keys for the same bytes per tile
# bf16/fp16 decode splits of one key tile over pages smaller than it (batch 1: 64 splits of 64 keys)
# walk it as two tiles of this many keys, which pipeline where one tile cannot (see short_split_tile_n).
SHORT_SPLIT_TILE_N = 32
# Decode of head_size 256, and prefill of 192/256 before Hopper: keeps the K/V tiles within
# registers and shared memory.
TILE_N_GPU_LARGE_HEAD = 32
# Decode of 192-wide heads (256-wide tiles, a quarter masked) in 64-key tiles: bf16 2-7% faster,
# fp8 6-12% (64x16384 1,564-1,606 -> 1,415-1,437 us); at head 256 they were mixed, -5% to +3%
# (H100, tune_h100.json "large_head_decode").
DECODE_TILE_N_HEAD_192 = 64
# Prefill of 192/256-wide heads on sm_90: 128 rows on two warpgroups in 64-key tiles (255 registers,
# 197 KB). On one warpgroup the 128x256 accumulator spilled 1,240 bytes a thread: 8x2048 at head 192
# 6,591 -> 1,280 us, 1x16384 50,000 -> 8,670, head 256 alike (H100, tune_h100.json "large_head_prefill").
PREFILL_NUM_WARPS_LARGE_HEAD = 8
PREFILL_TILE_N_LARGE_HEAD = 64
TILE_N_INTERPRETER = 32  # the interpreter pays per operation, not per element: larger tiles are cheaper
DECODE_NUM_WARPS = 4
DECODE_NUM_WARPS_FP8 = 4
NUM_STAGES = 3  # software pipelining depth of the key loop, prefill-shaped steps
# fp8 K/V: 2 (one K/V buffer); 3.5% faster than 3 on every prefill case (H100, two rounds:
# tune_h100.json "prefill_two_programs")
NUM_STAGES_FP8 = 2
DECODE_NUM_STAGES = 4  # the same for decode-shaped steps
DECODE_NUM_STAGES_FP8 = 5
SPLIT_MAX_QUERY_LEN = 8  # split the context only for decode / spec-decode buckets
SPLIT_TARGET_WAVES = 2  # flash-decoding: about 2 waves of resident programs (ragged batches gain most)
# No split shorter than this many keys. Small grids (batch 1, one-loop splits) were fastest with one
# 64-key tile a bf16 split (64 splits: 14.1 vs 14.4 us at 32) and two 128-key tiles an fp8 split
# (16 splits: 13.4 vs 14.0 us at 32); tune_h100.json "small_grid_splits". Larger batches reach
# their split count first.
SPLIT_MIN_KEYS, SPLIT_MIN_KEYS_FP8 = 64, 256
MAX_SPLITS = 64
# Decode programs an SM runs at once (Triton 3.6 on sm_90, 32-bit offsets: 96-154 registers for bf16
# K/V, 223-243 for fp8; tune_h100.json "int32_offsets". Capping bf16 at 96 registers for five was
# up to 8% slower: "decode_register_cap"). The split count targets waves of them (bf16: 8
# programs an SM, fp8: 4; fp8 at 8 was 7-10% slower at 32x4096 and 128x2048, 2% at 64x16384, and
# 2% faster on the ragged batch: tune_h100.json "fp8_split_waves"), and avoids part-empty last
# waves: bf16 32x4096 takes 4 splits, not 5 (196 vs 207 us).
DECODE_RESIDENT_PER_SM, DECODE_RESIDENT_PER_SM_FP8 = 4, 2
# Each split writes a partial of fp32 rows (query tokens x group) that the merge reads back. Where a
# KV head serves many query rows (MQA: 32) that traffic rivals the K/V itself at the wave target's
# split counts, so splits are capped where the partials would pass this share of the K/V bytes
# (0: no cap), though never below one program an SM. Only where the capped splits hold at least
# SPLIT_CAP_MIN_KEYS keys: grids of shorter splits are latency-bound (batch 1), and there more
# programs win whatever their partials cost (8 query heads a KV head, batch 1: 38 splits 10.1-10.3
# us against 64 splits 9.6). And only where the capped grid is one wave of resident programs: past
# that the wave target's count fills the last wave better (16 query heads a KV head, fp8 32x4096:
# 6 splits 47.7-48.1 us against 8 splits 42.7). And only where the step holds at least
# SPLIT_CAP_MIN_KEYS_PER_SM keys (a KV head's) an SM: smaller steps are latency-bound too, whatever
# their split lengths (H200, 4-token spec decode at 8 KV heads, 496 keys an SM: batch 2 of 4096
# capped 21.8-21.9 us against 20.5-20.8 uncapped, batch 1 of 8192 23.7-24.0 against 18.5-18.9; at
# 993 keys an SM, batch 8 of 2048, 31.5-32.1 -> 29.1-29.3; MQA 8x8192 24.9 -> 21.0 uncapped).
# MQA at 0.1 (H100): bf16 32x4096 44.3-44.8 -> 38.9-39.2 us, 128x2048 76.3-76.9 -> 62.6-63.0, fp8
# 58.3-59.2 -> 34.2-34.7 and 60.9-61.7 -> 42.4-43.9. tune_h100.json "mqa_splits",
# "split_partial_cap", "split_cap_reach", "split_cap_steps".
SPLIT_MAX_PARTIAL_SHARE = 0.1
SPLIT_CAP_MIN_KEYS = 256
SPLIT_CAP_MIN_KEYS_PER_SM = 768
# fp8 grids that splits of SPLIT_MIN_KEYS_FP8 leave with programs for under SMALL_GRID_FILL of the
# SMs (one KV head at batch 1: 16 programs) split as finely as bf16, in 64-key tiles where a split
# holds no more (SHORT_SPLIT_TILE_N_FP8): MQA batch 1 15.6-15.8 -> 6.9 us (tune_h100.json
# "fp8_min_keys"; 0: never).
SMALL_GRID_FILL = 0.5
SHORT_SPLIT_TILE_N_FP8 = 64
FP8_DOT_FP16 = True  # fp8 K/V: tile dots in fp16 (see _query_for_dot), not in q's bf16
FUSED_SPLIT_REDUCE = True  # the last split of a tile merges the partials (no reduction launch) ...
# ... up to this many splits, by kernel (an int: both). With programmatic launch, a reduction launch
# waiting beside a kernel that lets it launch early (store_and_decode) was slow where the SMs had
# room for it: fp8 batch-1 decode (16 splits) 15.2 us against 13.3 merged in the kernel. The unified
# kernel lets it launch after the key loop: 13.6 us launched against 16.5 merged (tune_h100.json
# "launch_next", bench_h100_page16_merge16.json).
FUSED_MAX_SPLITS = {"store_and_decode": 16, "paged_attention": 8}
FUSED_MERGE_ROWS = 64  # the merge loads [BLOCK_M, chunk, HEAD_PAD] partials with BLOCK_M * chunk <= this
# ... and only while the merging program reads at most this many partial rows (splits x BLOCK_M): one
# program reads them all, after its own split. MQA (32 rows a tile), 16 splits: 64x16384 241-265 ->
# 215-216 us with the reduction launch, the ragged batch 94.2-94.6 -> 73.5-78.4; at 8 splits level,
# at 5-6 the in-kernel merge 3-10% faster (tune_h100.json "fused_merge_splits").
FUSED_MERGE_MAX_ROWS = 256
LONGEST_FIRST = True  # query blocks run from a sequence's end (the longest) to its start
# Decode-shaped steps whose splits hold at most this many key tiles (from the static shapes) walk
# them in one pipelined loop (see _attend_range): batch-1 decode 15.7 -> 14.6 us (bf16), 15.1 ->
# 14.0 (fp8); long splits are 3-9% slower in one loop (tune_h100.json "one_key_loop"). 0: never.
ONE_LOOP_MAX_TILES = 4
# Programmatic dependent launch (sm_90+): a kernel is launched while the one before it on the stream
# finishes, and its programs wait (griddepcontrol.wait) before their first memory access, so the
# launch latency between kernels overlaps work, in CUDA graphs too (see programmatic_launch).
PROGRAMMATIC_LAUNCH = True
_TRITON_HAS_GDC = hasattr(getattr(getattr(tl, "extra", None), "cuda", None), "gdc_wait")
# When a kernel lets the next one launch: as soon as all of its programs have started, or after their
# key loops. Batch-1 decode (tune_h100.json "launch_next"): store_and_decode 12.9 us early against
# 13.3 after the loop; the unified kernel 14.4 us after the loop against 15.8 early (bf16; fp8 13.6
# against 16.5), and prefill 0.5-1% faster after the loop.
EARLY_LAUNCH_NEXT = {"store_and_decode": True, "paged_attention": False}
# Program order, by kernel: the KV heads of one query block (one sequence, for store_and_decode) on
# consecutive programs, or every query block of one head before the next head. The GPU starts
# programs in order, so with heads first the longest-first order holds over the whole launch, not
# within each head (see _program_tile): prefill 8x2048 850-854 -> 802 us, every decode case 0.3-1.3%
# faster (H100; on an H200 845 -> 786 us and the prefix case 1.5% faster; tune_h100.json "heads_first").
HEADS_FIRST = {"store_and_decode": True, "paged_attention": True}

SUPPORTED_HEAD_SIZES = (64, 80, 96, 112, 128, 192, 256)
MIN_BLOCK_SIZE, MAX_BLOCK_SIZE = 16, 256


@triton.jit
def _wait_for_previous_kernel(USE_GDC: tl.constexpr, LAUNCH_NEXT: tl.constexpr):
    """With programmatic dependent launch this program may start before the kernel before it on
    the stream has finished: wait for it (and its memory) before any load or store. Every program
    calls this first, so no kernel finishes before the one it follows, and the ordering holds down
    the stream. ``LAUNCH_NEXT``: let the next kernel launch now (else see _launch_next_kernel)."""
    if USE_GDC:
        tl.extra.cuda.gdc_wait()
        if LAUNCH_NEXT:
            _launch_next_kernel(USE_GDC)


@triton.jit
def _launch_next_kernel(USE_GDC: tl.constexpr):
    """Let the next kernel on the stream launch (its programs wait for this kernel to finish)."""
    if USE_GDC:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _program_tile(NUM_KV_HEADS: tl.constexpr, HEADS_FIRST: tl.constexpr):
    """(row block, KV head, number of row blocks) of this program: axis 0 enumerates row blocks x
    KV heads, heads fastest (``HEADS_FIRST``, see :func:`attention_grid`), or axes 0 and 1 do."""
    if HEADS_FIRST:
        pid = tl.program_id(0)
        return pid // NUM_KV_HEADS, pid % NUM_KV_HEADS, tl.num_programs(0) // NUM_KV_HEADS
    return tl.program_id(0), tl.program_id(1), tl.num_programs(0)


@triton.jit
def _tanh(x):
    # tanh from exp(-2|x|): no overflow at the tails, absolute error ~1e-7 near 0 (scores need no
    # better); portable to the interpreter, which has no tanh.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


LOG2E = tl.constexpr(1.4426950408889634)  # scores are kept in log2 units


@triton.jit
def _mask_scores(s, offs_n, key_end, q_pos, window, USE_WINDOW: tl.constexpr):
    """-inf where a row may not see a key: keys past ``key_end``, causal, window. Rows outside the
    program's queries are not masked: they see keys (finite junk) and are never stored."""
    visible = (offs_n < key_end)[None, :] & (offs_n[None, :] <= q_pos[:, None])
    if USE_WINDOW:
        visible = visible & (offs_n[None, :] > q_pos[:, None] - window)
    return tl.where(visible, s, float("-inf"))


@triton.jit
def _attend_tile(
    acc, m_i, l_i, q, cache_ptr, bt_row_ptr, kvh, tile, key_end, q_pos, slopes,
    qk_scale, window, softcap, mask_from,
    s_ckv, s_cb, s_cs, s_ch, s_cd,
    HEAD: tl.constexpr, HEAD_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr,
    USE_WINDOW: tl.constexpr, USE_ALIBI: tl.constexpr, USE_SOFTCAP: tl.constexpr, DOT_FP32: tl.constexpr,
    MASKED: tl.constexpr, RUNTIME_MASK: tl.constexpr, INT32_OFFSETS: tl.constexpr,
):
    """One online-softmax step over keys ``[tile * TILE_N, (tile + 1) * TILE_N) ∩ [0, key_end)``.

    Scores and the running max ``m_i`` are in log2 units (``exp2`` only). ``MASKED=False`` is for
    tiles every row sees whole (below the causal diagonal, inside the sequence, no window): no
    bounds on the loads and no visibility mask, which keeps the softmax's ALU work to the minimum.
    Rows outside the tile's queries then carry finite junk that is never stored.
    ``RUNTIME_MASK`` (with ``MASKED=False``): any tile of the range; key rows past ``key_end``
    re-read key ``key_end - 1`` (in bounds, no load masks) and the visibility mask applies only
    from tile ``mask_from`` on, under a branch, so one loop serves both kinds of tile.
    ``INT32_OFFSETS``: every element's offset in the cache fits int32 (see
    :func:`offsets_fit_int32`), so the K/V addresses are computed in 32 bits.
    """
    offs_n = tile * TILE_N + tl.arange(0, TILE_N)
    offs_d = tl.arange(0, HEAD_PAD)
    d_ok = offs_d < HEAD
    offs_row = offs_n
    # Key rows are never negative: a page and a row in it by shift and mask, without the sign
    # fix-ups of // and % on signed ints.
    PAGE_SHIFT: tl.constexpr = BLOCK_SIZE.bit_length() - 1
    if RUNTIME_MASK:
        offs_row = tl.minimum(offs_n, key_end - 1)
    if MASKED:
        key_ok = offs_n < key_end
    if BLOCK_SIZE >= TILE_N:
        # The tile lies in one page: one block id, not one a key row (a tile the loops visit starts
        # inside the sequence, so its entry is the sequence's). Pages of 256: decode 32x4096 3.7%
        # faster, prefill 8x2048 2.5%; pages of 64: decode 3%, prefill 0.9% slower (H200,
        # tune_h100.json "tile_block_id").
        block = tl.load(bt_row_ptr + ((tile * TILE_N) >> PAGE_SHIFT))
    elif MASKED:
        # Block ids only for keys in range: never reads table entries past the sequence's last block.
        block = tl.load(bt_row_ptr + (offs_n >> PAGE_SHIFT), mask=key_ok, other=0)
    else:
        block = tl.load(bt_row_ptr + (offs_row >> PAGE_SHIFT))
    if not INT32_OFFSETS:
        block = block.to(tl.int64)
    kv_off = (block * s_cb + (offs_row & (BLOCK_SIZE - 1)) * s_cs)[:, None] + kvh * s_ch + offs_d[None, :] * s_cd
    if MASKED:
        kv_mask = key_ok[:, None] & d_ok[None, :]
        k = tl.load(cache_ptr + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(cache_ptr + s_ckv + kv_off, mask=kv_mask, other=0.0)
    elif HEAD == HEAD_PAD:
        k = tl.load(cache_ptr + kv_off)
        v = tl.load(cache_ptr + s_ckv + kv_off)
    else:
        k = tl.load(cache_ptr + kv_off, mask=d_ok[None, :], other=0.0)
        v = tl.load(cache_ptr + s_ckv + kv_off, mask=d_ok[None, :], other=0.0)
    if DOT_FP32:
        s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k.to(q.dtype)))
    # log2-unit scores are s * c: without a soft-cap or ALiBi the scale is folded into the
    # exponent's FMA (exp2(s * c - m)) and the row max (max(s) * c, c > 0): one op per score fewer.
    c = qk_scale * LOG2E
    if USE_SOFTCAP:  # the cap applies to natural-unit scores (ALiBi bias included)
        s = s * qk_scale
        if USE_ALIBI:
            s += slopes[:, None] * (offs_n[None, :] - q_pos[:, None]).to(tl.float32)
        s = (softcap * LOG2E) * _tanh(s / softcap)
        c = 1.0
    elif USE_ALIBI:
        s = s * c + (slopes * LOG2E)[:, None] * (offs_n[None, :] - q_pos[:, None]).to(tl.float32)
        c = 1.0
    if MASKED:
        s = _mask_scores(s, offs_n, key_end, q_pos, window, USE_WINDOW)
    if RUNTIME_MASK:
        if tile >= mask_from:
            s = _mask_scores(s, offs_n, key_end, q_pos, window, USE_WINDOW)
    m_new = tl.maximum(m_i, tl.max(s, axis=1) * c)
    m_safe = m_new  # a mask-free tile shows every row all of its keys: m_new is finite
    if MASKED or RUNTIME_MASK:
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen no key yet
    p = tl.exp2(s * c - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if DOT_FP32:
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
    return acc, m_new, l_i


@triton.jit
def _query_for_dot(q, IS_FP8: tl.constexpr, DOT_FP32: tl.constexpr, FP8_DOT_FP16: tl.constexpr):
    """q in the dtype the tile dots take (K/V tiles are converted to it).

    fp8 K/V with ``FP8_DOT_FP16``: fp16. e4m3 -> fp16 is one instruction per two values on sm_89+
    and exact (every e4m3 value, subnormals included, is an fp16 value); e4m3 -> bf16 goes through
    fp32. fp16 also holds q more precisely than bf16 (10 mantissa bits, not 7); |q| beyond fp16's
    65504 is clamped. Probabilities (in [0, 1]) lose nothing either.
    """
    if DOT_FP32:
        q = q.to(tl.float32)
    elif IS_FP8:
        if FP8_DOT_FP16:
            q = tl.minimum(tl.maximum(q.to(tl.float32), -65504.0), 65504.0).to(tl.float16)
    return q


@triton.jit
def _unmasked_tiles_end(first_tile, last_tile, first_query_pos, TILE_N: tl.constexpr, USE_WINDOW: tl.constexpr):
    """Tiles ``[first_tile, end)`` need no mask: every key in them is at or before the block's
    first query (windows keep every tile masked). Clamped to ``[first_tile, last_tile]``."""
    end = first_tile
    if not USE_WINDOW:
        end = (first_query_pos + 1) // TILE_N
    return tl.minimum(tl.maximum(end, first_tile), last_tile)


@triton.jit
def _attend_range(
    acc, m_i, l_i, q, cache_ptr, bt_row_ptr, kvh, first_tile, last_tile, first_query_pos, key_end, q_pos,
    slopes, qk_scale, window, softcap,
    s_ckv, s_cb, s_cs, s_ch, s_cd,
    HEAD: tl.constexpr, HEAD_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr,
    USE_WINDOW: tl.constexpr, USE_ALIBI: tl.constexpr, USE_SOFTCAP: tl.constexpr, DOT_FP32: tl.constexpr,
    ONE_KEY_LOOP: tl.constexpr, INT32_OFFSETS: tl.constexpr,
):
    """Key tiles ``[first_tile, last_tile)``: the mask-free ones (see :func:`_unmasked_tiles_end`)
    first, then the ones that need bounds and masks.

    The two loops pipeline separately: the masked tiles' loads start only once the mask-free loop
    has drained. ``ONE_KEY_LOOP`` (splits of a few tiles, where that wait is much of the program)
    walks every tile in one pipelined loop instead, the mask under a branch (see
    :func:`_attend_tile`). Chosen per launch, not per program: each loop holds its own pipeline
    buffers, so a kernel with both would need twice the shared memory.
    """
    mid_tile = _unmasked_tiles_end(first_tile, last_tile, first_query_pos, TILE_N, USE_WINDOW)
    if ONE_KEY_LOOP:
        for tile in range(first_tile, last_tile):
            acc, m_i, l_i = _attend_tile(
                acc, m_i, l_i, q, cache_ptr, bt_row_ptr, kvh, tile, key_end, q_pos, slopes,
                qk_scale, window, softcap, mid_tile, s_ckv, s_cb, s_cs, s_ch, s_cd,
                HEAD, HEAD_PAD, BLOCK_SIZE, TILE_N, USE_WINDOW, USE_ALIBI, USE_SOFTCAP, DOT_FP32, False, True,
                INT32_OFFSETS,
            )
    else:
        for tile in range(first_tile, mid_tile):
            acc, m_i, l_i = _attend_tile(
                acc, m_i, l_i, q, cache_ptr, bt_row_ptr, kvh, tile, key_end, q_pos, slopes,
                qk_scale, window, softcap, mid_tile, s_ckv, s_cb, s_cs, s_ch, s_cd,
                HEAD, HEAD_PAD, BLOCK_SIZE, TILE_N, USE_WINDOW, USE_ALIBI, USE_SOFTCAP, DOT_FP32, False, False,
                INT32_OFFSETS,
            )
        for tile in range(mid_tile, last_tile):
            acc, m_i, l_i = _attend_tile(
                acc, m_i, l_i, q, cache_ptr, bt_row_ptr, kvh, tile, key_end, q_pos, slopes,
                qk_scale, window, softcap, mid_tile, s_ckv, s_cb, s_cs, s_ch, s_cd,
                HEAD, HEAD_PAD, BLOCK_SIZE, TILE_N, USE_WINDOW, USE_ALIBI, USE_SOFTCAP, DOT_FP32, True, False,
                INT32_OFFSETS,
            )
    return acc, m_i, l_i


@triton.jit
def _combine_splits(part_acc_ptr, part_m_ptr, part_l_ptr, tok, head, row_valid, num_tokens,
                    NUM_HEADS: tl.constexpr, HEAD_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr,
                    BLOCK_M: tl.constexpr, MERGE_CHUNK: tl.constexpr):
    """Normalised rows from every split's partial (max, sum, acc), in log2 units.

    ``MERGE_CHUNK`` splits at a time as one ``[BLOCK_M, MERGE_CHUNK, HEAD_PAD]`` load, and the
    chunks unrolled: their loads do not wait on each other, so 32 splits cost a few L2 round
    trips, not 32. Reads use ``.cg`` (at L2, where the other programs' writes are, never a stale
    L1 line).
    """
    offs_d = tl.arange(0, HEAD_PAD)
    offs_c = tl.arange(0, MERGE_CHUNK)
    row = tok * NUM_HEADS + head  # split 0's row; tok is int64
    split_stride = num_tokens * NUM_HEADS
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for c in tl.static_range(0, NUM_SPLITS, MERGE_CHUNK):
        rows = (c + offs_c)[None, :] * split_stride + row[:, None]
        ok = row_valid[:, None] & ((c + offs_c) < NUM_SPLITS)[None, :]
        m = tl.maximum(m, tl.max(tl.load(part_m_ptr + rows, mask=ok, other=float("-inf"), cache_modifier=".cg"), axis=1))
    m = tl.where(m == float("-inf"), 0.0, m)  # rows no split saw a key for
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    o = tl.zeros([BLOCK_M, HEAD_PAD], dtype=tl.float32)
    for c in tl.static_range(0, NUM_SPLITS, MERGE_CHUNK):
        rows = (c + offs_c)[None, :] * split_stride + row[:, None]
        ok = row_valid[:, None] & ((c + offs_c) < NUM_SPLITS)[None, :]
        w = tl.exp2(tl.load(part_m_ptr + rows, mask=ok, other=float("-inf"), cache_modifier=".cg") - m[:, None])
        l += tl.sum(w * tl.load(part_l_ptr + rows, mask=ok, other=0.0, cache_modifier=".cg"), axis=1)
        acc = tl.load(part_acc_ptr + rows[:, :, None] * HEAD_PAD + offs_d[None, None, :], mask=ok[:, :, None],
                      other=0.0, cache_modifier=".cg")
        o += tl.sum(w[:, :, None] * acc, axis=1)
    return o / tl.where(l == 0.0, 1.0, l)[:, None]


@triton.jit
def _store_result(
    acc, m_i, l_i, out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, sem_ptr, sem_index, tok, head, row_valid,
    split, num_tokens, s_ot, s_oh, s_od,
    NUM_HEADS: tl.constexpr, HEAD: tl.constexpr, HEAD_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr,
    FUSED_REDUCE: tl.constexpr, BLOCK_M: tl.constexpr, MERGE_CHUNK: tl.constexpr,
):
    """Normalised rows into ``out`` (one split), or the partial (max, sum, acc) of this split.

    ``FUSED_REDUCE``: the programs of one tile count themselves in ``sem_ptr[sem_index]`` as
    they finish; the last one merges every split's partial into ``out`` and sets the counter
    back to 0 (so the zeroed buffer is reusable by the next launch on the stream, no memset).
    """
    offs_d = tl.arange(0, HEAD_PAD)
    mask = row_valid[:, None] & (offs_d < HEAD)[None, :]
    tok = tok.to(tl.int64)
    dst = out_ptr + tok[:, None] * s_ot + head[:, None] * s_oh + offs_d[None, :] * s_od
    if NUM_SPLITS == 1:
        o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        row = (split * num_tokens + tok) * NUM_HEADS + head  # tok is int64
        tl.store(part_m_ptr + row, m_i, mask=row_valid)
        tl.store(part_l_ptr + row, l_i, mask=row_valid)
        tl.store(part_acc_ptr + row[:, None] * HEAD_PAD + offs_d[None, :], acc, mask=row_valid[:, None])
        if FUSED_REDUCE:
            tl.debug_barrier()  # all of this program's partials are written before it counts itself
            arrived = tl.atomic_add(sem_ptr + sem_index, 1, sem="acq_rel", scope="gpu")
            if arrived == NUM_SPLITS - 1:
                o = _combine_splits(part_acc_ptr, part_m_ptr, part_l_ptr, tok, head, row_valid, num_tokens,
                                    NUM_HEADS, HEAD_PAD, NUM_SPLITS, BLOCK_M, MERGE_CHUNK)
                tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=mask)
                tl.atomic_xchg(sem_ptr + sem_index, 0)


@triton.jit
def _score_params(scale, softcap, k_scale_ptr, slopes_ptr, head, row_valid,
                  BLOCK_M: tl.constexpr, IS_FP8: tl.constexpr, USE_ALIBI: tl.constexpr):
    """(score scale, soft-cap, per-row ALiBi slopes), all fp32. Inductor may hand Python floats to
    user kernels as fp64 scalars: the casts keep fp64 out of the loop-carried softmax state."""
    qk_scale = tl.cast(scale, tl.float32)
    softcap = tl.cast(softcap, tl.float32)
    if IS_FP8:
        qk_scale = qk_scale * tl.load(k_scale_ptr).to(tl.float32)
    slopes = tl.zeros([BLOCK_M], dtype=tl.float32)
    if USE_ALIBI:
        slopes = tl.load(slopes_ptr + head, mask=row_valid, other=0.0).to(tl.float32)
    return qk_scale, softcap, slopes


@triton.jit
def _split_tiles(first_tile, last_tile, split, NUM_SPLITS: tl.constexpr):
    """This program's share ``[first, last)`` of the key tiles (flash-decoding), equal slices."""
    if NUM_SPLITS > 1:
        per_split = tl.cdiv(tl.maximum(last_tile - first_tile, 0), NUM_SPLITS)
        first_tile = first_tile + split * per_split
        last_tile = tl.minimum(first_tile + per_split, last_tile)
    return first_tile, last_tile


@triton.jit
def _find_seq(query_start_loc_ptr, num_seqs, q_block, BLOCK_Q: tl.constexpr):
    """The last sequence ``s`` with ``query_start_loc[s] // BLOCK_Q + s <= q_block``."""
    lo: tl.int32 = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_block = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first_block <= q_block:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _paged_attention_kernel(
    q_ptr, out_ptr, cache_ptr, query_start_loc_ptr, seq_lens_ptr, block_table_ptr,
    k_scale_ptr, v_scale_ptr, slopes_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, sem_ptr,
    num_seqs, num_tokens, scale, window, softcap,
    s_qt, s_qh, s_qd, s_ot, s_oh, s_od, s_ckv, s_cb, s_cs, s_ch, s_cd, s_bt,
    G: tl.constexpr, NUM_HEADS: tl.constexpr, HEAD: tl.constexpr, HEAD_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, TILE_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr, FUSED_REDUCE: tl.constexpr, USE_WINDOW: tl.constexpr, USE_ALIBI: tl.constexpr,
    USE_SOFTCAP: tl.constexpr, IS_FP8: tl.constexpr, DOT_FP32: tl.constexpr, FP8_DOT_FP16: tl.constexpr,
    MERGE_CHUNK: tl.constexpr, LONGEST_FIRST: tl.constexpr, ONE_KEY_LOOP: tl.constexpr, USE_GDC: tl.constexpr,
    EARLY_LAUNCH_NEXT: tl.constexpr, HEADS_FIRST: tl.constexpr, INT32_OFFSETS: tl.constexpr,
    SHORT_MIN: tl.constexpr, SHORT_MAX: tl.constexpr,
):
    """``SHORT_MAX`` > 0: only the sequences of ``SHORT_MIN < q_len <= SHORT_MAX`` new tokens, and
    no padding rows (the Gluon prefill kernel's launch writes the rest); row block ``b`` is then
    block ``b % cdiv(SHORT_MAX, BLOCK_Q)`` of sequence ``b // cdiv(SHORT_MAX, BLOCK_Q)``."""
    _wait_for_previous_kernel(USE_GDC, EARLY_LAUNCH_NEXT)
    q_block, kvh, num_q_blocks = _program_tile(NUM_HEADS // G, HEADS_FIRST)
    if LONGEST_FIRST:  # a sequence's last query blocks see the most keys: start them first (less tail)
        q_block = num_q_blocks - 1 - q_block
    split = tl.program_id(2)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_PAD)
    head = kvh * G + offs_m % G
    in_tile = offs_m < BLOCK_Q * G

    if ((NUM_SPLITS == 1) or FUSED_REDUCE) and SHORT_MAX == 0:  # else the reduction launch writes them
        # Padding tokens (>= query_start_loc[-1]) belong to no query block: the programs whose
        # token range [q_block * BLOCK_Q, +BLOCK_Q) holds them write their zeros (a branch: the
        # store's addresses cost every other program instructions).
        last_token = tl.load(query_start_loc_ptr + num_seqs)
        if (q_block + 1) * BLOCK_Q > last_token:
            pad_tok = q_block * BLOCK_Q + offs_m // G
            # Split 0 alone writes them. (A comparison, not `& (split == 0)`: triton 3.9's
            # interpreter turns block & scalar into an int32 mask.)
            pad = in_tile & (pad_tok >= last_token) & (pad_tok < tl.where(split == 0, num_tokens, 0))
            dst = out_ptr + pad_tok.to(tl.int64)[:, None] * s_ot + head[:, None] * s_oh + offs_d[None, :] * s_od
            zeros = tl.zeros([BLOCK_M, HEAD_PAD], dtype=out_ptr.dtype.element_ty)
            tl.store(dst, zeros, mask=pad[:, None] & (offs_d < HEAD)[None, :])

    if SHORT_MAX > 0:  # a fixed number of blocks a sequence: no search
        SEQ_BLOCKS: tl.constexpr = (SHORT_MAX + BLOCK_Q - 1) // BLOCK_Q
        seq = q_block // SEQ_BLOCKS
        q_start = tl.load(query_start_loc_ptr + seq)
        q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
        local = q_block % SEQ_BLOCKS
        if (q_len <= SHORT_MIN) | (q_len > SHORT_MAX):
            return
    else:
        seq = _find_seq(query_start_loc_ptr, num_seqs, q_block, BLOCK_Q)
        q_start = tl.load(query_start_loc_ptr + seq)
        q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
        local = q_block - (q_start // BLOCK_Q + seq)  # this program's query block within the sequence
    if local * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len
    q_local = local * BLOCK_Q + offs_m // G
    row_valid = in_tile & (q_local < q_len)
    q_pos = context + q_local  # absolute position: sees keys 0..q_pos
    tok = q_start + q_local  # int32 (token indices fit), widened where it addresses memory

    q_mask = row_valid[:, None] & (offs_d < HEAD)[None, :]
    q = tl.load(q_ptr + tok.to(tl.int64)[:, None] * s_qt + head[:, None] * s_qh + offs_d[None, :] * s_qd,
                mask=q_mask, other=0.0)
    q = _query_for_dot(q, IS_FP8, DOT_FP32, FP8_DOT_FP16)
    qk_scale, softcap, slopes = _score_params(scale, softcap, k_scale_ptr, slopes_ptr, head, row_valid,
                                              BLOCK_M, IS_FP8, USE_ALIBI)

    key_end = context + tl.minimum((local + 1) * BLOCK_Q, q_len)  # last query's position + 1
    key_start = 0
    if USE_WINDOW:
        key_start = tl.maximum(context + local * BLOCK_Q - window + 1, 0)
    first_tile, last_tile = _split_tiles(key_start // TILE_N, tl.cdiv(key_end, TILE_N), split, NUM_SPLITS)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], dtype=tl.float32)
    bt_row_ptr = block_table_ptr + seq.to(tl.int64) * s_bt
    acc, m_i, l_i = _attend_range(
        acc, m_i, l_i, q, cache_ptr, bt_row_ptr, kvh, first_tile, last_tile, context + local * BLOCK_Q, key_end,
        q_pos, slopes, qk_scale, window, softcap, s_ckv, s_cb, s_cs, s_ch, s_cd,
        HEAD, HEAD_PAD, BLOCK_SIZE, TILE_N, USE_WINDOW, USE_ALIBI, USE_SOFTCAP, DOT_FP32, ONE_KEY_LOOP,
        INT32_OFFSETS,
    )
    if not EARLY_LAUNCH_NEXT:
        _launch_next_kernel(USE_GDC)
    if IS_FP8:
        acc = acc * tl.load(v_scale_ptr).to(tl.float32)
    # The rows to store, from tok (live across the key loops anyway) rather than keeping a mask live.
    row_valid = in_tile & (tok < q_start + q_len)
    _store_result(
        acc, m_i, l_i, out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, sem_ptr, q_block * (NUM_HEADS // G) + kvh,
        tok, head, row_valid, split, num_tokens, s_ot, s_oh, s_od, NUM_HEADS, HEAD, HEAD_PAD, NUM_SPLITS,
        FUSED_REDUCE, BLOCK_M, MERGE_CHUNK,
    )


@triton.jit
def _reduce_splits_kernel(
    part_acc_ptr, part_m_ptr, part_l_ptr, out_ptr, query_start_loc_ptr, seq_lens_ptr,
    num_seqs, num_tokens, s_ot, s_oh, s_od,
    NUM_HEADS: tl.constexpr, HEAD: tl.constexpr, HEAD_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr, VALID_FROM_SEQ_LENS: tl.constexpr, USE_GDC: tl.constexpr,
):
    """out[t, h] = Σ_s exp(m_s - m) acc_s / Σ_s exp(m_s - m) l_s; zeros for padding tokens."""
    _wait_for_previous_kernel(USE_GDC, True)
    t = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_PAD)
    if VALID_FROM_SEQ_LENS:  # store_and_decode: token t is sequence t; padding has seq_len 0
        valid = tl.load(seq_lens_ptr + t) > 0
    else:
        valid = t < tl.load(query_start_loc_ptr + num_seqs)
    # One comparison, not `& valid`: triton 3.9's interpreter turns block & scalar into an int32 mask.
    s_mask = offs_s < tl.where(valid, NUM_SPLITS, 0)
    row = (offs_s.to(tl.int64) * num_tokens + t) * NUM_HEADS + h
    m_s = tl.load(part_m_ptr + row, mask=s_mask, other=float("-inf"))
    l_s = tl.load(part_l_ptr + row, mask=s_mask, other=0.0)
    acc_s = tl.load(part_acc_ptr + row[:, None] * HEAD_PAD + offs_d[None, :], mask=s_mask[:, None], other=0.0)
    m = tl.max(m_s, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(m_s - m)  # partial maxima are in log2 units
    l_total = tl.sum(w * l_s, axis=0)
    o = tl.sum(w[:, None] * acc_s, axis=0) / tl.where(l_total == 0.0, 1.0, l_total)
    dst = out_ptr + t.to(tl.int64) * s_ot + h * s_oh + offs_d * s_od
    tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD)


# ---- host side: static shapes only ----------------------------------------------------------


def choose_num_splits(
    *, num_query_blocks: int, num_kv_heads: int, max_context: int, max_query_len: int, num_sms: int,
    fp8: bool = False, group: int = 1,
) -> int:
    """Flash-decoding split count from static shapes: enough programs to fill the GPU, no split
    shorter than ``SPLIT_MIN_KEYS`` (fp8: ``SPLIT_MIN_KEYS_FP8``), partials within
    ``SPLIT_MAX_PARTIAL_SHARE`` of the K/V bytes (``group``: query heads a KV head), whole waves
    where that is cheap; 1 for prefill-like buckets (this module's constants, read at call time so
    the tuning script can patch them)."""
    resident = DECODE_RESIDENT_PER_SM_FP8 if fp8 else DECODE_RESIDENT_PER_SM
    programs = max(num_query_blocks * num_kv_heads, 1)
    min_keys = SPLIT_MIN_KEYS_FP8 if fp8 else SPLIT_MIN_KEYS
    if programs * math.ceil(max_context / min_keys) < SMALL_GRID_FILL * num_sms:
        min_keys = min(min_keys, SPLIT_MIN_KEYS)
    max_splits = MAX_SPLITS
    if SPLIT_MAX_PARTIAL_SHARE and programs * max_context >= SPLIT_CAP_MIN_KEYS_PER_SM * num_sms:
        cap = max(partial_traffic_cap(max_context=max_context, rows=group * max(max_query_len, 1), fp8=fp8),
                  math.ceil(num_sms / programs))
        if max_context >= cap * SPLIT_CAP_MIN_KEYS and programs * cap <= resident * num_sms:
            max_splits = min(max_splits, cap)
    return split_count(
        programs=programs, max_context=max_context, max_query_len=max_query_len,
        num_sms=num_sms, split_max_query_len=SPLIT_MAX_QUERY_LEN, programs_per_sm=SPLIT_TARGET_WAVES * resident,
        min_keys=min_keys, max_splits=max_splits, resident_per_sm=resident)


def partial_traffic_cap(*, max_context: int, rows: int, fp8: bool) -> int:
    """Most splits whose partials (``rows`` fp32 rows a split, written and read back: 8 bytes an
    element) stay within ``SPLIT_MAX_PARTIAL_SHARE`` of one KV head's K/V bytes (2 tensors of
    ``max_context`` rows, 1 byte an element for fp8, 2 for bf16/fp16).

    >>> partial_traffic_cap(max_context=4096, rows=32, fp8=False)  # MQA, 32 query heads
    6
    >>> partial_traffic_cap(max_context=4096, rows=4, fp8=False)  # GQA, 4 query heads a KV head
    51
    """
    kv_bytes = 2 * max_context * (1 if fp8 else 2)
    return max(1, int(SPLIT_MAX_PARTIAL_SHARE * kv_bytes / (8 * rows)))


def short_split_tile_n(tile_n: int, *, max_context: int, num_splits: int, max_query_len: int, fp8: bool,
                       block_size: int) -> int:
    """``tile_n``, or ``SHORT_SPLIT_TILE_N`` for a bf16/fp16 decode bucket whose splits hold at most
    one tile of the longest context the block table addresses, over pages smaller than the tile: a
    program of one tile waits for all of its K/V at once, one of two smaller tiles starts on the
    first while the second arrives. Batch-1 decode on an H100 (64 splits of 64 keys,
    tune_h100.json "short_split_tiles"): pages of 16 12.5-12.8 -> 12.0-12.7 us; pages of 64
    level; pages of 256, where a 64-key tile is one block-table entry, 11.9-12.0 -> 12.4-12.6,
    so pages that hold a tile keep it. 32-key tiles on longer splits were slower (15.2 against
    14.4 us before one-loop splits). fp8 splits hold at least two tiles (``SPLIT_MIN_KEYS_FP8``)
    except on small grids (see ``SHORT_SPLIT_TILE_N_FP8``), whose splits of at most that many keys
    take tiles of that size."""
    if max_query_len > SPLIT_MAX_QUERY_LEN:
        return tile_n
    split_keys = math.ceil(max_context / num_splits)
    if fp8:
        return min(tile_n, SHORT_SPLIT_TILE_N_FP8) if split_keys <= SHORT_SPLIT_TILE_N_FP8 else tile_n
    if block_size < tile_n and split_keys <= tile_n:
        return min(tile_n, SHORT_SPLIT_TILE_N)
    return tile_n


def one_key_loop(*, max_context: int, tile_n: int, num_splits: int, max_query_len: int) -> bool:
    """Whether a launch walks its key tiles in one loop (see :func:`_attend_range`): decode-shaped
    buckets whose splits hold at most ``ONE_LOOP_MAX_TILES`` tiles of the longest context the
    block table can address (prefill programs walk long ranges, and at 255 registers any code
    added to their kernel moves its spills)."""
    tiles_per_split = math.ceil(math.ceil(max_context / tile_n) / num_splits)
    return max_query_len <= SPLIT_MAX_QUERY_LEN and tiles_per_split <= ONE_LOOP_MAX_TILES


def kernel_constexprs(
    *, group: int, num_heads: int, head_size: int, block_size: int, block_m: int, tile_n: int, num_splits: int,
    fused_reduce: bool, max_context: int, max_query_len: int, fp8: bool, dot_fp32: bool, window: bool = False,
    int32_offsets: bool, alibi: bool = False, softcap: bool = False, kernel: str = "paged_attention",
) -> dict:
    """The constexprs both attention kernels take, from static shapes (this module's constants read
    now). Their launch plans and the ahead-of-time builds (``_aot``) all derive them here; ``USE_GDC``
    comes with the launch (:func:`launch_constexprs`). ``kernel``: ``"paged_attention"`` or
    ``"store_and_decode"``; ``int32_offsets``: :func:`offsets_fit_int32` of the cache."""
    return dict(
        G=group, NUM_HEADS=num_heads, HEAD=head_size, HEAD_PAD=_jit.next_power_of_2(head_size),
        BLOCK_SIZE=block_size, BLOCK_M=block_m, TILE_N=tile_n, NUM_SPLITS=num_splits, FUSED_REDUCE=fused_reduce,
        USE_WINDOW=window, USE_ALIBI=alibi, USE_SOFTCAP=softcap, IS_FP8=fp8, DOT_FP32=dot_fp32,
        FP8_DOT_FP16=FP8_DOT_FP16, MERGE_CHUNK=merge_chunk(num_splits, block_m),
        ONE_KEY_LOOP=one_key_loop(max_context=max_context, tile_n=tile_n, num_splits=num_splits,
                                  max_query_len=max_query_len),
        EARLY_LAUNCH_NEXT=EARLY_LAUNCH_NEXT[kernel], HEADS_FIRST=HEADS_FIRST[kernel], INT32_OFFSETS=int32_offsets,
    )


def offsets_fit_int32(t: torch.Tensor) -> bool:
    """Whether every element of ``t`` is at most 2**31 - 1 elements from its first (strides may
    order its dimensions any way). Then the kernels address the cache with 32-bit offsets: sm_90
    SASS of the decode key loop 436 -> 291 instructions, fp8 1,263 -> 897, prefill 651 -> 597
    (Triton 3.6); fp8 decode 3% faster, prefill 1%, bf16 decode level (H200, tune_h100.json
    "int32_offsets"). Larger caches (over 4 GB of bf16 per layer) take 64-bit offsets."""
    return sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride())) < 2**31


def attention_grid(row_blocks: int, kv_heads: int, num_splits: int, heads_first: bool) -> tuple[int, int, int]:
    """The attention kernels' grid (see :func:`_program_tile`): row blocks x KV heads on axis 0,
    heads fastest, or on axes 0 and 1; splits on axis 2."""
    if heads_first:
        return (row_blocks * kv_heads, 1, num_splits)
    return (row_blocks, kv_heads, num_splits)


def programmatic_launch_on(capability: tuple[int, int]) -> bool:
    """Whether kernels built for a GPU of this compute capability use programmatic dependent launch
    (``USE_GDC``): ``PROGRAMMATIC_LAUNCH``, sm_90+, and a Triton that has the grid-dependency calls
    (``tl.extra.cuda.gdc_wait``; 3.6 has them)."""
    return PROGRAMMATIC_LAUNCH and _TRITON_HAS_GDC and capability >= (9, 0)


def programmatic_launch(device: torch.device) -> bool:
    """:func:`programmatic_launch_on` for ``device``, with compiled kernels (not the interpreter)."""
    return not _jit.interpreting() and programmatic_launch_on(compute_capability(device))


def launch_constexprs(t: torch.Tensor) -> dict:
    """``USE_GDC`` for a launch of our kernels on ``t``'s device, and with it the launch attribute
    that lets such a kernel start early, for launches Triton makes itself with real tensors. While
    torch.compile or export traces a triton_op the compiled code launches the kernel, as an
    ordinary launch (its griddepcontrol.wait then returns at once)."""
    gdc = programmatic_launch(t.device)
    if gdc and type(t) is torch.Tensor and not torch.compiler.is_compiling():
        return {"USE_GDC": True, "launch_pdl": True}
    return {"USE_GDC": gdc}


def merge_chunk(num_splits: int, block_m: int) -> int:
    """Splits per load in the in-kernel merge (:func:`_combine_splits`): as many as fit
    ``FUSED_MERGE_ROWS`` rows of partials, a power of two."""
    return max(1, min(_jit.next_power_of_2(num_splits), FUSED_MERGE_ROWS // block_m))


def tile_config(
    *, num_queries_per_kv: int, head_size: int, max_query_len: int, interpret: bool, fp8: bool = False,
    hopper: bool = False,
) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_Q, TILE_N, num_warps, num_stages) for a static shape (``fp8``: fp8 K/V;
    ``hopper``: an sm_90+ GPU, whose shared memory takes 128-row tiles of 256-wide heads)."""
    group_pad = _jit.next_power_of_2(num_queries_per_kv)
    if max_query_len <= SPLIT_MAX_QUERY_LEN:
        block_m = max(DECODE_BLOCK_M, _jit.next_power_of_2(num_queries_per_kv * max(max_query_len, 1)))
        block_m = min(block_m, max(DECODE_MAX_BLOCK_M, group_pad))
        num_warps, num_stages, tile_n = DECODE_NUM_WARPS, DECODE_NUM_STAGES, DECODE_TILE_N_GPU
        if fp8:
            num_warps, num_stages, tile_n = DECODE_NUM_WARPS_FP8, DECODE_NUM_STAGES_FP8, DECODE_TILE_N_GPU_FP8
        if head_size > 128:
            tile_n = min(tile_n, DECODE_TILE_N_HEAD_192 if head_size <= 192 else TILE_N_GPU_LARGE_HEAD)
    else:
        block_m = max(PREFILL_BLOCK_M, group_pad)
        num_warps, num_stages, tile_n = PREFILL_NUM_WARPS, NUM_STAGES_FP8 if fp8 else NUM_STAGES, TILE_N_GPU
        if head_size > 128:
            if hopper:
                num_warps, tile_n = PREFILL_NUM_WARPS_LARGE_HEAD, PREFILL_TILE_N_LARGE_HEAD
            else:  # 128 rows of a 256-wide head: 104 KB of shared memory
                block_m = max(PREFILL_BLOCK_M // 2, group_pad)
                tile_n = min(tile_n, TILE_N_GPU_LARGE_HEAD)
    if interpret:
        tile_n = TILE_N_INTERPRETER
    return block_m, block_m // num_queries_per_kv, tile_n, num_warps, num_stages


def check_attention_args(q, kv_cache, query_start_loc, seq_lens, block_table, out) -> None:
    """Static (shape/dtype) checks whose errors name the fix; free under torch.compile."""
    if q.dim() != 3 or out.shape != q.shape:
        raise ValueError(f"q and out must both be [num_tokens, num_heads, head_size]; got {tuple(q.shape)}, {tuple(out.shape)}")
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2 or kv_cache.shape[4] != q.shape[2]:
        raise ValueError(f"kv_cache must be [2, num_blocks, block_size, kv_heads, {q.shape[2]}], got {tuple(kv_cache.shape)}")
    heads, kv_heads, head_size, block_size = q.shape[1], kv_cache.shape[3], q.shape[2], kv_cache.shape[2]
    if heads % kv_heads:
        raise ValueError(f"num_heads ({heads}) must be a multiple of the cache's kv_heads ({kv_heads})")
    if head_size not in SUPPORTED_HEAD_SIZES:
        raise ValueError(f"head_size {head_size} is not supported by the triton kernels "
                         f"(supported: {', '.join(map(str, SUPPORTED_HEAD_SIZES))}); use backend='torch_native'")
    if block_size & (block_size - 1) or not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE:
        raise ValueError(f"block_size {block_size} is not supported by the triton kernels "
                         f"(powers of two from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE})")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or out.dtype != q.dtype:
        raise ValueError(f"q and out must share one of float16, bfloat16, float32; got {q.dtype}, {out.dtype}")
    if kv_cache.dtype not in (q.dtype, torch.float8_e4m3fn):
        raise ValueError(f"kv_cache dtype {kv_cache.dtype} must be q's dtype ({q.dtype}) or torch.float8_e4m3fn")
    for name, t in (("query_start_loc", query_start_loc), ("seq_lens", seq_lens), ("block_table", block_table)):
        if t.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {t.dtype}")
    if query_start_loc.shape[0] != seq_lens.shape[0] + 1 or block_table.shape[0] != seq_lens.shape[0]:
        raise ValueError("query_start_loc [B+1], seq_lens [B] and block_table [B, max_blocks] disagree on B")
    if block_table.stride(1) != 1:
        raise ValueError("block_table rows must be contiguous; pass block_table.contiguous()")


def check_scale(scale: float) -> None:
    """The kernels fold the softmax scale into the row max (``max(s) * scale``): it must be > 0."""
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")


_SPLIT_COUNTERS: dict[torch.device, torch.Tensor] = {}
# Outgrown buffers stay allocated: a CUDA graph captured earlier still increments (and re-zeroes)
# the one it was captured with, and must never find that memory handed to another tensor.
_RETIRED_SPLIT_COUNTERS: list[torch.Tensor] = []


def fused_max_splits(kernel: str) -> int:
    """The most splits ``kernel`` (``"paged_attention"``, ``"store_and_decode"``) merges in-kernel."""
    return FUSED_MAX_SPLITS if isinstance(FUSED_MAX_SPLITS, int) else FUSED_MAX_SPLITS[kernel]


def fuse_split_merge(num_splits: int, block_m: int, kernel: str) -> bool:
    """Whether ``kernel``'s last split of a tile of ``block_m`` rows merges the partials itself
    (else the reduction launch does): ``FUSED_SPLIT_REDUCE``, 2 to ``fused_max_splits(kernel)``
    splits, and at most ``FUSED_MERGE_MAX_ROWS`` partial rows for one program to read."""
    return (FUSED_SPLIT_REDUCE and 1 < num_splits <= fused_max_splits(kernel)
            and num_splits * block_m <= FUSED_MERGE_MAX_ROWS)


def split_counters(q: torch.Tensor, count: int, num_splits: int, kernel: str = "paged_attention",
                   block_m: int = DECODE_BLOCK_M) -> torch.Tensor | None:
    """``count`` zeroed int32 counters for the fused split reduction, or None to use the
    reduction launch instead (where :func:`fuse_split_merge` says no).

    Every launch leaves its counters zeroed, so one buffer per device serves all launches on a
    stream (as a workspace does; launches on concurrent streams must not share a device). It
    grows only outside CUDA-graph capture (memory allocated there would belong to the graph's
    pool) and only for plain tensors: while ``torch.compile`` traces a triton_op its inputs are
    fake, and a real global buffer cannot join that graph.
    """
    if not fuse_split_merge(num_splits, block_m, kernel) or type(q) is not torch.Tensor:
        return None
    have = _SPLIT_COUNTERS.get(q.device)
    if have is not None and have.numel() >= count:
        return have
    if q.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None
    if have is not None:
        _RETIRED_SPLIT_COUNTERS.append(have)
    _SPLIT_COUNTERS[q.device] = torch.zeros(max(count, 2 * (0 if have is None else have.numel()), 4096),
                                            dtype=torch.int32, device=q.device)
    return _SPLIT_COUNTERS[q.device]


def split_workspace(q, out, query_start_loc, seq_lens, *, num_splits: int, num_rows: int, tiles: int,
                    block_m: int, placeholder: torch.Tensor, valid_from_seq_lens: bool, launch: dict,
                    kernel: str = "paged_attention"):
    """What a launch split ``num_splits`` ways needs besides its kernel: ``(scratch, reduce)``.

    ``scratch`` = (part_acc, part_m, part_l, counters) for the kernel's arguments: the partials of
    ``num_rows`` query rows, and the ``tiles`` counters (of ``block_m`` rows) of the in-kernel merge (``placeholder``,
    never read, stands in for what is not needed). ``reduce`` is the reduction launch
    ``(grid, args, constexprs)`` when the merge is not done in the kernel, else None; ``launch``:
    the plan's :func:`launch_constexprs`.
    """
    if num_splits == 1:
        return (placeholder,) * 4, None
    num_heads, head_size = q.shape[1], q.shape[2]
    head_pad = _jit.next_power_of_2(head_size)
    part_acc = torch.empty(num_splits, num_rows, num_heads, head_pad, dtype=torch.float32, device=q.device)
    part_m = torch.empty(num_splits, num_rows, num_heads, dtype=torch.float32, device=q.device)
    part_l = torch.empty_like(part_m)
    counters = split_counters(q, tiles, num_splits, kernel, block_m)
    if counters is not None:
        return (part_acc, part_m, part_l, counters), None
    args = (part_acc, part_m, part_l, out, query_start_loc, seq_lens, seq_lens.shape[0], num_rows, *out.stride())
    constexprs = dict(
        NUM_HEADS=num_heads, HEAD=head_size, HEAD_PAD=head_pad, NUM_SPLITS=num_splits,
        SPLITS_PAD=_jit.next_power_of_2(num_splits), VALID_FROM_SEQ_LENS=valid_from_seq_lens, num_warps=4,
        **launch,
    )
    return (part_acc, part_m, part_l, placeholder), ((num_rows, num_heads), args, constexprs)


def _launch_plan(q, kv_cache, query_start_loc, seq_lens, block_table, out, *, max_query_len, scale,
                 sliding_window, logits_soft_cap, alibi_slopes, k_scale, v_scale, num_splits, tile_n,
                 short_range: tuple[int, int] = (0, 0)):
    """Grids, arguments and scratch buffers of the attention (+ reduction) launches.
    ``short_range``: the kernel's ``(SHORT_MIN, SHORT_MAX)`` (then one split: a reduction launch
    would write every row)."""
    check_scale(scale)
    if short_range[1]:
        num_splits = 1
    num_tokens, num_heads, head_size = q.shape
    _, _, block_size, kv_heads, _ = kv_cache.shape
    num_seqs = seq_lens.shape[0]
    group = num_heads // kv_heads
    interpret = _jit.interpreting() or q.device.type != "cuda"
    fp8 = kv_cache.dtype == torch.float8_e4m3fn
    block_m, block_q, default_tile_n, num_warps, num_stages = tile_config(
        num_queries_per_kv=group, head_size=head_size, max_query_len=max_query_len, interpret=interpret,
        fp8=fp8, hopper=compute_capability(q.device) >= (9, 0))
    num_q_blocks = num_tokens // block_q + num_seqs
    if short_range[1]:
        num_q_blocks = num_seqs * math.ceil(short_range[1] / block_q)
    max_context = block_table.shape[1] * block_size
    if not num_splits:
        busy_blocks = num_seqs * max(1, math.ceil(max_query_len / block_q))
        num_splits = choose_num_splits(
            num_query_blocks=busy_blocks, num_kv_heads=kv_heads, max_context=max_context,
            max_query_len=max_query_len, num_sms=num_sms(q.device), fp8=fp8, group=group)
    tile_n = tile_n or short_split_tile_n(default_tile_n, max_context=max_context, num_splits=num_splits,
                                          max_query_len=max_query_len, fp8=fp8, block_size=block_size)
    launch = launch_constexprs(q)
    scratch, reduce_launch = split_workspace(
        q, out, query_start_loc, seq_lens, num_splits=num_splits, num_rows=num_tokens, tiles=num_q_blocks * kv_heads,
        block_m=block_m, placeholder=k_scale, valid_from_seq_lens=False, launch=launch)
    attn_args = (
        q, out, kv_cache, query_start_loc, seq_lens, block_table, k_scale, v_scale,
        alibi_slopes if alibi_slopes is not None else k_scale, *scratch,
        num_seqs, num_tokens, float(scale), int(sliding_window or 0), float(logits_soft_cap or 0.0),
        *q.stride(), *out.stride(), *kv_cache.stride(), block_table.stride(0),
    )
    attn_constexprs = dict(
        kernel_constexprs(
            group=group, num_heads=num_heads, head_size=head_size, block_size=block_size, block_m=block_m,
            tile_n=tile_n, num_splits=num_splits, fused_reduce=num_splits > 1 and reduce_launch is None,
            max_context=max_context, max_query_len=max_query_len, fp8=fp8,
            dot_fp32=interpret or q.dtype == torch.float32, window=bool(sliding_window),
            int32_offsets=offsets_fit_int32(kv_cache),
            alibi=alibi_slopes is not None, softcap=bool(logits_soft_cap)),
        BLOCK_Q=block_q, LONGEST_FIRST=LONGEST_FIRST, SHORT_MIN=short_range[0], SHORT_MAX=short_range[1],
        num_warps=num_warps, num_stages=num_stages, **launch,
    )
    attn_grid = attention_grid(num_q_blocks, kv_heads, num_splits, attn_constexprs["HEADS_FIRST"])
    return (attn_grid, attn_args, attn_constexprs), reduce_launch


def launch_planned(kernel, attn, reduce, wrap=None) -> None:
    """The attention launch, then the split reduction if the plan has one. ``wrap`` is
    ``torch.library.wrap_triton`` inside a triton_op (so ``torch.compile`` sees the kernels)."""
    for fn, planned in ((kernel, attn), (_reduce_splits_kernel, reduce)):
        if planned is not None:
            grid, args, constexprs = planned
            (wrap(fn) if wrap else fn)[grid](*args, **constexprs)


def _takes_gluon_prefill(q, kv_cache, out, max_query_len, sliding_window, logits_soft_cap, alibi_slopes,
                         num_splits) -> bool:
    """Whether a prefill-shaped step runs the Hopper Gluon kernel (:mod:`.gluon_prefill`) instead:
    static properties only, and never under the interpreter. Prefill 8x2048 / 1x16384 / 4x2048
    over 8192 cached at the benchmark's shape: BENCHMARKS.md."""
    return not _jit.interpreting() and gluon_prefill.supported(
        q, kv_cache, out, max_query_len=max_query_len, sliding_window=sliding_window,
        logits_soft_cap=logits_soft_cap, alibi_slopes=alibi_slopes, num_splits=num_splits,
        split_max_query_len=SPLIT_MAX_QUERY_LEN)


def fused_store_plan(q, k, v, kv_cache, out, *, max_query_len: int, sliding_window=None, logits_soft_cap=None,
                     alibi_slopes=None) -> tuple[int, int] | None:
    """``(chunk, short_query_len)`` where the step's prefill kernel can store its new K/V itself
    (:func:`gluon_prefill.fuses_store`): ``store_kv(..., skip_fused=(query_start_loc, seq_lens,
    chunk, short_query_len))`` then writes only the rest, and ``paged_attention(..., new_kv=(k, v))``
    the whole chunks of new tokens. None: store_kv stores everything first. Static properties
    only. Slots must follow the block table (as every engine computes them)."""
    if not (_takes_gluon_prefill(q, kv_cache, out, max_query_len, sliding_window, logits_soft_cap, alibi_slopes,
                                 None) and gluon_prefill.fuses_store(k, v, kv_cache)):
        return None
    return gluon_prefill.fused_chunk(kv_cache.shape[-1], kv_cache.shape[2]), gluon_prefill.SHORT_QUERY_LEN


def _short_seqs_plans(q, kv_cache, query_start_loc, seq_lens, block_table, out, *, scale, k_scale, v_scale) -> list:
    """The Triton launches that follow a Gluon prefill launch: the sequences of at most
    ``gluon_prefill.SHORT_QUERY_LEN`` new tokens, which that kernel skips, in two query-length
    ranges planned as buckets of their bounds: decodes and speculative tokens (up to
    ``SPLIT_MAX_QUERY_LEN``) in the decode kernel's small tiles, the longer ones in whole prefill
    tiles. Each launch is a few programs a sequence (its grid does not grow with the step's tokens):
    nearly free where the step has no such sequence."""
    short = gluon_prefill.SHORT_QUERY_LEN
    bounds = sorted({0, min(short, SPLIT_MAX_QUERY_LEN), short})
    return [_launch_plan(
        q, kv_cache, query_start_loc, seq_lens, block_table, out, max_query_len=hi, scale=scale, sliding_window=None,
        logits_soft_cap=None, alibi_slopes=None, k_scale=k_scale, v_scale=v_scale, num_splits=None, tile_n=None,
        short_range=(lo, hi)) for lo, hi in zip(bounds, bounds[1:])]


def paged_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    out: torch.Tensor,
    *,
    max_query_len: int,
    scale: float,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    k_scale: torch.Tensor,
    v_scale: torch.Tensor,
    num_splits: int | None = None,
    tile_n: int | None = None,
    new_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Causal attention of every new token over its sequence's paged context; writes ``out``.

    q/out ``[T, H, D]`` (fp16/bf16/fp32), kv_cache ``[2, num_blocks, block_size, KVH, D]`` (q's
    dtype or float8_e4m3fn with float32 scalar ``k_scale``/``v_scale``), query_start_loc
    ``[B+1]``, seq_lens ``[B]``, block_table ``[B, max_blocks]`` (int32). ``max_query_len`` is the
    static bound from the bucket. The new tokens' K/V must already be in the cache (store_kv).
    Padding tokens (index >= ``query_start_loc[-1]``) get zeros. ``num_splits``/``tile_n``
    override the static heuristics (tests, benchmarks; ``tile_n`` also keeps the step on this
    kernel). No host synchronisation. On sm_90, prefill-shaped steps in :mod:`.gluon_prefill`'s
    scope run that kernel instead, and this one for their short sequences only. ``new_kv``: the
    step's k/v, where :func:`fused_store_plan` allowed it and store_kv skipped what it said; the
    Gluon kernel then stores the rest of the new K/V while it attends.

    Equivalent PyTorch code: :func:`paged_attention_reference`.

    >>> from compiled_attn import AttentionMetadata  # doctest: +SKIP
    >>> meta = AttentionMetadata.build([3, 1], [3, 20], [[0], [2, 1]], block_size=16, device="cuda")  # doctest: +SKIP
    >>> q = torch.randn(4, 8, 128, device="cuda", dtype=torch.bfloat16)  # doctest: +SKIP
    >>> cache = torch.randn(2, 3, 16, 2, 128, device="cuda", dtype=torch.bfloat16)  # doctest: +SKIP
    >>> one = torch.ones((), device="cuda")  # doctest: +SKIP
    >>> out = paged_attention(q, cache, meta.query_start_loc, meta.seq_lens, meta.block_table, torch.empty_like(q),  # doctest: +SKIP
    ...                       max_query_len=3, scale=128 ** -0.5, k_scale=one, v_scale=one)
    """
    check_attention_args(q, kv_cache, query_start_loc, seq_lens, block_table, out)
    if new_kv is not None and (tile_n is not None or (num_splits or 1) != 1 or fused_store_plan(
            q, *new_kv, kv_cache, out, max_query_len=max_query_len, sliding_window=sliding_window,
            logits_soft_cap=logits_soft_cap, alibi_slopes=alibi_slopes) is None):
        raise ValueError("new_kv is only for a step fused_store_plan accepts (store_kv skipped its chunks)")
    if q.shape[0] == 0 or seq_lens.shape[0] == 0:
        return out.zero_()
    if tile_n is None and _takes_gluon_prefill(q, kv_cache, out, max_query_len, sliding_window, logits_soft_cap,
                                               alibi_slopes, num_splits):
        check_scale(scale)
        k, v = new_kv or (None, None)
        gluon_prefill.prefill_attention(q, kv_cache, query_start_loc, seq_lens, block_table, out, scale=scale, k=k,
                                        v=v)
        with _jit.launching(globals()):
            for attn, reduce in _short_seqs_plans(q, kv_cache, query_start_loc, seq_lens, block_table, out,
                                                  scale=scale, k_scale=k_scale, v_scale=v_scale):
                launch_planned(_paged_attention_kernel, attn, reduce)
        return out
    attn, reduce = _launch_plan(
        q, kv_cache, query_start_loc, seq_lens, block_table, out, max_query_len=max_query_len, scale=scale,
        sliding_window=sliding_window, logits_soft_cap=logits_soft_cap, alibi_slopes=alibi_slopes,
        k_scale=k_scale, v_scale=v_scale, num_splits=num_splits, tile_n=tile_n)
    with _jit.launching(globals()):
        launch_planned(_paged_attention_kernel, attn, reduce)
    return out


def paged_attention_reference(
    q, kv_cache, query_start_loc, seq_lens, block_table, out=None, *, max_query_len, scale,
    sliding_window=None, logits_soft_cap=None, alibi_slopes=None, k_scale, v_scale, **_ignored,
) -> torch.Tensor:
    """The same result from the reference backend's PyTorch code (fp32 math, output in q's dtype)."""
    from ..backends.reference import reference_attention
    from ..metadata import AttentionMetadata

    slots = torch.full((q.shape[0],), -1, dtype=torch.int64, device=q.device)
    meta = AttentionMetadata(query_start_loc, seq_lens, block_table, slots, max_query_len)
    result = reference_attention(
        q, kv_cache, meta, scale=scale, sliding_window=sliding_window, logits_soft_cap=logits_soft_cap,
        alibi_slopes=alibi_slopes, k_scale=k_scale, v_scale=v_scale).to(q.dtype)
    if out is not None:
        out.copy_(result)
        return out
    return result


# ---- op registration (see store_kv.py for the CUDA / interpreter split) ---------------------


@torch.library.custom_op("compiled_attn::_triton_paged_attention_opaque", mutates_args=("out",))
def _paged_attention_opaque(
    q: torch.Tensor, kv_cache: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
    block_table: torch.Tensor, out: torch.Tensor, k_scale: torch.Tensor, v_scale: torch.Tensor,
    alibi_slopes: torch.Tensor | None, scale: float, sliding_window: int, logits_soft_cap: float,
    max_query_len: int, num_splits: int,
) -> None:
    paged_attention(
        q, kv_cache, query_start_loc, seq_lens, block_table, out, max_query_len=max_query_len, scale=scale,
        sliding_window=sliding_window, logits_soft_cap=logits_soft_cap, alibi_slopes=alibi_slopes,
        k_scale=k_scale, v_scale=v_scale, num_splits=num_splits)


@_paged_attention_opaque.register_fake
def _(q, kv_cache, query_start_loc, seq_lens, block_table, out, k_scale, v_scale, alibi_slopes, scale,
      sliding_window, logits_soft_cap, max_query_len, num_splits) -> None:
    return None


@torch.library.custom_op("compiled_attn::_gluon_prefill_attention", mutates_args=("out",))
def _gluon_prefill_opaque(
    q: torch.Tensor, kv_cache: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
    block_table: torch.Tensor, out: torch.Tensor, scale: float,
) -> None:
    # Opaque to torch.compile: inductor's handling of user Triton kernels does not cover Gluon's.
    gluon_prefill.prefill_attention(q, kv_cache, query_start_loc, seq_lens, block_table, out, scale=scale)


@_gluon_prefill_opaque.register_fake
def _(q, kv_cache, query_start_loc, seq_lens, block_table, out, scale) -> None:
    return None


@torch.library.triton_op("compiled_attn::triton_paged_attention", mutates_args=("out",))
def triton_paged_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
    block_table: torch.Tensor, out: torch.Tensor, k_scale: torch.Tensor, v_scale: torch.Tensor,
    alibi_slopes: torch.Tensor | None, scale: float, sliding_window: int, logits_soft_cap: float,
    max_query_len: int, num_splits: int,
) -> None:
    """``torch.ops.compiled_attn.triton_paged_attention``: :func:`paged_attention` as an operator
    (0 = no window / no soft-cap / automatic split count)."""
    check_attention_args(q, kv_cache, query_start_loc, seq_lens, block_table, out)
    if q.device.type != "cuda" or _jit.interpreting() or q.shape[0] == 0 or seq_lens.shape[0] == 0:
        torch.ops.compiled_attn._triton_paged_attention_opaque(
            q, kv_cache, query_start_loc, seq_lens, block_table, out, k_scale, v_scale, alibi_slopes, scale,
            sliding_window, logits_soft_cap, max_query_len, num_splits)
        return
    if _takes_gluon_prefill(q, kv_cache, out, max_query_len, sliding_window, logits_soft_cap, alibi_slopes,
                            num_splits):
        check_scale(scale)
        torch.ops.compiled_attn._gluon_prefill_attention(q, kv_cache, query_start_loc, seq_lens, block_table, out,
                                                          scale)
        _jit.refresh(globals())
        for attn, reduce in _short_seqs_plans(q, kv_cache, query_start_loc, seq_lens, block_table, out,
                                              scale=scale, k_scale=k_scale, v_scale=v_scale):
            launch_planned(_paged_attention_kernel, attn, reduce, torch.library.wrap_triton)
        return
    _jit.refresh(globals())
    attn, reduce = _launch_plan(
        q, kv_cache, query_start_loc, seq_lens, block_table, out, max_query_len=max_query_len, scale=scale,
        sliding_window=sliding_window, logits_soft_cap=logits_soft_cap, alibi_slopes=alibi_slopes,
        k_scale=k_scale, v_scale=v_scale, num_splits=num_splits, tile_n=None)
    launch_planned(_paged_attention_kernel, attn, reduce, torch.library.wrap_triton)
