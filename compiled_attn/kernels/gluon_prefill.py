"""Prefill-shaped paged attention for Hopper (sm_90) in Gluon: the warp-specialised kernel that plain
Triton does not emit there.

A work item is ``BLOCK_M`` query tokens of one query head; a program (CTA, one an SM) walks the
items ``p, p + P, ...`` with three roles:

- a producer warp loads each item's query tile and its K/V tiles through a ring of ``STAGES``
  shared buffers with TMA, one copy per page a tile spans (pages found through the block table),
  running ahead into the next item while the consumers finish one;
- two consumer warpgroups of ``BLOCK_M // 2`` rows each run the tensor-core dots asynchronously:
  each issues one tile's Q·K^T and the previous tile's P·V together and computes that tile's
  softmax while P·V runs, then stores its rows (TMA where all are the sequence's).

Sequences are found as in ``paged_attention`` (``query_start_loc[s] // BLOCK_M + s`` is the first
query block of sequence ``s``; items run the blocks last to first, the heads of one block
consecutive). The new tokens' K/V must already be in the cache; tiles below the causal diagonal run
unmasked. Padding tokens (``>= query_start_loc[-1]``) get zeros.

A step's short sequences (the decodes and speculative tokens a chunked-prefill step carries, any of
at most ``SHORT_QUERY_LEN`` new tokens) are skipped here and served by the Triton kernel in launches
of their own after this one (``paged_attention``): here each would cost an item a query head, a
whole 128-row tile over its context, where the Triton kernel packs the query heads of a KV head into
one tile.

Scope (:func:`supported`): CUDA sm_90 with a Triton whose Gluon has the Hopper API, fp16/bf16 q and
cache, head size 64, 80, 96, 112, 128, 192 or 256 (80-112 in 128-column tiles, 192 in 256-column
ones), token-major contiguous cache pages, causal attention with no window, ALiBi or soft-cap, one
split. Everything else takes the Triton kernel. Gluon kernels do not run
under the Triton interpreter: they are tested on the GPU, and compiled for sm_90 on the CPU.
"""

from __future__ import annotations

import os

import torch

from ..split_kv import num_sms

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    # TMA copies by their current names (async_load / async_store; Triton 3.9 removed the older ones).
    tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
except ImportError:  # a Triton without Gluon's Hopper API: the Triton kernel serves every step
    gluon = None

# False (COMPILED_ATTN_GLUON_PREFILL=0 at import): every step takes the Triton kernel.
ENABLED = os.environ.get("COMPILED_ATTN_GLUON_PREFILL", "1").strip().lower() not in ("0", "false", "no", "off")
HEAD_SIZES = (64, 80, 96, 112, 128, 192, 256)  # tiles of 64, 128 or 256 columns (padded_head_size)
BLOCK_M = 128  # query tokens a program: two consumer warpgroups of 64 rows
BLOCK_N = 128  # keys a tile (head 256: BLOCK_N_HEAD_256)
# Head 256 in 64-key tiles: K/V tiles of 32 KB each keep the ring in shared memory (query tile 64 KB, two
# slots of K and V 128 KB), and the 64x256 fp32 accumulator (128 registers a thread) beside 64-key
# scores in the consumers' 232 registers.
BLOCK_N_HEAD_256 = 64
# K and V buffers each: at head 128, 2 x 2 x 32 KB, with the query tile, the TMA store buffers (32 KB
# each) and layout-conversion scratch 213 KB of shared memory.
STAGES = 2
# Registers a thread, set by setmaxnreg in each partition (the producer zeroes tile tails: 40). 240/24
# and 232/40 timed alike (582-587 us at 8x2048 dense, benchmarks/gluon_probe_h100.json).
CONSUMER_REGS, PRODUCER_REGS = 232, 40
# Programs: one a work item (0), or this many an SM, each walking work items (persistent: the producer
# loads the next item's query and first K/V tiles while the consumers finish the last one). H100,
# two rounds: 8x2048 640 -> 592 us, prefix 2,243 -> 2,209, 1x16384 level (3,871 against 3,874;
# benchmarks/gluon_prefill_ab_h100.json).
PERSISTENT_PROGRAMS_PER_SM = 1
# Outputs of whole 64-row halves leave through TMA, asynchronously (where out's heads are contiguous);
# a block's rows past its sequence always through a masked store. 2% faster on every prefill case:
# 8x2048 589 -> 578 us, 1x16384 3,902 -> 3,812, prefix 2,226 -> 2,204 (H100, two rounds,
# benchmarks/gluon_prefill_ab2_h100.json).
TMA_STORE = True
# Sequences of at most this many new tokens take the Triton kernel (0: every sequence here). At 64 or
# fewer its tiles hold all of a KV head's query heads (64 tokens x 4 heads), so it reads each K/V tile
# once a KV head where this kernel reads it once a query head. H100, kernel alone, every sequence
# here -> 64 (benchmarks/gluon_prefill_short2_ab_h100.json): a 2048-token chunk over 8192 cached with
# 64 decodes of 4096 1,553-1,564 -> 932-940 us (the Triton kernel alone 1,067-1,076); 512 tokens with
# 128 decodes of 2048 1,039-1,043 -> 427-430 (419-420); 32 chunks of 64 over 4096 634-637 -> 363-364;
# steps without short sequences pay for the two empty launches, 8x2048 585-592 -> 590-595.
SHORT_QUERY_LEN = 64
# The step's K/V store inside this kernel where it can (fuses_store): for sequences without a cached
# prefix, the attention reads each whole chunk of new tokens from k/v (not the cache), and the
# producer copies the chunks of each item's own query block from the landed tile into the cache
# through TMA, once a KV head; store_kv writes only the rest first (a last partial chunk, sequences
# with a cached prefix, the short sequences). On unless COMPILED_ATTN_FUSE_PREFILL_STORE=0 at import.
# H100, the step with its store, two rounds, store_kv then the kernel -> fused
# (benchmarks/gluon_prefill_fused_store_gated_ab_h100.json): 8x2048 622-625 -> 593-595 us, 1x16384
# 3,790-3,808 -> 3,643-3,652, the prefix step (4x2048 over 8192) and a chunk with 64 decodes level
# (2,240-2,247 / 2,249-2,252; 935-936 / 933). Sequences with a prefix stay on the cache's path: taking
# their new tiles from k/v too made the prefix step 5% slower (..._fused_store_tile2_h100.json).
FUSE_STORE = os.environ.get("COMPILED_ATTN_FUSE_PREFILL_STORE", "1").strip().lower() not in ("0", "false", "no", "off")
LOG2E = 1.4426950408889634


def unsupported_reason(q, kv_cache, out, *, sliding_window, logits_soft_cap, alibi_slopes, num_splits,
                       max_query_len: int, split_max_query_len: int) -> str | None:
    """Why this launch does not take the Gluon kernel, or None where it does (see :func:`supported`)."""
    if gluon is None or not ENABLED:
        return "Gluon's Hopper API is not available" if gluon is None else "disabled"
    if q.device.type != "cuda" or torch.cuda.get_device_capability(q.device) != (9, 0):
        return "needs an sm_90 GPU"
    if max_query_len <= split_max_query_len or (num_splits or 1) != 1:
        return "decode-shaped step"
    if max_query_len <= SHORT_QUERY_LEN:
        return f"no sequence over {SHORT_QUERY_LEN} new tokens (those take the Triton kernel)"
    if sliding_window or logits_soft_cap or alibi_slopes is not None:
        return "window, soft-cap and ALiBi take the Triton kernel"
    num_heads, head_size = q.shape[1], q.shape[2]
    if q.dtype not in (torch.float16, torch.bfloat16) or kv_cache.dtype != q.dtype:
        return "needs fp16/bf16 q and a cache of q's dtype"
    if head_size not in HEAD_SIZES:
        return f"head size {head_size}"
    _, blocks, page, kv_heads, _ = kv_cache.shape
    token_major = (page * kv_heads * head_size, kv_heads * head_size, head_size, 1)
    if kv_cache[0].stride() != token_major or kv_cache[1].stride() != token_major:
        return "needs token-major contiguous pages"
    if blocks * page >= 2**31 or q.shape[0] >= 2**31 // max(num_heads, 1):
        return "too large for 32-bit TMA coordinates"
    # TMA wants 16-byte aligned rows; storage offsets stand in for pointers (fake tensors have none).
    if (q.stride(2) != 1 or q.stride(1) != head_size or q.stride(0) % 8 or q.storage_offset() % 8
            or kv_cache.storage_offset() % 8):
        return "q rows must be [heads * head_size] contiguous and 16-byte aligned"
    if out.stride(2) != 1:
        return "out's last dimension must be contiguous"
    return None


def supported(q, kv_cache, out, **static) -> bool:
    """Whether this launch takes the Gluon kernel: decided from static properties only (device,
    dtypes, shapes, strides, the bucket's ``max_query_len``), so a compiled or captured step always
    takes the same kernel."""
    return unsupported_reason(q, kv_cache, out, **static) is None


if gluon is not None:

    @gluon.jit
    def _find_seq(query_start_loc_ptr, num_seqs, q_block, BLOCK_M: gl.constexpr):
        """The last sequence ``s`` with ``query_start_loc[s] // BLOCK_M + s <= q_block``."""
        lo: gl.int32 = 0
        hi = num_seqs
        while lo < hi:
            mid = (lo + hi) // 2
            if gl.load(query_start_loc_ptr + mid) // BLOCK_M + mid <= q_block:
                lo = mid + 1
            else:
                hi = mid
        return lo - 1

    @gluon.jit
    def _zero_rows(out_ptr, head, first, end, s_ot, s_oh, BLOCK_M: gl.constexpr, D: gl.constexpr,
                   HD: gl.constexpr):
        """Zeros into rows ``[first, end)`` of one head of ``out`` (at most ``BLOCK_M`` of them, ``HD``
        columns)."""
        layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        rows = first + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, layout))
        cols = gl.arange(0, D, layout=gl.SliceLayout(0, layout))
        ptrs = out_ptr + gl.expand_dims(rows.to(gl.int64) * s_ot + head * s_oh, 1) + gl.expand_dims(cols, 0)
        zeros = gl.zeros([BLOCK_M, D], out_ptr.dtype.element_ty, layout=layout)
        gl.store(ptrs, zeros, mask=gl.expand_dims(rows < end, 1) & gl.expand_dims(cols < HD, 0))

    @gluon.jit
    def _softmax_tile(s, m_i, l_i, q_pos, key0, qk_scale, s_layout: gl.constexpr, BLOCK_N: gl.constexpr,
                      MASKED: gl.constexpr):
        """Online softmax of one score tile in log2 units: the tile's probabilities, the new row
        max and sum, and the factor the running output is rescaled by."""
        if MASKED:
            keys = key0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
            s = gl.where(gl.expand_dims(q_pos, 1) >= gl.expand_dims(keys, 0), s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        p = gl.exp2(s * qk_scale - gl.expand_dims(m_new, 1))
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha + gl.sum(p, 1)
        return p, m_new, l_i, alpha

    @gluon.jit
    def _work_item(item, num_q_blocks, query_start_loc_ptr, seq_lens_ptr, num_seqs, H: gl.constexpr,
                   BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, SHORT_QUERY_LEN: gl.constexpr):
        """Work item ``item`` (query blocks last to first, the heads of a block consecutive): whether
        it holds queries of a sequence of over ``SHORT_QUERY_LEN`` new tokens, its head, sequence,
        first token, rows, first query position, key tiles and mask-free tiles."""
        head = item % H
        q_block = num_q_blocks - 1 - item // H
        seq = _find_seq(query_start_loc_ptr, num_seqs, q_block, BLOCK_M)
        q_start = gl.load(query_start_loc_ptr + seq)
        q_len = gl.load(query_start_loc_ptr + seq + 1) - q_start
        local = q_block - (q_start // BLOCK_M + seq)  # the block within its sequence
        rows = q_len - local * BLOCK_M
        seq_len = gl.load(seq_lens_ptr + seq)
        first_pos = seq_len - q_len + local * BLOCK_M  # the block's first query's position
        key_end = first_pos + gl.minimum(rows, BLOCK_M)  # its last query's position + 1
        n_tiles = gl.cdiv(key_end, BLOCK_N)
        n_full = (first_pos + 1) // BLOCK_N
        valid = (rows > 0) & (q_len > SHORT_QUERY_LEN)
        return valid, head, seq, q_start + local * BLOCK_M, rows, first_pos, seq_len, n_tiles, n_full, seq_len - q_len

    @gluon.jit
    def _consumer(wg: gl.constexpr, q_smem, k_smem, v_smem, o_smem, q_ready, q_empty, k_ready, k_empty, v_ready,
                  v_empty, o_desc, out_ptr, query_start_loc_ptr, seq_lens_ptr, num_seqs, num_q_blocks, qk_scale, s_ot,
                  s_oh, H: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, D: gl.constexpr,
                  HD: gl.constexpr, STAGES: gl.constexpr, TMA_STORE: gl.constexpr, SHORT_QUERY_LEN: gl.constexpr):
        """One warpgroup's ``BLOCK_M // 2`` rows of each of the program's work items, against key
        tiles ``[0, n_tiles)``; tiles from ``n_full`` on reach past the block's first query and are
        masked. The first tile holds key 0, which every row sees, so no row max stays -inf."""
        HALF: gl.constexpr = BLOCK_M // 2
        dtype: gl.constexpr = q_smem.dtype
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, D, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
        out_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        q_tile = q_smem.index(wg)
        zero_s = gl.zeros([HALF, BLOCK_N], gl.float32, layout=s_layout)
        tile = 0  # K/V ring position, over all items
        done = 0  # items done (the query tile's phase)
        for item in range(gl.program_id(0), num_q_blocks * H, gl.num_programs(0)):
            valid, head, seq, tok0, rows_left, first_pos, seq_len, n_tiles, n_full, prefix = _work_item(
                item, num_q_blocks, query_start_loc_ptr, seq_lens_ptr, num_seqs, H, BLOCK_M, BLOCK_N,
                SHORT_QUERY_LEN)
            if valid:
                q_pos = first_pos + wg * HALF + gl.arange(0, HALF, layout=row_layout)
                m_i = gl.full([HALF], float("-inf"), gl.float32, layout=row_layout)
                l_i = gl.zeros([HALF], gl.float32, layout=row_layout)
                acc = gl.zeros([HALF, D], gl.float32, layout=o_layout)
                mbarrier.wait(q_ready, done & 1)

                stage = tile % STAGES
                mbarrier.wait(k_ready.index(stage), (tile // STAGES) & 1)
                s = warpgroup_mma(q_tile, k_smem.index(stage).permute((1, 0)), zero_s, use_acc=False,
                                  is_async=True)
                s = warpgroup_mma_wait(0, deps=(s, ))
                mbarrier.arrive(k_empty.index(stage))
                if n_full > 0:
                    p, m_i, l_i, alpha = _softmax_tile(s, m_i, l_i, q_pos, 0, qk_scale, s_layout, BLOCK_N, False)
                else:
                    p, m_i, l_i, alpha = _softmax_tile(s, m_i, l_i, q_pos, 0, qk_scale, s_layout, BLOCK_N, True)
                p_op = gl.convert_layout(p.to(dtype), p_layout)

                for j in range(1, n_tiles):
                    stage = (tile + j) % STAGES
                    prev = (tile + j - 1) % STAGES
                    # This tile's Q·K^T and the previous tile's P·V in flight together; the
                    # softmax runs while P·V does.
                    mbarrier.wait(k_ready.index(stage), ((tile + j) // STAGES) & 1)
                    mbarrier.wait(v_ready.index(prev), ((tile + j - 1) // STAGES) & 1)
                    s = warpgroup_mma(q_tile, k_smem.index(stage).permute((1, 0)), zero_s, use_acc=False,
                                      is_async=True)
                    acc = warpgroup_mma(p_op, v_smem.index(prev), acc, is_async=True)
                    s = warpgroup_mma_wait(1, deps=(s, ))
                    mbarrier.arrive(k_empty.index(stage))
                    if j < n_full:
                        p, m_i, l_i, alpha = _softmax_tile(s, m_i, l_i, q_pos, j * BLOCK_N, qk_scale, s_layout,
                                                           BLOCK_N, False)
                    else:
                        p, m_i, l_i, alpha = _softmax_tile(s, m_i, l_i, q_pos, j * BLOCK_N, qk_scale, s_layout,
                                                           BLOCK_N, True)
                    acc, p_op = warpgroup_mma_wait(0, deps=(acc, p_op))
                    mbarrier.arrive(v_empty.index(prev))
                    acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
                    p_op = gl.convert_layout(p.to(dtype), p_layout)
                mbarrier.arrive(q_empty)  # every Q·K^T of the item is done: the next item's query may land

                last = (tile + n_tiles - 1) % STAGES
                mbarrier.wait(v_ready.index(last), ((tile + n_tiles - 1) // STAGES) & 1)
                acc = warpgroup_mma(p_op, v_smem.index(last), acc, is_async=True)
                acc, p_op = warpgroup_mma_wait(0, deps=(acc, p_op))
                mbarrier.arrive(v_empty.index(last))
                tile += n_tiles
                done += 1

                l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
                o = (acc / gl.expand_dims(l_o, 1)).to(dtype)
                if TMA_STORE and rows_left >= (wg + 1) * HALF:
                    # Every row is the sequence's: an asynchronous store, overlapping the next item.
                    tma.store_wait(0)  # this warpgroup's previous store has left the buffer
                    o_smem.index(wg).store(o)
                    fence_async_shared()
                    tma_store(o_desc, [tok0 + wg * HALF, head * HD], o_smem.index(wg))
                else:
                    # Rows past the sequence (the next sequence's tokens, or none) computed
                    # garbage, and so did columns past a padded head: a masked store, so they are
                    # never written.
                    o_rows = gl.convert_layout(o, out_layout)
                    rows = wg * HALF + gl.arange(0, HALF, layout=gl.SliceLayout(1, out_layout))
                    cols = gl.arange(0, D, layout=gl.SliceLayout(0, out_layout))
                    ptrs = (out_ptr + gl.expand_dims((tok0 + rows).to(gl.int64) * s_ot + head * s_oh, 1)
                            + gl.expand_dims(cols, 0))
                    gl.store(ptrs, o_rows, mask=gl.expand_dims(rows < rows_left, 1) & gl.expand_dims(cols < HD, 0))
        if TMA_STORE:
            tma.store_wait(0)  # the buffer must outlive the copy

    @gluon.jit
    def _zero_tail_rows(tile, valid, BLOCK_N: gl.constexpr):
        """Zeros into rows ``[valid, BLOCK_N)`` of a shared tile, 8 rows of at most 128 columns at a
        time (a swizzled tile splits no finer than 8 rows), by one warp: 16 registers a thread, within
        the producer's."""
        CHUNK: gl.constexpr = 8
        COLS: gl.constexpr = min(tile.shape[1], 128)
        layout: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [1, 1], [1, 0])
        for c in gl.static_range(BLOCK_N // CHUNK):
            if (c + 1) * CHUNK > valid:
                rows = c * CHUNK + gl.arange(0, CHUNK, layout=gl.SliceLayout(1, layout))
                for h in gl.static_range(tile.shape[1] // COLS):
                    chunk = tile.slice(c * CHUNK, CHUNK).slice(h * COLS, COLS, dim=1)
                    x = chunk.load(layout)
                    chunk.store(gl.where(gl.expand_dims(rows < valid, 1), x, gl.zeros_like(x)))

    @gluon.jit
    def _zero_columns(tile, first_col: gl.constexpr, ROWS: gl.constexpr):
        """Zeros into columns ``[first_col, width)`` of a shared tile's ``ROWS`` rows, 8 rows of at most
        128 columns at a time, by one warp."""
        COLS: gl.constexpr = min(tile.shape[1], 128)
        layout: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [1, 1], [1, 0])
        for h in gl.static_range(tile.shape[1] // COLS):
            if (h + 1) * COLS > first_col:
                cols = h * COLS + gl.arange(0, COLS, layout=gl.SliceLayout(0, layout))
                for c in gl.static_range(ROWS // 8):
                    chunk = tile.slice(c * 8, 8).slice(h * COLS, COLS, dim=1)
                    x = chunk.load(layout)
                    chunk.store(gl.where(gl.expand_dims(cols < first_col, 0), x, gl.zeros_like(x)))

    @gluon.jit
    def _cache_row(bt_row_ptr, key, seq_len, PAGE: gl.constexpr):
        """The cache row holding key ``key`` of the sequence whose block-table row is ``bt_row_ptr``;
        a key past the sequence (masked by its reader) maps into page 0, never a table entry past the
        row."""
        page = gl.load(bt_row_ptr + key // PAGE, mask=key < seq_len, other=0)
        return page * PAGE + key % PAGE

    @gluon.jit
    def _load_pages(desc, smem, bar, bt_row_ptr, key0, seq_len, kv_col, BLOCK_N: gl.constexpr, PAGE: gl.constexpr):
        """Keys ``[key0, key0 + BLOCK_N)`` from the cache into ``smem``, landing on ``bar``: one copy
        of ``BOX = min(PAGE, BLOCK_N)`` rows a page."""
        BOX: gl.constexpr = desc.block_type.shape[0]
        mbarrier.expect(bar, BLOCK_N * desc.block_type.nbytes // BOX)
        for i in gl.static_range(BLOCK_N // BOX):
            key = key0 + i * BOX
            tma_load(desc, [_cache_row(bt_row_ptr, key, seq_len, PAGE), kv_col], bar, smem.slice(i * BOX, BOX))

    @gluon.jit
    def _load_tile(desc, new_desc, new_tile_desc, smem, bar, bt_row_ptr, key0, seq_len, prefix, new_row, kv_col,
                   BLOCK_N: gl.constexpr, PAGE: gl.constexpr, FUSE: gl.constexpr):
        """Keys ``[key0, key0 + BLOCK_N)`` into ``smem`` as :func:`_load_pages` loads them. With
        ``FUSE`` (an item whose new K/V this launch stores), a chunk of new tokens only
        (:func:`fused_chunk`) comes from the step's own K/V (``new_desc``, key ``key`` at row
        ``new_row + key``): the cache does not hold it yet; a tile of new tokens only comes in one
        copy (``new_tile_desc``), the step's K/V being contiguous where the cache's pages are not."""
        BOX: gl.constexpr = desc.block_type.shape[0]
        if FUSE:
            mbarrier.expect(bar, BLOCK_N * desc.block_type.nbytes // BOX)
            # Tiles of new keys only (all but an item's last) in straight-line copies: a branch
            # around each copy made the producer starve the consumers (1x16384 3,813 -> 4,547 us,
            # benchmarks/gluon_prefill_fused_store_tile_h100.json). Only items without a prefix take
            # this path, so the tests on ``prefix`` always pass; without them ptxas spills more of
            # the producer's 40 registers (96 stack bytes against 32, sm_90).
            if (key0 >= prefix) & (key0 + BLOCK_N <= seq_len):
                tma_load(new_tile_desc, [new_row + key0, kv_col], bar, smem)
            else:  # across the prefix's end, or past the sequence's
                for i in gl.static_range(BLOCK_N // BOX):
                    key = key0 + i * BOX
                    if (key >= prefix) & (key + BOX <= seq_len):
                        tma_load(new_desc, [new_row + key, kv_col], bar, smem.slice(i * BOX, BOX))
                    else:
                        tma_load(desc, [_cache_row(bt_row_ptr, key, seq_len, PAGE), kv_col],
                                 bar, smem.slice(i * BOX, BOX))
        else:
            _load_pages(desc, smem, bar, bt_row_ptr, key0, seq_len, kv_col, BLOCK_N, PAGE)

    @gluon.jit
    def _store_chunks(desc, smem, bt_row_ptr, key0, first_pos, seq_len, kv_col, BLOCK_M: gl.constexpr,
                      BLOCK_N: gl.constexpr, PAGE: gl.constexpr):
        """The chunks of a landed K or V tile (keys ``[key0, key0 + BLOCK_N)``) that this item
        stores: whole chunks of new tokens whose first key is one of its block's queries."""
        BOX: gl.constexpr = desc.block_type.shape[0]
        for i in gl.static_range(BLOCK_N // BOX):
            key = key0 + i * BOX
            if (key >= first_pos) & (key < first_pos + BLOCK_M) & (key + BOX <= seq_len):
                tma_store(desc, [_cache_row(bt_row_ptr, key, seq_len, PAGE), kv_col], smem.slice(i * BOX, BOX))

    @gluon.jit
    def _produce_tiles(k_desc, v_desc, k_new_desc, v_new_desc, k_tile_desc, v_tile_desc, k_smem, v_smem, k_ready,
                       k_empty, v_ready, v_empty, tail_bar, tails, tile, n_tiles, bt_row_ptr, head, first_pos,
                       seq_len, prefix, new_row, kv_col, H: gl.constexpr, KVH: gl.constexpr, BLOCK_M: gl.constexpr,
                       BLOCK_N: gl.constexpr, PAGE: gl.constexpr, STAGES: gl.constexpr, FUSE: gl.constexpr,
                       FUSED_BUILD: gl.constexpr):
        """An item's K and V tiles into ring slots both consumers freed (``FUSE``: new keys from k/v,
        and the item's share of them copied into the cache; ``FUSED_BUILD``: some items' copies may
        still be reading a slot); returns the ``tail_bar`` phase count."""
        for j in range(n_tiles):
            stage = (tile + j) % STAGES
            free_phase = (((tile + j) // STAGES) & 1) ^ 1
            mbarrier.wait(k_empty.index(stage), free_phase)
            if FUSED_BUILD:
                tma.store_wait(0)  # the stores from this slot (an earlier tile's) have read it
            _load_tile(k_desc, k_new_desc, k_tile_desc, k_smem.index(stage), k_ready.index(stage), bt_row_ptr,
                       j * BLOCK_N, seq_len, prefix, new_row, kv_col, BLOCK_N, PAGE, FUSE)
            mbarrier.wait(v_empty.index(stage), free_phase)
            # A tile that reaches past the sequence (an item's last) lands on tail_bar
            # first, so the rows past the sequence can be zeroed before the consumers see
            # it: their probabilities are 0, but 0 x NaN is NaN, and unused cache slots may
            # hold anything.
            tail = seq_len - j * BLOCK_N
            if tail < BLOCK_N:
                _load_tile(v_desc, v_new_desc, v_tile_desc, v_smem.index(stage), tail_bar, bt_row_ptr, j * BLOCK_N,
                           seq_len, prefix, new_row, kv_col, BLOCK_N, PAGE, FUSE)
                mbarrier.wait(tail_bar, tails & 1)
                tails += 1
                _zero_tail_rows(v_smem.index(stage), tail, BLOCK_N)
                fence_async_shared()  # the zeros before the consumers' (async-proxy) reads
                mbarrier.arrive(v_ready.index(stage))
            else:
                _load_tile(v_desc, v_new_desc, v_tile_desc, v_smem.index(stage), v_ready.index(stage), bt_row_ptr,
                           j * BLOCK_N, seq_len, prefix, new_row, kv_col, BLOCK_N, PAGE, FUSE)
            if FUSE:
                # The new chunks of the block's own keys go to the cache from the landed tile,
                # once a KV head (its first query head's item); the slot is not reloaded before
                # these copies have read it (store_wait above).
                if (head % (H // KVH) == 0) & (j >= first_pos // BLOCK_N):
                    ready_phase = ((tile + j) // STAGES) & 1
                    mbarrier.wait(k_ready.index(stage), ready_phase)
                    _store_chunks(k_desc, k_smem.index(stage), bt_row_ptr, j * BLOCK_N, first_pos, seq_len,
                                  kv_col, BLOCK_M, BLOCK_N, PAGE)
                    mbarrier.wait(v_ready.index(stage), ready_phase)
                    _store_chunks(v_desc, v_smem.index(stage), bt_row_ptr, j * BLOCK_N, first_pos, seq_len,
                                  kv_col, BLOCK_M, BLOCK_N, PAGE)
        return tails

    @gluon.jit
    def _producer(q_desc, k_desc, v_desc, k_new_desc, v_new_desc, k_tile_desc, v_tile_desc, q_smem, k_smem, v_smem,
                  q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, tail_bar, query_start_loc_ptr, seq_lens_ptr,
                  block_table_ptr, num_seqs, num_q_blocks, s_bt, H: gl.constexpr, KVH: gl.constexpr,
                  D: gl.constexpr, HD: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, PAGE: gl.constexpr,
                  STAGES: gl.constexpr, SHORT_QUERY_LEN: gl.constexpr, FUSE_STORE: gl.constexpr):
        """One warp: for each work item its query tile (once the consumers are done with the last
        one), then each K and V tile into a ring slot both consumers freed. A fresh barrier's
        previous phase counts as complete, hence the ``^ 1`` on the waits for free slots."""
        HALF: gl.constexpr = BLOCK_M // 2
        tile = 0
        done = 0
        tails = 0
        for item in range(gl.program_id(0), num_q_blocks * H, gl.num_programs(0)):
            valid, head, seq, tok0, rows_left, first_pos, seq_len, n_tiles, n_full, prefix = _work_item(
                item, num_q_blocks, query_start_loc_ptr, seq_lens_ptr, num_seqs, H, BLOCK_M, BLOCK_N,
                SHORT_QUERY_LEN)
            if valid:
                bt_row_ptr = block_table_ptr + seq.to(gl.int64) * s_bt
                kv_col = (head // (H // KVH)) * HD
                new_row = tok0 - first_pos  # the row of key 0 in the step's K/V, were it new
                mbarrier.wait(q_empty, (done & 1) ^ 1)
                if HD < D:
                    # A padded head: its tiles reach into the next head's columns (zeros past the
                    # last), harmless in K and V once the query's are zeros: K's meet those zeros
                    # (a slot in use holds every KV head's values, so no NaN), V's land in output
                    # columns that are never stored.
                    mbarrier.expect(tail_bar, 2 * q_desc.block_type.nbytes)
                    tma_load(q_desc, [tok0, head * HD], tail_bar, q_smem.index(0))
                    tma_load(q_desc, [tok0 + HALF, head * HD], tail_bar, q_smem.index(1))
                    mbarrier.wait(tail_bar, tails & 1)
                    tails += 1
                    _zero_columns(q_smem.index(0), HD, HALF)
                    _zero_columns(q_smem.index(1), HD, HALF)
                    fence_async_shared()
                    mbarrier.arrive(q_ready)
                else:
                    mbarrier.expect(q_ready, 2 * q_desc.block_type.nbytes)
                    tma_load(q_desc, [tok0, head * HD], q_ready, q_smem.index(0))
                    tma_load(q_desc, [tok0 + HALF, head * HD], q_ready, q_smem.index(1))
                if FUSE_STORE and prefix == 0:
                    # Sequences without a cached prefix only: with one, the branches around the
                    # cache's copies cost more than the store saves (benchmarks/
                    # gluon_prefill_fused_store_tile_h100.json); store_kv stores those.
                    tails = _produce_tiles(k_desc, v_desc, k_new_desc, v_new_desc, k_tile_desc, v_tile_desc, k_smem,
                                           v_smem, k_ready, k_empty, v_ready, v_empty, tail_bar, tails, tile, n_tiles,
                                           bt_row_ptr, head, first_pos, seq_len, prefix, new_row, kv_col, H, KVH,
                                           BLOCK_M, BLOCK_N, PAGE, STAGES, True, FUSE_STORE)
                else:
                    tails = _produce_tiles(k_desc, v_desc, k_new_desc, v_new_desc, k_tile_desc, v_tile_desc, k_smem,
                                           v_smem, k_ready, k_empty, v_ready, v_empty, tail_bar, tails, tile, n_tiles,
                                           bt_row_ptr, head, first_pos, seq_len, prefix, new_row, kv_col, H, KVH,
                                           BLOCK_M, BLOCK_N, PAGE, STAGES, False, FUSE_STORE)
                tile += n_tiles
                done += 1
        if FUSE_STORE:
            tma.store_wait(0)  # the tiles must outlive the copies

    @gluon.jit
    def _prefill_kernel(q_desc, k_desc, v_desc, k_new_desc, v_new_desc, k_tile_desc, v_tile_desc, o_desc, out_ptr,
                        query_start_loc_ptr, seq_lens_ptr, block_table_ptr, num_seqs, num_tokens, qk_scale, s_ot,
                        s_oh, s_bt, H: gl.constexpr, KVH: gl.constexpr, D: gl.constexpr, HD: gl.constexpr,
                        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, PAGE: gl.constexpr, STAGES: gl.constexpr,
                        TMA_STORE: gl.constexpr, SHORT_QUERY_LEN: gl.constexpr, FUSE_STORE: gl.constexpr,
                        PRODUCER_REGS: gl.constexpr, CONSUMER_REGS: gl.constexpr):
        """Program ``p`` of ``P`` takes work items ``p, p + P, ...`` (one item a program, or
        persistent programs)."""
        num_q_blocks = num_tokens // BLOCK_M + num_seqs
        last_token = gl.load(query_start_loc_ptr + num_seqs)
        for item in range(gl.program_id(0), num_q_blocks * H, gl.num_programs(0)):
            q_block = num_q_blocks - 1 - item // H
            if (q_block + 1) * BLOCK_M > last_token:  # padding tokens in the block: zeros
                _zero_rows(out_ptr, item % H, gl.maximum(q_block * BLOCK_M, last_token),
                           gl.minimum((q_block + 1) * BLOCK_M, num_tokens), s_ot, s_oh, BLOCK_M, D, HD)

        HALF: gl.constexpr = BLOCK_M // 2
        q_smem = gl.allocate_shared_memory(q_desc.dtype, [2, HALF, D], q_desc.layout)
        k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BLOCK_N, D], k_desc.layout)
        v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES, BLOCK_N, D], v_desc.layout)
        o_smem = q_smem  # a placeholder where outputs are stored from registers
        if TMA_STORE:
            o_smem = gl.allocate_shared_memory(o_desc.dtype, [2, HALF, D], o_desc.layout)
        q_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        q_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        tail_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_ready, count=1)
        mbarrier.init(q_empty, count=2)  # both consumers
        mbarrier.init(tail_bar, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(k_empty.index(i), count=2)  # both consumers
            mbarrier.init(v_empty.index(i), count=2)

        WG0: gl.constexpr = 0
        WG1: gl.constexpr = 1
        gl.warp_specialize([
            (_consumer, (WG0, q_smem, k_smem, v_smem, o_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty,
                         o_desc, out_ptr, query_start_loc_ptr, seq_lens_ptr, num_seqs, num_q_blocks, qk_scale, s_ot,
                         s_oh, H, BLOCK_M, BLOCK_N, D, HD, STAGES, TMA_STORE, SHORT_QUERY_LEN)),
            (_consumer, (WG1, q_smem, k_smem, v_smem, o_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty,
                         o_desc, out_ptr, query_start_loc_ptr, seq_lens_ptr, num_seqs, num_q_blocks, qk_scale, s_ot,
                         s_oh, H, BLOCK_M, BLOCK_N, D, HD, STAGES, TMA_STORE, SHORT_QUERY_LEN)),
            (_producer, (q_desc, k_desc, v_desc, k_new_desc, v_new_desc, k_tile_desc, v_tile_desc, q_smem, k_smem,
                         v_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, tail_bar, query_start_loc_ptr,
                         seq_lens_ptr, block_table_ptr, num_seqs, num_q_blocks, s_bt, H, KVH, D, HD, BLOCK_M, BLOCK_N,
                         PAGE, STAGES, SHORT_QUERY_LEN, FUSE_STORE)),
        ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


def _gl_dtype(dtype: torch.dtype):
    return gl.bfloat16 if dtype == torch.bfloat16 else gl.float16


def padded_head_size(head_size: int) -> int:
    """Columns of the kernel's tiles for this head size (Gluon's tensors have power-of-two sizes):
    80-112 run in 128-column tiles, 192 in 256-column ones."""
    return 64 if head_size <= 64 else 128 if head_size <= 128 else 256


def block_n_for(head_size: int) -> int:
    """Keys a K/V tile at this head size."""
    return BLOCK_N_HEAD_256 if padded_head_size(head_size) > 128 else BLOCK_N


def fused_chunk(head_size: int, block_size: int) -> int:
    """Keys a chunk of the fused store (:func:`fuses_store`): a TMA copy's rows."""
    return min(block_size, block_n_for(head_size))


def fuses_store(k, v, kv_cache) -> bool:
    """Whether this kernel can store the step's new K/V itself (static properties only): tiles of
    at most 128 columns, k/v rows ``[kv_heads * head_size]`` contiguous and 16-byte aligned. A
    padded head's copies also carry the next head's columns of the same tokens, the values that
    head's own copies write (none past the last head: TMA clips them). Tiles of 256 columns (heads
    192 and 256, 64-key tiles) keep store_kv first: fused, 8x2048 took 3.8% and 1.5% longer (H100,
    benchmarks/gluon_prefill_fused_store_d{192,256}_ab_h100.json)."""
    head_size = kv_cache.shape[-1]
    return FUSE_STORE and padded_head_size(head_size) <= 128 and all(
        t.dtype == kv_cache.dtype and t.stride(2) == 1 and t.stride(1) == head_size and t.stride(0) % 8 == 0
        and t.storage_offset() % 8 == 0 for t in (k, v))


def launch_args(q, kv_cache, query_start_loc, seq_lens, block_table, out, *, scale: float, k=None, v=None):
    """(grid, args, constexprs) of the kernel for these tensors; with the step's ``k``/``v``
    (:func:`fuses_store`) it also stores their whole chunks of new tokens."""
    num_tokens, num_heads, head_size = q.shape
    _, blocks, page, kv_heads, _ = kv_cache.shape
    num_seqs = seq_lens.shape[0]
    dtype = _gl_dtype(q.dtype)
    block_n = block_n_for(head_size)
    box = min(page, block_n)
    # A padded head's tiles read its columns and the next head's (zeros past the last head).
    tile_d = padded_head_size(head_size)
    q_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_M // 2, tile_d], dtype)
    kv_layout = gl.NVMMASharedLayout.get_default_for([block_n, tile_d], dtype)
    q_desc = TensorDescriptor(q, [num_tokens, num_heads * head_size], [q.stride(0), 1], [BLOCK_M // 2, tile_d],
                              q_layout)
    rows = [blocks * page, kv_heads * head_size]
    k_desc, v_desc = (TensorDescriptor(kv_cache[i], rows, [kv_heads * head_size, 1], [box, tile_d], kv_layout)
                      for i in (0, 1))
    fuse = k is not None
    k_new_desc, v_new_desc = k_tile_desc, v_tile_desc = k_desc, v_desc  # placeholders where nothing is fused
    if fuse:
        k_new_desc, v_new_desc, k_tile_desc, v_tile_desc = (
            TensorDescriptor(t, [num_tokens, kv_heads * head_size], [t.stride(0), 1], [box_rows, tile_d], kv_layout)
            for box_rows in (box, block_n) for t in (k, v))
    items = num_heads * (num_tokens // BLOCK_M + num_seqs)
    # Head 256's output buffers (64 KB) do not fit beside its ring, and a padded head's tiles are wider
    # than its rows: stores from registers.
    tma_store = (TMA_STORE and tile_d == head_size <= 128 and out.stride(1) == head_size and out.stride(0) % 8 == 0
                 and out.storage_offset() % 8 == 0)
    o_desc = q_desc
    if tma_store:
        o_desc = TensorDescriptor(out, [num_tokens, num_heads * head_size], [out.stride(0), 1],
                                  [BLOCK_M // 2, head_size], q_layout)
    grid = (min(items, num_sms(q.device) * PERSISTENT_PROGRAMS_PER_SM) if PERSISTENT_PROGRAMS_PER_SM else items,)
    args = (q_desc, k_desc, v_desc, k_new_desc, v_new_desc, k_tile_desc, v_tile_desc, o_desc, out, query_start_loc,
            seq_lens, block_table, num_seqs, num_tokens, scale * LOG2E, out.stride(0), out.stride(1),
            block_table.stride(0))
    constexprs = dict(H=num_heads, KVH=kv_heads, D=tile_d, HD=head_size, BLOCK_M=BLOCK_M, BLOCK_N=block_n, PAGE=page,
                      STAGES=STAGES, TMA_STORE=tma_store, SHORT_QUERY_LEN=SHORT_QUERY_LEN, FUSE_STORE=fuse,
                      PRODUCER_REGS=PRODUCER_REGS, CONSUMER_REGS=CONSUMER_REGS, num_warps=4)
    return grid, args, constexprs


def prefill_attention(q, kv_cache, query_start_loc, seq_lens, block_table, out, *, scale: float, k=None,
                      v=None) -> torch.Tensor:
    """``paged_attention`` for a step :func:`supported` accepts (the caller checked it, and the
    arguments): writes ``out``'s rows of sequences of over ``SHORT_QUERY_LEN`` new tokens, and the
    padding rows' zeros. Given the step's ``k``/``v`` (:func:`fuses_store`), it also stores the
    whole chunks of new tokens (``fused_chunk`` keys, at their block table's slots) of those
    sequences without a cached prefix, which ``store_kv(..., skip_fused=...)`` skips."""
    grid, args, constexprs = launch_args(q, kv_cache, query_start_loc, seq_lens, block_table, out, scale=scale, k=k,
                                         v=v)
    _prefill_kernel[grid](*args, **constexprs)
    return out
