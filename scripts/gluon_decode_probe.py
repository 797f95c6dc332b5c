"""Paged decode in Gluon for Hopper, streamed: can a TMA producer warp feeding one wgmma consumer
warpgroup, with the whole step's key tiles dealt out evenly to one program an SM, read the cache
faster than dense cuDNN? A diagnostic for the last decode goal; GPU only, not part of the package.

    python scripts/gluon_decode_probe.py --json out/gluon_decode_probe.json

The step's work is a list of key tiles: sequence by sequence, KV head by KV head, ``BLOCK_N`` keys
a tile. Program ``p`` of ``P`` takes tiles ``[p*T//P, (p+1)*T//P)``, so every program reads the same
bytes whatever the batch's lengths (no waves, no splits chosen per shape). A (sequence, KV head)
whose tiles one program holds is written to ``out`` directly; one cut between programs leaves each
part's unnormalised output, row max and row sum in a workspace, merged by a second (Triton) kernel.
In a program, a producer warp loads K/V tiles through a ring of ``STAGES`` buffers (one TMA copy a
page, running from one (sequence, KV head) into the next); the consumer warpgroup loads the query
heads of the KV head (``G`` rows of a 64-row wgmma tile), and runs each tile's Q·K^T, softmax and
P·V. The benchmark's decode shapes run beside our backends and dense cuDNN SDPA in the same process,
on the benchmark's own workloads (graph-replayed, pools over L2), each output checked against the
``reference`` backend's.

The ``page mma`` variants (:func:`_page_decode_kernel`, head-major caches) deal whole pages instead:
one TMA copy a page for K and one for V, every KV head's 16 keys at once, and eight consumer warps,
one a KV head, each running its query heads against its keys in ``mma.sync`` tiles of 16 rows.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from compiled_attn.kernels.gluon_prefill import _load_pages as _load_token_major_tile
from compiled_attn.kernels.gluon_prefill import _zero_tail_rows, tma_load
from compiled_attn.split_kv import num_sms

LOG2E = 1.4426950408889634
# A barrier among one partition's warps (renamed in Triton 3.7).
_partition_barrier = gl.barrier if hasattr(gl, "barrier") else gl.thread_barrier
M = gl.constexpr(64)  # rows of a wgmma tile: the G query heads of a KV head, the rest zeros


@gluon.jit
def _program_range(total_tiles):
    """This program's share ``[start, end)`` of the step's tiles, dealt evenly: the one split the
    producers, the consumers and the merge's ``p_lo``/``p_hi`` arithmetic all assume."""
    pid = gl.program_id(0).to(gl.int64)
    start = (pid * total_tiles // gl.num_programs(0)).to(gl.int32)
    end = ((pid + 1) * total_tiles // gl.num_programs(0)).to(gl.int32)
    return start, end


@gluon.jit
def _find_seq(cu_tiles_ptr, num_seqs, t, KVH: gl.constexpr):
    """The last sequence ``s`` whose first tile ``cu_tiles[s] * KVH`` is at most ``t``."""
    lo: gl.int32 = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if gl.load(cu_tiles_ptr + mid) * KVH <= t:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@gluon.jit
def _segment(t, end, cu_tiles_ptr, seq_lens_ptr, num_seqs, KVH: gl.constexpr):
    """The run of tiles from ``t`` that one (sequence, KV head) holds, up to ``end``: its sequence,
    KV head, first tile within the pair, tile count, length, and whether the run is the whole pair."""
    seq = _find_seq(cu_tiles_ptr, num_seqs, t, KVH)
    first = gl.load(cu_tiles_ptr + seq)
    n = gl.load(cu_tiles_ptr + seq + 1) - first
    kvh = (t - first * KVH) // n
    j0 = t - first * KVH - kvh * n
    pair_end = first * KVH + (kvh + 1) * n
    count = gl.minimum(end, pair_end) - t
    seq_len = gl.load(seq_lens_ptr + seq)
    return seq, kvh, j0, count, seq_len, (j0 == 0) & (count == n)


@gluon.jit
def _load_tile(desc, smem, bar, bt_row_ptr, key0, seq_len, kvh, BLOCK_N: gl.constexpr, PAGE: gl.constexpr,
               KVH: gl.constexpr, HEAD_MAJOR: gl.constexpr):
    """Keys ``[key0, key0 + BLOCK_N)`` of KV head ``kvh`` into ``smem``, one copy a page; keys past the
    sequence read page 0. Token-major pages are rows ``[blocks * PAGE, KVH * D]`` (the package's
    loader), head-major ones ``[blocks * KVH * PAGE, D]``."""
    BOX: gl.constexpr = desc.block_type.shape[0]
    D: gl.constexpr = desc.block_type.shape[1]
    if HEAD_MAJOR:
        mbarrier.expect(bar, BLOCK_N * desc.block_type.nbytes // BOX)
        for i in gl.static_range(BLOCK_N // BOX):
            key = key0 + i * BOX
            page = gl.load(bt_row_ptr + key // PAGE, mask=key < seq_len, other=0)
            tma_load(desc, [(page * KVH + kvh) * PAGE + key % PAGE, 0], bar, smem.slice(i * BOX, BOX))
    else:
        _load_token_major_tile(desc, smem, bar, bt_row_ptr, key0, seq_len, kvh * D, BLOCK_N, PAGE)


@gluon.jit
def _producer(k_desc, v_desc, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, tail_bar, cu_tiles_ptr,
              seq_lens_ptr, block_table_ptr, num_seqs, total_tiles, s_bt, KVH: gl.constexpr, D: gl.constexpr,
              BLOCK_N: gl.constexpr, PAGE: gl.constexpr, STAGES: gl.constexpr, HEAD_MAJOR: gl.constexpr):
    """One warp: every tile of the program's range into the ring, V tails zeroed (0 x NaN is NaN)."""
    start, end = _program_range(total_tiles)
    tile = 0
    tails = 0
    t = start
    while t < end:
        seq, kvh, j0, count, seq_len, whole = _segment(t, end, cu_tiles_ptr, seq_lens_ptr, num_seqs, KVH)
        bt_row_ptr = block_table_ptr + seq.to(gl.int64) * s_bt
        for i in range(count):
            j = j0 + i
            stage = tile % STAGES
            free_phase = ((tile // STAGES) & 1) ^ 1
            mbarrier.wait(k_empty.index(stage), free_phase)
            _load_tile(k_desc, k_smem.index(stage), k_ready.index(stage), bt_row_ptr, j * BLOCK_N, seq_len, kvh,
                       BLOCK_N, PAGE, KVH, HEAD_MAJOR)
            mbarrier.wait(v_empty.index(stage), free_phase)
            tail = seq_len - j * BLOCK_N
            if tail < BLOCK_N:
                _load_tile(v_desc, v_smem.index(stage), tail_bar, bt_row_ptr, j * BLOCK_N, seq_len, kvh,
                           BLOCK_N, PAGE, KVH, HEAD_MAJOR)
                mbarrier.wait(tail_bar, tails & 1)
                tails += 1
                _zero_tail_rows(v_smem.index(stage), tail, BLOCK_N)
                fence_async_shared()
                mbarrier.arrive(v_ready.index(stage))
            else:
                _load_tile(v_desc, v_smem.index(stage), v_ready.index(stage), bt_row_ptr, j * BLOCK_N, seq_len,
                           kvh, BLOCK_N, PAGE, KVH, HEAD_MAJOR)
            tile += 1
        t += count


@gluon.jit
def _consumer(q_ptr, out_ptr, part_o_ptr, part_ml_ptr, q_smem, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty,
              cu_tiles_ptr, seq_lens_ptr, num_seqs, total_tiles, qk_scale, s_qt, s_ot, G: gl.constexpr,
              KVH: gl.constexpr, D: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
              COMPUTE: gl.constexpr, PAGE_KVH: gl.constexpr):
    """One warpgroup: each run of tiles' attention for the G query heads of its KV head; a whole
    pair's result into ``out``, a part's (unnormalised, with its row max and sum) into the workspace
    slot of the program's first run (0) or a later one (1). ``COMPUTE`` False: the tiles are only
    waited for and released (what the loads alone take; the output is not written). ``PAGE_KVH`` > 0:
    tiles are whole token-major pages, their rows ``PAGE_KVH`` KV heads interleaved, and the G query
    heads are all of the sequence's (the KV head a row of rows' loop is 0)."""
    dtype: gl.constexpr = q_smem.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    io_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    io_rows = gl.arange(0, M, layout=gl.SliceLayout(1, io_layout))
    io_cols = gl.arange(0, D, layout=gl.SliceLayout(0, io_layout))
    io_mask = gl.expand_dims(io_rows < G, 1)
    zero_s = gl.zeros([M, BLOCK_N], gl.float32, layout=s_layout)
    pid = gl.program_id(0).to(gl.int64)  # its parts' slots
    start, end = _program_range(total_tiles)
    tile = 0
    t = start
    while t < end:
        seq, kvh, j0, count, seq_len, whole = _segment(t, end, cu_tiles_ptr, seq_lens_ptr, num_seqs, KVH)
        head_rows = gl.expand_dims(kvh * G + io_rows, 1) * D + gl.expand_dims(io_cols, 0)
        q = gl.load(q_ptr + seq.to(gl.int64) * s_qt + head_rows, mask=io_mask, other=0.0)
        q_smem.store(q)
        fence_async_shared()
        m_i = gl.full([M], float("-inf"), gl.float32, layout=row_layout)
        l_i = gl.zeros([M], gl.float32, layout=row_layout)
        acc = gl.zeros([M, D], gl.float32, layout=o_layout)
        for i in range(count):
            j = j0 + i
            stage = tile % STAGES
            phase = (tile // STAGES) & 1
            mbarrier.wait(k_ready.index(stage), phase)
            if COMPUTE:
                s = warpgroup_mma(q_smem, k_smem.index(stage).permute((1, 0)), zero_s, use_acc=False,
                                  is_async=True)
                s = warpgroup_mma_wait(0, deps=(s, ))
                mbarrier.arrive(k_empty.index(stage))
                if PAGE_KVH > 0:  # whole pages: each query head sees its own KV head's rows
                    keys = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
                    q_heads = gl.arange(0, M, layout=row_layout)
                    own = gl.expand_dims(keys % PAGE_KVH, 0) == gl.expand_dims(q_heads // (G // PAGE_KVH), 1)
                    s = gl.where(own & gl.expand_dims(keys < seq_len, 0), s, float("-inf"))
                elif (j + 1) * BLOCK_N > seq_len:
                    keys = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
                    s = gl.where(gl.expand_dims(keys < seq_len, 0), s, float("-inf"))
                m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
                p = gl.exp2(s * qk_scale - gl.expand_dims(m_new, 1))
                alpha = gl.exp2(m_i - m_new)
                l_i = l_i * alpha + gl.sum(p, 1)
                m_i = m_new
                acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
                p_op = gl.convert_layout(p.to(dtype), p_layout)
                mbarrier.wait(v_ready.index(stage), phase)
                acc = warpgroup_mma(p_op, v_smem.index(stage), acc, is_async=True)
                acc = warpgroup_mma_wait(0, deps=(acc, ))
            else:
                mbarrier.arrive(k_empty.index(stage))
                mbarrier.wait(v_ready.index(stage), phase)
            mbarrier.arrive(v_empty.index(stage))
            tile += 1
        if not COMPUTE:
            pass
        elif whole:
            l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
            o_final = gl.convert_layout((acc / gl.expand_dims(l_o, 1)).to(dtype), io_layout)
            gl.store(out_ptr + seq.to(gl.int64) * s_ot + head_rows, o_final, mask=io_mask)
        else:
            slot = (pid * 2 + (t != start).to(gl.int64)) * G
            o_part = gl.convert_layout(acc, io_layout)
            gl.store(part_o_ptr + slot * D + gl.expand_dims(io_rows, 1) * D + gl.expand_dims(io_cols, 0), o_part,
                     mask=io_mask)
            ml_rows = gl.arange(0, M, layout=row_layout)
            gl.store(part_ml_ptr + (slot + ml_rows) * 2, m_i, mask=ml_rows < G)
            gl.store(part_ml_ptr + (slot + ml_rows) * 2 + 1, l_i, mask=ml_rows < G)
        t += count


@gluon.jit
def _kv_ring(k_desc, v_desc, ROWS: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr):
    """The K/V ring of a decode kernel: ``STAGES`` slots of ``ROWS`` rows each for K and V, their
    ready and empty barriers (one producer, one consumer partition), and the barrier a tail tile
    lands on before its rows past the sequence are zeroed."""
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES, ROWS, D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES, ROWS, D], v_desc.layout)
    tail_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(tail_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=1)
        mbarrier.init(v_empty.index(i), count=1)
    return k_smem, v_smem, tail_bar, k_ready, k_empty, v_ready, v_empty


@gluon.jit
def _decode_kernel(q_ptr, k_desc, v_desc, out_ptr, part_o_ptr, part_ml_ptr, cu_tiles_ptr, seq_lens_ptr,
                   block_table_ptr, num_seqs, total_tiles, qk_scale, s_qt, s_ot, s_bt, G: gl.constexpr,
                   KVH: gl.constexpr, D: gl.constexpr, BLOCK_N: gl.constexpr, PAGE: gl.constexpr,
                   STAGES: gl.constexpr, HEAD_MAJOR: gl.constexpr, COMPUTE: gl.constexpr,
                   PAGE_KVH: gl.constexpr, PRODUCER_REGS: gl.constexpr):
    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([M, D], k_desc.dtype)
    q_smem = gl.allocate_shared_memory(k_desc.dtype, [M, D], q_layout)
    k_smem, v_smem, tail_bar, k_ready, k_empty, v_ready, v_empty = _kv_ring(k_desc, v_desc, BLOCK_N, D, STAGES)
    gl.warp_specialize([
        (_consumer, (q_ptr, out_ptr, part_o_ptr, part_ml_ptr, q_smem, k_smem, v_smem, k_ready, k_empty, v_ready,
                     v_empty, cu_tiles_ptr, seq_lens_ptr, num_seqs, total_tiles, qk_scale, s_qt, s_ot, G, KVH, D,
                     BLOCK_N, STAGES, COMPUTE, PAGE_KVH)),
        (_producer, (k_desc, v_desc, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, tail_bar, cu_tiles_ptr,
                     seq_lens_ptr, block_table_ptr, num_seqs, total_tiles, s_bt, KVH, D, BLOCK_N, PAGE, STAGES,
                     HEAD_MAJOR)),
    ], [1], [PRODUCER_REGS])


@gluon.jit
def _zero_page_tails(tile, tail, PAGE: gl.constexpr, KVH: gl.constexpr):
    """Zeros into each KV head's rows of tokens ``[tail, PAGE)`` of a head-major page
    (``[KVH * PAGE, D]``), 8 rows at a time, by one warp."""
    CHUNK: gl.constexpr = 8
    COLS: gl.constexpr = min(tile.shape[1], 128)
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [1, 1], [1, 0])
    for c in gl.static_range(KVH * PAGE // CHUNK):
        if (c * CHUNK) % PAGE + CHUNK > tail:
            toks = (c * CHUNK) % PAGE + gl.arange(0, CHUNK, layout=gl.SliceLayout(1, layout))
            for h in gl.static_range(tile.shape[1] // COLS):
                chunk = tile.slice(c * CHUNK, CHUNK).slice(h * COLS, COLS, dim=1)
                x = chunk.load(layout)
                chunk.store(gl.where(gl.expand_dims(toks < tail, 1), x, gl.zeros_like(x)))


@gluon.jit
def _page_producer(k_desc, v_desc, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, tail_bar, cu_tiles_ptr,
                   seq_lens_ptr, block_table_ptr, num_seqs, total_tiles, s_bt, KVH: gl.constexpr,
                   PAGE: gl.constexpr, STAGES: gl.constexpr):
    """One warp: the program's range of whole head-major pages into the ring, one copy each for K
    and V; a sequence's last V page has every head's rows past the sequence zeroed."""
    ROWS: gl.constexpr = KVH * PAGE
    start, end = _program_range(total_tiles)
    tile = 0
    tails = 0
    t = start
    seq = _find_seq(cu_tiles_ptr, num_seqs, start, 1)  # later segments: the next sequence
    while t < end:
        j0 = t - gl.load(cu_tiles_ptr + seq)
        count = gl.minimum(end, gl.load(cu_tiles_ptr + seq + 1)) - t
        seq_len = gl.load(seq_lens_ptr + seq)
        bt_row_ptr = block_table_ptr + seq.to(gl.int64) * s_bt
        for i in range(count):
            j = j0 + i
            stage = tile % STAGES
            free_phase = ((tile // STAGES) & 1) ^ 1
            mbarrier.wait(k_empty.index(stage), free_phase)
            _load_token_major_tile(k_desc, k_smem.index(stage), k_ready.index(stage), bt_row_ptr, j * ROWS, seq_len,
                                   0, ROWS, ROWS)
            mbarrier.wait(v_empty.index(stage), free_phase)
            tail = seq_len // KVH - j * PAGE
            if tail < PAGE:
                _load_token_major_tile(v_desc, v_smem.index(stage), tail_bar, bt_row_ptr, j * ROWS, seq_len, 0,
                                       ROWS, ROWS)
                mbarrier.wait(tail_bar, tails & 1)
                tails += 1
                _zero_page_tails(v_smem.index(stage), tail, PAGE, KVH)
                fence_async_shared()
                mbarrier.arrive(v_ready.index(stage))
            else:
                _load_token_major_tile(v_desc, v_smem.index(stage), v_ready.index(stage), bt_row_ptr, j * ROWS,
                                       seq_len, 0, ROWS, ROWS)
            tile += 1
        t += count
        seq += 1


@gluon.jit
def _page_consumer(q_ptr, out_ptr, part_o_ptr, part_ml_ptr, sem_ptr, k_smem, v_smem, k_ready, k_empty, v_ready,
                   v_empty, cu_tiles_ptr, seq_lens_ptr, num_seqs, total_tiles, qk_scale, s_qt, s_ot,
                   G: gl.constexpr, KVH: gl.constexpr, D: gl.constexpr, PAGE: gl.constexpr, STAGES: gl.constexpr,
                   NUM_WARPS: gl.constexpr, EARLY: gl.constexpr, FUSED_MERGE: gl.constexpr):
    """A warp a KV head (``NUM_WARPS == KVH``): each whole page's 16 keys of its head against its
    G query heads (rows of a 16-row mma.sync tile, the rest zeros), in registers; results as
    :func:`_consumer` writes them (``G * KVH`` rows a part). ``EARLY``: the next sequence's query
    is loaded while this one runs, and a page's K and V leave their slots together, before the
    math. ``FUSED_MERGE``: the last program to write a part of a sequence merges its parts."""
    GP: gl.constexpr = 16
    dtype: gl.constexpr = k_smem.dtype
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[NUM_WARPS, 1, 1],
                                                  instr_shape=[1, 16, 8])
    a_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    b_op: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    io: gl.constexpr = gl.BlockedLayout([1, 1, 8], [1, 2, 16], [NUM_WARPS, 1, 1], [2, 1, 0])
    stat: gl.constexpr = gl.SliceLayout(2, mma)
    io_stat: gl.constexpr = gl.SliceLayout(2, io)
    h_io = gl.arange(0, KVH, layout=gl.SliceLayout(1, io_stat))
    r_io = gl.arange(0, GP, layout=gl.SliceLayout(0, io_stat))
    c_io = gl.arange(0, D, layout=gl.SliceLayout(0, gl.SliceLayout(1, io)))
    row_io = gl.expand_dims(h_io, 1) * G + gl.expand_dims(r_io, 0)
    offs = gl.expand_dims(row_io, 2) * D + gl.expand_dims(gl.expand_dims(c_io, 0), 1)
    io_mask = (gl.expand_dims(gl.expand_dims(r_io, 0), 2) < G) & (offs >= 0)
    row_io_mask = (gl.expand_dims(r_io, 0) < G) & (row_io >= 0)
    h_s = gl.arange(0, KVH, layout=gl.SliceLayout(1, stat))
    r_s = gl.arange(0, GP, layout=gl.SliceLayout(0, stat))
    row_s = gl.expand_dims(h_s, 1) * G + gl.expand_dims(r_s, 0)
    stat_mask = (gl.expand_dims(r_s, 0) < G) & (row_s >= 0)
    page_keys = gl.arange(0, PAGE, layout=gl.SliceLayout(0, gl.SliceLayout(1, mma)))
    zero_s = gl.zeros([KVH, GP, PAGE], gl.float32, layout=mma)
    num_programs = gl.num_programs(0)
    pid = gl.program_id(0).to(gl.int64)  # its parts' slots
    start, end = _program_range(total_tiles)
    tile = 0
    t = start
    seq = _find_seq(cu_tiles_ptr, num_seqs, start, 1)  # later segments: the next sequence
    q = gl.load(q_ptr + seq.to(gl.int64) * s_qt + offs, mask=io_mask & EARLY, other=0.0)
    while t < end:
        first = gl.load(cu_tiles_ptr + seq)
        seq_end = gl.load(cu_tiles_ptr + seq + 1)
        j0 = t - first
        count = gl.minimum(end, seq_end) - t
        whole = (j0 == 0) & (seq_end <= end)
        true_len = gl.load(seq_lens_ptr + seq) // KVH
        if not EARLY:
            q = gl.load(q_ptr + seq.to(gl.int64) * s_qt + offs, mask=io_mask, other=0.0)
        q_op = gl.convert_layout(q, a_op)
        if EARLY:  # the next segment's query (its sequence, if any, is the next one)
            q = gl.load(q_ptr + (seq + 1).to(gl.int64) * s_qt + offs, mask=io_mask & (t + count < end), other=0.0)
        m_i = gl.full([KVH, GP], float("-inf"), gl.float32, layout=stat)
        l_i = gl.zeros([KVH, GP], gl.float32, layout=stat)
        acc = gl.zeros([KVH, GP, D], gl.float32, layout=mma)
        for i in range(count):
            j = j0 + i
            stage = tile % STAGES
            phase = (tile // STAGES) & 1
            mbarrier.wait(k_ready.index(stage), phase)
            k_t = k_smem.index(stage).reshape([KVH, PAGE, D]).permute((0, 2, 1)).load(b_op)
            if EARLY:
                mbarrier.wait(v_ready.index(stage), phase)
                v = v_smem.index(stage).reshape([KVH, PAGE, D]).load(b_op)
                _partition_barrier()  # every warp's reads before the slots are released
                mbarrier.arrive(k_empty.index(stage))
                mbarrier.arrive(v_empty.index(stage))
            else:
                _partition_barrier()
                mbarrier.arrive(k_empty.index(stage))
            s = mma_v2(q_op, k_t, zero_s)
            if (j + 1) * PAGE > true_len:
                keys = j * PAGE + page_keys
                s = gl.where(gl.expand_dims(gl.expand_dims(keys < true_len, 0), 1), s, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(s, 2) * qk_scale)
            p = gl.exp2(s * qk_scale - gl.expand_dims(m_new, 2))
            alpha = gl.exp2(m_i - m_new)
            l_i = l_i * alpha + gl.sum(p, 2)
            m_i = m_new
            if not EARLY:
                mbarrier.wait(v_ready.index(stage), phase)
                v = v_smem.index(stage).reshape([KVH, PAGE, D]).load(b_op)
                _partition_barrier()
                mbarrier.arrive(v_empty.index(stage))
            acc = mma_v2(gl.convert_layout(p.to(dtype), a_op), v, acc * gl.expand_dims(alpha, 2))
            tile += 1
        if whole:
            o = gl.convert_layout((acc / gl.expand_dims(l_i, 2)).to(dtype), io)
            gl.store(out_ptr + seq.to(gl.int64) * s_ot + offs, o, mask=io_mask)
        else:
            slot = (pid * 2 + (t != start).to(gl.int64)) * (KVH * G)
            gl.store(part_o_ptr + slot * D + offs, gl.convert_layout(acc, io), mask=io_mask)
            gl.store(part_ml_ptr + (slot + row_s) * 2, m_i, mask=stat_mask)
            gl.store(part_ml_ptr + (slot + row_s) * 2 + 1, l_i, mask=stat_mask)
            if FUSED_MERGE:
                _partition_barrier()  # every warp's part is written before the program counts itself
                arrived = gl.atomic_add(sem_ptr + seq, 1, sem="acq_rel", scope="gpu")
                ts = first.to(gl.int64)
                p_lo = ((ts + 1) * num_programs - 1) // total_tiles
                p_hi = ((seq_end.to(gl.int64)) * num_programs - 1) // total_tiles
                if arrived == p_hi - p_lo:
                    m = gl.full([KVH, GP], float("-inf"), gl.float32, layout=io_stat)
                    l = gl.zeros([KVH, GP], gl.float32, layout=io_stat)
                    o_acc = gl.zeros([KVH, GP, D], gl.float32, layout=io)
                    for pp in range(p_lo, p_hi + 1):
                        later = (pp == p_lo) & (pp * total_tiles // num_programs < ts)
                        part = (pp * 2 + later.to(gl.int64)) * (KVH * G)
                        m_p = gl.load(part_ml_ptr + (part + row_io) * 2, mask=row_io_mask, other=float("-inf"))
                        l_p = gl.load(part_ml_ptr + (part + row_io) * 2 + 1, mask=row_io_mask, other=0.0)
                        o_p = gl.load(part_o_ptr + part * D + offs, mask=io_mask, other=0.0)
                        m_new = gl.maximum(gl.maximum(m, m_p), -1e30)
                        a = gl.exp2(m - m_new)
                        b = gl.exp2(m_p - m_new)
                        o_acc = o_acc * gl.expand_dims(a, 2) + o_p * gl.expand_dims(b, 2)
                        l = l * a + l_p * b
                        m = m_new
                    o = (o_acc / gl.expand_dims(gl.where(l == 0.0, 1.0, l), 2)).to(dtype)
                    gl.store(out_ptr + seq.to(gl.int64) * s_ot + offs, o, mask=io_mask)
                    gl.atomic_xchg(sem_ptr + seq, 0)
        t += count
        seq += 1


@gluon.jit
def _page_decode_kernel(q_ptr, k_desc, v_desc, out_ptr, part_o_ptr, part_ml_ptr, cu_tiles_ptr, seq_lens_ptr,
                        block_table_ptr, num_seqs, total_tiles, qk_scale, s_qt, s_ot, s_bt, sem_ptr, G: gl.constexpr,
                        KVH: gl.constexpr, D: gl.constexpr, PAGE: gl.constexpr, STAGES: gl.constexpr,
                        PRODUCER_REGS: gl.constexpr, NUM_WARPS: gl.constexpr, EARLY: gl.constexpr,
                        FUSED_MERGE: gl.constexpr):
    """Whole head-major pages (every KV head's 16 keys in one 32 KB copy), the math in mma.sync
    tiles a KV head, a warp each: the probe of the kernel a page-reading decode would be."""
    ROWS: gl.constexpr = KVH * PAGE
    k_smem, v_smem, tail_bar, k_ready, k_empty, v_ready, v_empty = _kv_ring(k_desc, v_desc, ROWS, D, STAGES)
    gl.warp_specialize([
        (_page_consumer, (q_ptr, out_ptr, part_o_ptr, part_ml_ptr, sem_ptr, k_smem, v_smem, k_ready, k_empty,
                          v_ready, v_empty, cu_tiles_ptr, seq_lens_ptr, num_seqs, total_tiles, qk_scale, s_qt, s_ot,
                          G, KVH, D, PAGE, STAGES, NUM_WARPS, EARLY, FUSED_MERGE)),
        (_page_producer, (k_desc, v_desc, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, tail_bar,
                          cu_tiles_ptr, seq_lens_ptr, block_table_ptr, num_seqs, total_tiles, s_bt, KVH, PAGE,
                          STAGES)),
    ], [1], [PRODUCER_REGS])


@triton.jit
def _merge_parts(part_o_ptr, part_ml_ptr, out_ptr, cu_tiles_ptr, total_tiles, num_programs, s_ot,
                 KVH: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr):
    """One (sequence, KV head) a program: where its tiles were cut between programs, the parts merged
    into ``out``. Program ``p`` holds tile ``t`` where ``p == ((t + 1) * P - 1) // T``."""
    pair = tl.program_id(0)
    seq = pair // KVH
    kvh = pair % KVH
    first = tl.load(cu_tiles_ptr + seq)
    n = tl.load(cu_tiles_ptr + seq + 1) - first
    ts = (first * KVH + kvh * n).to(tl.int64)
    p_lo = ((ts + 1) * num_programs - 1) // total_tiles
    p_hi = ((ts + n) * num_programs - 1) // total_tiles
    if (n > 0) & (p_hi > p_lo):
        rows = tl.arange(0, GP)
        cols = tl.arange(0, D)
        row_ok = rows < G
        m = tl.full((GP,), float("-inf"), tl.float32)
        l = tl.zeros((GP,), tl.float32)
        acc = tl.zeros((GP, D), tl.float32)
        for p in range(p_lo, p_hi + 1):
            later = (p == p_lo) & (p * total_tiles // num_programs < ts)  # the pair is p_lo's later run
            slot = (p * 2 + later.to(tl.int64)) * G + rows
            m_p = tl.load(part_ml_ptr + slot * 2, mask=row_ok, other=float("-inf"))
            l_p = tl.load(part_ml_ptr + slot * 2 + 1, mask=row_ok, other=0.0)
            o_p = tl.load(part_o_ptr + slot[:, None] * D + cols[None, :], mask=row_ok[:, None], other=0.0)
            m_new = tl.maximum(tl.maximum(m, m_p), -1e30)
            a, b = tl.exp2(m - m_new), tl.exp2(m_p - m_new)
            acc = acc * a[:, None] + o_p * b[:, None]
            l = l * a + l_p * b
            m = m_new
        out = acc / l[:, None]
        tl.store(out_ptr + seq.to(tl.int64) * s_ot + (kvh * G + rows)[:, None] * D + cols[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


VARIANTS = {
    "n128_s2": dict(block_n=128, stages=2),
    "n128_s3": dict(block_n=128, stages=3),
    "n64_s4": dict(block_n=64, stages=4),
    "n128_s2 loads only": dict(block_n=128, stages=2, compute=False),
    "n128_s3 loads only": dict(block_n=128, stages=3, compute=False),
    "n64_s4 loads only": dict(block_n=64, stages=4, compute=False),
    "n64_s2 2/SM": dict(block_n=64, stages=2, programs_per_sm=2),
    "n64_s2 2/SM loads only": dict(block_n=64, stages=2, programs_per_sm=2, compute=False),
    # A token-major page holds every KV head's rows of its tokens, 32 KB in one piece at the
    # benchmark's shape: read whole, one copy a page, as a kernel serving all the heads of a
    # sequence would read it (its tiles are pages; loads only).
    "whole pages s2": dict(block_n=128, stages=2, whole_pages=True),
    "whole pages s3": dict(block_n=128, stages=3, whole_pages=True),
    "whole pages s2 loads only": dict(block_n=128, stages=2, compute=False, whole_pages=True),
    "whole pages s3 loads only": dict(block_n=128, stages=3, compute=False, whole_pages=True),
    # Head-major pages read whole, each KV head's keys of a page against its query heads in mma.sync
    # tiles of 16 rows, a warp a KV head: a quarter of the products of one 64-row wgmma tile over the
    # page, and no product across heads.
    "page mma s2": dict(block_n=128, stages=2, whole_pages=True, page_mma=True),
    "page mma s3": dict(block_n=128, stages=3, whole_pages=True, page_mma=True),
    "page mma early s2": dict(block_n=128, stages=2, whole_pages=True, page_mma=True, early=True),
    "page mma early fused s2": dict(block_n=128, stages=2, whole_pages=True, page_mma=True, early=True,
                                    fused_merge=True),
    "page mma fused s2": dict(block_n=128, stages=2, whole_pages=True, page_mma=True, fused_merge=True),
}
# Cache memory orders: (head-major pages, each sequence's pages in order). The last is laid out as a
# dense cache is, [KV head, context, D] runs of one sequence.
LAYOUTS = {"token-major shuffled": (False, False), "head-major shuffled": (True, False),
           "head-major in order": (True, True)}
# The probe also reads the dense tensors cuDNN reads ([B, KVH, context, D] each), as one head-major
# page a sequence (uniform batches only): the same bytes, in cuDNN's memory order.
DENSE = "dense as cuDNN"


class GluonDecode:
    """The probe's decode over one step: host-side plan (tile prefix sums, the workspace) and launches."""

    def __init__(self, q, kv_cache, seq_lens_cpu: list[int], block_table, out, *, block_n: int = 128,
                 stages: int = 3, programs_per_sm: int = 1, compute: bool = True, producer_regs: int = 40,
                 whole_pages: bool = False, page_mma: bool = False, early: bool = False, fused_merge: bool = False):
        num_seqs, heads, d = q.shape
        _, blocks, page, kvh, _ = kv_cache.shape
        page_kvh = kvh if whole_pages else 0
        self.page_mma = page_mma
        if page_mma:  # head-major pages read whole: [KVH, PAGE, D] in one copy
            by_head = kv_cache.permute(0, 1, 3, 2, 4)
            assert page * kvh == block_n and by_head.is_contiguous(), "head-major pages"
            page_constexprs = dict(G=heads // kvh, KVH=kvh, D=d, PAGE=page, STAGES=stages,
                                   PRODUCER_REGS=producer_regs, NUM_WARPS=kvh, num_warps=kvh, EARLY=early,
                                   FUSED_MERGE=fused_merge)
            kv_cache = by_head.reshape(2, blocks, page * kvh, 1, d)
            seq_lens_cpu = [n * kvh for n in seq_lens_cpu]
            page, kvh = page * kvh, 1
        elif whole_pages:  # one "KV head" of page * kvh rows a page, as many rows a sequence
            assert page * kvh == block_n and kv_cache.is_contiguous(), "token-major pages"
            kv_cache = kv_cache.view(2, blocks, page * kvh, 1, d)
            seq_lens_cpu = [n * kvh for n in seq_lens_cpu]
            page, kvh = page * kvh, 1
        head_major = kv_cache[0].stride() == (kvh * page * d, d, page * d, 1)
        assert head_major or kv_cache[0].stride() == (page * kvh * d, kvh * d, d, 1), "contiguous pages"
        tiles = [triton.cdiv(n, block_n) for n in seq_lens_cpu]
        cu = [0]
        for n in tiles:
            cu.append(cu[-1] + n)
        self.total = cu[-1] * kvh
        programs = num_sms(q.device) * programs_per_sm
        self.programs = max(1, min(programs, self.total))
        dev = q.device
        self.cu_tiles = torch.tensor(cu, dtype=torch.int32, device=dev)
        self.seq_lens = torch.tensor(seq_lens_cpu, dtype=torch.int32, device=dev)
        g = heads // kvh
        self.part_o = torch.empty(self.programs * 2 * g, d, dtype=torch.float32, device=dev)
        self.part_ml = torch.empty(self.programs * 2 * g, 2, dtype=torch.float32, device=dev)
        dtype = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
        layout = gl.NVMMASharedLayout.get_default_for([block_n, d], dtype)
        box = [min(page, block_n), d]
        if head_major:
            k_desc, v_desc = (TensorDescriptor(kv_cache[i], [blocks * kvh * page, d], [d, 1], box, layout)
                              for i in (0, 1))
        else:
            k_desc, v_desc = (TensorDescriptor(kv_cache[i], [blocks * page, kvh * d], [kvh * d, 1], box, layout)
                              for i in (0, 1))
        assert q.stride(1) == d and out.stride(1) == d
        self.args = (q, k_desc, v_desc, out, self.part_o, self.part_ml, self.cu_tiles, self.seq_lens, block_table,
                     num_seqs, self.total, d ** -0.5 * LOG2E, q.stride(0), out.stride(0), block_table.stride(0))
        self.constexprs = dict(G=g, KVH=kvh, D=d, BLOCK_N=block_n, PAGE=page, STAGES=stages, HEAD_MAJOR=head_major,
                               COMPUTE=compute, PAGE_KVH=page_kvh, PRODUCER_REGS=producer_regs, num_warps=4)
        if page_mma:
            self.sem = torch.zeros(num_seqs, dtype=torch.int32, device=dev)
            self.args = self.args + (self.sem, )
            self.constexprs = page_constexprs
        self.fused_merge = fused_merge
        self.merge_args = (self.part_o, self.part_ml, out, self.cu_tiles, self.total, self.programs, out.stride(0))
        self.merge_grid = (num_seqs * kvh,)
        self.merge_constexprs = dict(KVH=kvh, G=g, GP=max(2, triton.next_power_of_2(g)), D=d, num_warps=4)
        self.compute = compute

    def attention(self) -> None:
        kernel = _page_decode_kernel if self.page_mma else _decode_kernel
        kernel[(self.programs,)](*self.args, **self.constexprs)

    def merge(self) -> None:
        _merge_parts[self.merge_grid](*self.merge_args, **self.merge_constexprs)

    def __call__(self) -> None:
        self.attention()
        if self.compute and not self.fused_merge:
            self.merge()


def compile_sm90(name: str = "n128_s2", page: int = 16):
    """Variant ``name``'s kernel built for an H100 on this machine (no GPU needed), from the launch
    arguments a step on CPU tensors of the benchmark's head shape plans: what the CPU test checks."""
    from compiled_attn.kernels import _aot

    q = torch.empty(4, 32, 128, dtype=torch.bfloat16)
    cache = torch.empty(2, 64, page, 8, 128, dtype=torch.bfloat16)
    if VARIANTS[name].get("page_mma"):
        cache = torch.empty(2, 64, 8, page, 128, dtype=torch.bfloat16).transpose(2, 3)
    table = torch.zeros(4, 16, dtype=torch.int32)
    probe = GluonDecode(q, cache, [4 * page] * 4, table, torch.empty_like(q), **VARIANTS[name])
    kernel = _page_decode_kernel if probe.page_mma else _decode_kernel
    return _aot.compile_gluon(kernel, probe.args, probe.constexprs)


def run(cases: list[str], variants: list[str], layouts: list[str], rounds: int) -> list[dict]:
    from torch.nn.attention import SDPBackend

    from compiled_attn import bench
    from compiled_attn.backends import get_backend

    spec = bench.LLAMA3_8B
    rows = []
    for case in (c for c in bench.CASES if c.name in cases):
        for layout in layouts:
            head_major, in_order = LAYOUTS.get(layout, (False, False))
            w = bench.build_workload(case, spec, block_size=16, dtype=torch.bfloat16, device="cuda",
                                     head_major_pages=head_major, contiguous_pages=in_order)
            if layout == DENSE:
                w = _dense(w)
            rows += _run_workload(w, variants, rounds, dict(case=case.name, layout=layout))
            del w
            torch.cuda.empty_cache()
    return rows


def _dense(w):
    """The workload's sequences as dense [B, KVH, context, D] K and V (one replica: the cache is far
    over L2), seen as a head-major cache of one page a sequence."""
    import dataclasses

    meta = w.metas[0]
    b, context = meta.block_table.shape[0], w.case.seq_lens[0]
    assert len(set(w.case.seq_lens)) == 1, "uniform batches only"
    dense = torch.stack([w.kv_cache[i][meta.block_table.long()].flatten(1, 2)[:, :context].transpose(1, 2)
                         for i in (0, 1)]).contiguous()  # [2, B, KVH, context, D]
    table = torch.arange(b, device=dense.device, dtype=torch.int32).view(b, 1)
    return dataclasses.replace(w, kv_cache=dense.transpose(2, 3), block_size=context, metas=[
        dataclasses.replace(meta, block_table=table)], qkv=w.qkv[:1], outs=w.outs[:1])


def _run_workload(w, variants: list[str], rounds: int, label: dict) -> list[dict]:
    """cuDNN (dense), our backends and the probe's variants on one workload, ``rounds`` times, in turn."""
    from torch.nn.attention import SDPBackend

    from compiled_attn import bench
    from compiled_attn.backends import get_backend

    case, spec, replicas = w.case, w.spec, len(w.metas)
    kv_bytes = bench.decode_bytes(case, spec, 2, 2)
    ref_backend = get_backend("reference")
    (q0, k0, v0), ref = w.qkv[0], torch.empty_like(w.outs[0])
    if w.block_size > 256:  # dense: SDPA over the same keys in float32
        dense = w.kv_cache.transpose(2, 3).float()  # [2, B, KVH, context, D]
        ref.copy_(torch.nn.functional.scaled_dot_product_attention(
            q0.float().unsqueeze(2), dense[0], dense[1], enable_gqa=True).squeeze(2))
    else:
        ref_backend.forward(q0, k0, v0, w.kv_cache, ref_backend.plan(w.metas[0]), ref, scale=spec.softmax_scale,
                            sliding_window=None, logits_soft_cap=None, alibi_slopes=None, k_scale=w.scales[0],
                            v_scale=w.scales[1])
    contenders = {"cudnn dense": bench.sdpa_dense_contender(SDPBackend.CUDNN_ATTENTION)(w)}
    checked = set()
    if w.block_size <= 256:
        contenders["trtllm"] = bench.backend_contender("trtllm")(w)
        checked.add("trtllm")
    rows = []
    for name in variants:
        try:
            probes = [GluonDecode(q, w.kv_cache, list(case.seq_lens), meta.block_table, out, **VARIANTS[name])
                      for meta, (q, _, _), out in zip(w.metas, w.qkv, w.outs)]
        except AssertionError as err:  # a variant this layout does not take (whole pages: token-major)
            rows.append(dict(label, contender=f"gluon {name}", error=f"AssertionError: {err}"))
            continue
        contenders[f"gluon {name}"] = lambda probes=probes: [p() for p in probes]
        if VARIANTS[name].get("compute", True):
            checked.add(f"gluon {name}")
            if not VARIANTS[name].get("fused_merge"):
                contenders[f"gluon {name} (no merge)"] = lambda probes=probes: [p.attention() for p in probes]
    for r in range(rounds):
        for name, fn in contenders.items():
            row = dict(label, contender=name, round=r)
            try:
                if r == 0 and name in checked:
                    w.outs[0].fill_(float("nan"))
                    fn()
                    torch.cuda.synchronize()
                    row["max_abs_err"] = (w.outs[0].float() - ref.float()).abs().max().item()
                us = bench.time_graph(fn, replicas)
                row.update(us=round(us, 2), gbs=round(kv_bytes / us / 1e3))
            except Exception as err:  # a variant that does not build is a result too
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    from compiled_attn import bench

    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default="gluon_decode_probe.json")
    parser.add_argument("--cases", default=",".join(c.name for c in bench.CASES if c.kind == "decode"))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    cases = re.split(r",(?![^\[]*\])", args.cases)  # commas inside a case's brackets are its own
    rows = run(cases, args.variants.split(","), args.layouts.split(","), args.rounds)
    Path(args.json).write_text(json.dumps(dict(
        card=torch.cuda.get_device_name(), triton=triton.__version__, torch=torch.__version__,
        command="python scripts/gluon_decode_probe.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()
                                                                   if k != "json"),
        heads=32, kv_heads=8, head_size=128, page=16, dtype="bfloat16", rows=rows), indent=1))


if __name__ == "__main__":
    main()
