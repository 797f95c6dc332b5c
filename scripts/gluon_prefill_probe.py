"""Causal prefill attention in Gluon for Hopper, dense or over pages: the probe that showed what plain
Triton 3.6 cannot emit on sm_90 (a TMA producer warp feeding wgmma consumer warpgroups, each
consumer overlapping one key tile's softmax with the next tile's Q·K^T and the previous tile's
P·V) reaching the prefill goal, before the package's kernel (compiled_attn/kernels/gluon_prefill.py)
was built on it. GPU only; a diagnostic, not part of the package.

    python scripts/gluon_prefill_probe.py --json out/gluon_probe.json
    python scripts/gluon_prefill_probe.py --ab 2 --json out/ab.json   # the package's kernel's switches

The shape is the benchmark's prefill 8x2048 (and 1x16384): 32 query heads, 8 KV heads, head 128,
bf16, causal, on ``[B*N, heads*D]`` tensors (K/V dense, or in a cache of shuffled pages). A
program (CTA) takes ``BLOCK_M`` tokens of one query head: two consumer warpgroups of
``BLOCK_M // 2`` rows each (the default partition and a worker), and one producer warp that loads
Q once and K/V tiles through a ring of ``STAGES`` buffers (TMA, mbarriers). Query blocks run
longest first. cuDNN, FlashAttention-2 (SDPA) and our Triton kernel run in the same process; each
row reports the largest error against float32 SDPA.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import triton
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

from compiled_attn.kernels.gluon_prefill import _softmax_tile  # the package's kernel's softmax
from compiled_attn.kernels.gluon_prefill import _cache_row, tma_load, tma_store

LOG2E = 1.4426950408889634


@gluon.jit
def _consumer(wg: gl.constexpr, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty, o_desc, qk_scale,
              row0, first, col, n_tiles, n_full, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, D: gl.constexpr,
              STAGES: gl.constexpr):
    """One warpgroup's ``BLOCK_M // 2`` query rows against the key tiles ``[0, n_tiles)``; tiles from
    ``n_full`` on cross the diagonal and are masked."""
    HALF: gl.constexpr = BLOCK_M // 2
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    q_smem_wg = q_smem.index(wg)
    q_pos = first + wg * HALF + gl.arange(0, HALF, layout=row_layout)
    m_i = gl.full([HALF], float("-inf"), gl.float32, layout=row_layout)
    l_i = gl.zeros([HALF], gl.float32, layout=row_layout)
    acc = gl.zeros([HALF, D], gl.float32, layout=o_layout)
    zero_s = gl.zeros([HALF, BLOCK_N], gl.float32, layout=s_layout)
    mbarrier.wait(q_bar, 0)

    # Tile 0 alone: its scores are the first thing to wait for.
    mbarrier.wait(k_ready.index(0), 0)
    s = warpgroup_mma(q_smem_wg, k_smem.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    s = warpgroup_mma_wait(0, deps=(s, ))
    mbarrier.arrive(k_empty.index(0))
    if n_full > 0:
        p, m_i, l_i, alpha = _softmax_tile(s, m_i, l_i, q_pos, 0, qk_scale, s_layout, BLOCK_N, False)
    else:
        p, m_i, l_i, alpha = _softmax_tile(s, m_i, l_i, q_pos, 0, qk_scale, s_layout, BLOCK_N, True)
    p_op = gl.convert_layout(p.to(gl.bfloat16), p_layout)

    for j in range(1, n_tiles):
        stage = j % STAGES
        prev = (j - 1) % STAGES
        # Issue this tile's Q·K^T and the previous tile's P·V; the softmax below runs while P·V does.
        mbarrier.wait(k_ready.index(stage), (j // STAGES) & 1)
        s = warpgroup_mma(q_smem_wg, k_smem.index(stage).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        mbarrier.wait(v_ready.index(prev), ((j - 1) // STAGES) & 1)
        acc = warpgroup_mma(p_op, v_smem.index(prev), acc, is_async=True)
        s = warpgroup_mma_wait(1, deps=(s, ))
        mbarrier.arrive(k_empty.index(stage))
        if j < n_full:
            p, m_i, l_i, alpha = _softmax_tile(s, m_i, l_i, q_pos, j * BLOCK_N, qk_scale, s_layout, BLOCK_N, False)
        else:
            p, m_i, l_i, alpha = _softmax_tile(s, m_i, l_i, q_pos, j * BLOCK_N, qk_scale, s_layout, BLOCK_N, True)
        acc, p_op = warpgroup_mma_wait(0, deps=(acc, p_op))
        mbarrier.arrive(v_empty.index(prev))
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
        p_op = gl.convert_layout(p.to(gl.bfloat16), p_layout)

    last = (n_tiles - 1) % STAGES
    mbarrier.wait(v_ready.index(last), ((n_tiles - 1) // STAGES) & 1)
    acc = warpgroup_mma(p_op, v_smem.index(last), acc, is_async=True)
    acc, p_op = warpgroup_mma_wait(0, deps=(acc, p_op))
    mbarrier.arrive(v_empty.index(last))

    l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
    out = (acc / gl.expand_dims(l_o, 1)).to(gl.bfloat16)
    # The query tile is no longer read: it stages the output for the TMA store.
    q_smem_wg.store(out)
    fence_async_shared()
    tma_store(o_desc, [row0 + wg * HALF, col], q_smem_wg)
    tma.store_wait(0)


@gluon.jit
def _load_tile(desc, smem, ready, empty, stage, free_phase, j, kv_row, kv_col, bt_row_ptr, seq_len,
               BLOCK_N: gl.constexpr, PAGE: gl.constexpr):
    """Key tile ``j`` into ring slot ``stage`` once both consumers freed it. ``PAGE`` 0: rows from
    ``kv_row`` on, one copy; else found through the block table, ``BLOCK_N // BOX`` copies of ``BOX =
    min(PAGE, BLOCK_N)`` rows, each from its page."""
    BOX: gl.constexpr = desc.block_type.shape[0]
    mbarrier.wait(empty.index(stage), free_phase)
    mbarrier.expect(ready.index(stage), BLOCK_N * desc.block_type.nbytes // BOX)
    if PAGE == 0:
        tma_load(desc, [kv_row + j * BLOCK_N, kv_col], ready.index(stage), smem.index(stage))
    else:
        for i in gl.static_range(BLOCK_N // BOX):
            key = j * BLOCK_N + i * BOX
            tma_load(desc, [_cache_row(bt_row_ptr, key, seq_len, PAGE), kv_col], ready.index(stage),
                     smem.index(stage).slice(i * BOX, BOX))


@gluon.jit
def _producer(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty,
              q_row, q_col, kv_row, kv_col, bt_row_ptr, seq_len, n_tiles, BLOCK_N: gl.constexpr, PAGE: gl.constexpr,
              STAGES: gl.constexpr):
    """One warp: Q once, then K and V tiles through the ring."""
    HALF: gl.constexpr = q_desc.block_type.shape[0]
    mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
    tma_load(q_desc, [q_row, q_col], q_bar, q_smem.index(0))
    tma_load(q_desc, [q_row + HALF, q_col], q_bar, q_smem.index(1))
    for j in range(n_tiles):
        stage = j % STAGES
        free_phase = ((j // STAGES) & 1) ^ 1  # a fresh barrier's "previous" phase counts as complete
        _load_tile(k_desc, k_smem, k_ready, k_empty, stage, free_phase, j, kv_row, kv_col, bt_row_ptr, seq_len,
                   BLOCK_N, PAGE)
        _load_tile(v_desc, v_smem, v_ready, v_empty, stage, free_phase, j, kv_row, kv_col, bt_row_ptr, seq_len,
                   BLOCK_N, PAGE)


@gluon.jit
def _causal_attention(q_desc, k_desc, v_desc, o_desc, bt_ptr, s_bt, qk_scale, N: gl.constexpr, H: gl.constexpr,
                      KVH: gl.constexpr, D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                      PAGE: gl.constexpr, STAGES: gl.constexpr, PRODUCER_REGS: gl.constexpr,
                      CONSUMER_REGS: gl.constexpr):
    """Program (head x sequence, query block); blocks longest first (axis 1 reversed). K/V
    descriptors over ``[B * N, KVH * D]`` (``PAGE`` 0) or a paged cache's ``[blocks * PAGE, KVH * D]``."""
    HALF: gl.constexpr = BLOCK_M // 2
    head_seq = gl.program_id(0)
    block = gl.num_programs(1) - 1 - gl.program_id(1)
    head = head_seq % H
    seq = head_seq // H
    kv_head = head // (H // KVH)
    row0 = seq * N + block * BLOCK_M
    first = block * BLOCK_M
    n_tiles = gl.cdiv(first + BLOCK_M, BLOCK_N)
    n_full = first // BLOCK_N

    q_smem = gl.allocate_shared_memory(gl.bfloat16, [2, HALF, D], q_desc.layout)
    k_smem = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, D], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)
        mbarrier.init(v_empty.index(i), count=2)
    bt_row_ptr = bt_ptr + seq * s_bt

    WG0: gl.constexpr = 0
    WG1: gl.constexpr = 1
    gl.warp_specialize([
        (_consumer, (WG0, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty, o_desc, qk_scale, row0,
                     first, head * D, n_tiles, n_full, BLOCK_M, BLOCK_N, D, STAGES)),
        (_consumer, (WG1, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty, o_desc, qk_scale, row0,
                     first, head * D, n_tiles, n_full, BLOCK_M, BLOCK_N, D, STAGES)),
        (_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty, row0,
                     head * D, seq * N, kv_head * D, bt_row_ptr, N, n_tiles, BLOCK_N, PAGE, STAGES)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


def launch_args(q, out, k_rows, v_rows, *, block_table=None, page: int = 0, block_m: int = 128, block_n: int = 128,
                stages: int = 2, producer_regs: int = 24, consumer_regs: int = 240):
    """(grid, args, constexprs) for ``q``/``out`` ``[B, N, H, D]`` (contiguous) and K/V as rows
    ``[rows, KVH * D]``: the sequences' own, one after another (``page`` 0), or a paged cache's
    through ``block_table``."""
    nb, n, h, d = q.shape
    kvh = k_rows.shape[1] // d
    assert n % block_m == 0 and d == 128, "the probe covers whole blocks of head 128"
    q_layout = gl.NVMMASharedLayout.get_default_for([block_m // 2, d], gl.bfloat16)
    kv_layout = gl.NVMMASharedLayout.get_default_for([block_n, d], gl.bfloat16)
    q2, o2 = q.view(nb * n, h * d), out.view(nb * n, h * d)
    box = min(page or block_n, block_n)
    table = block_table if block_table is not None else torch.zeros(1, 1, dtype=torch.int32, device=q.device)
    args = (TensorDescriptor.from_tensor(q2, [block_m // 2, d], q_layout),
            TensorDescriptor.from_tensor(k_rows, [box, d], kv_layout),
            TensorDescriptor.from_tensor(v_rows, [box, d], kv_layout),
            TensorDescriptor.from_tensor(o2, [block_m // 2, d], q_layout),
            table, table.stride(0), d ** -0.5 * LOG2E)
    constexprs = dict(N=n, H=h, KVH=kvh, D=d, BLOCK_M=block_m, BLOCK_N=block_n, PAGE=page, STAGES=stages,
                      PRODUCER_REGS=producer_regs, CONSUMER_REGS=consumer_regs, num_warps=4)
    return (h * nb, n // block_m), args, constexprs


def causal_attention(q, out, k_rows, v_rows, **options):
    """A launcher: see :func:`launch_args`."""
    grid, args, constexprs = launch_args(q, out, k_rows, v_rows, **options)

    def launch():
        _causal_attention[grid](*args, **constexprs)
    return launch


VARIANTS = {
    "n128_s2": dict(block_n=128, stages=2),
    "n64_s4": dict(block_n=64, stages=4),
    "n64_s3": dict(block_n=64, stages=3),
    "n128_s2_r232": dict(block_n=128, stages=2, consumer_regs=232, producer_regs=40),
    "paged16_n128_s2": dict(block_n=128, stages=2, page=16),
    "paged16_n64_s4": dict(block_n=64, stages=4, page=16),
    "paged64_n128_s2": dict(block_n=128, stages=2, page=64),
    "paged256_n128_s2": dict(block_n=128, stages=2, page=256),
}
SHAPES = {"8x2048": (8, 2048), "1x16384": (1, 16384), "16x1024": (16, 1024)}
H, KV_HEADS, D = 32, 8, 128


def _inputs(shape: str, kv_heads: int = KV_HEADS):
    nb, n = SHAPES[shape]
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(nb, n, H, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(nb, n, kv_heads, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(nb, n, kv_heads, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    return q, k, v


def _paged(k, v, page: int):
    """K/V ``[B, N, KVH, D]`` as a cache of shuffled pages and its block table."""
    nb, n, kvh, d = k.shape
    blocks = nb * n // page
    perm = torch.randperm(blocks, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    cache = torch.empty(2, blocks, page, kvh, d, device="cuda", dtype=k.dtype)
    cache[0][perm] = k.reshape(blocks, page, kvh, d)
    cache[1][perm] = v.reshape(blocks, page, kvh, d)
    return cache, perm.view(nb, n // page).to(torch.int32)


def _reference(q, k, v):
    """float32 causal attention (memory-efficient SDPA, K/V heads repeated for the query heads)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    group = q.shape[2] // k.shape[2]
    qt, kt, vt = (x.transpose(1, 2).float() for x in (q, k, v))
    kt, vt = kt.repeat_interleave(group, 1), vt.repeat_interleave(group, 1)
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
        return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True).transpose(1, 2)


def _flops(shape: str) -> float:
    nb, n = SHAPES[shape]
    return nb * 4 * H * D * n * (n + 1) / 2  # causal: each query row sees its position + 1 keys


def _time(fn) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=100, rep=400) * 1e3


def run_variant(name: str, shape: str) -> dict:
    """One variant on one shape in this process: error against float32, then µs beside cuDNN's."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q, k, v = _inputs(shape)
    out = torch.full_like(q, float("nan"))
    variant = dict(VARIANTS[name])
    if "page" in variant:
        cache, block_table = _paged(k, v, variant["page"])
        rows = [c.view(-1, k.shape[2] * D) for c in cache]
        launch = causal_attention(q, out, *rows, block_table=block_table, **variant)
    else:
        launch = causal_attention(q, out, k.view(-1, k.shape[2] * D), v.view(-1, k.shape[2] * D), **variant)
    launch()
    torch.cuda.synchronize()
    err = (out.float() - _reference(q, k, v)).abs().max().item()
    us = _time(launch)
    kh, vh = k.repeat_interleave(H // KV_HEADS, 2), v.repeat_interleave(H // KV_HEADS, 2)
    qt, kt, vt = q.transpose(1, 2), kh.transpose(1, 2), vh.transpose(1, 2)

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
    cudnn_us = _time(cudnn)
    flops = _flops(shape)
    return dict(variant=name, shape=shape, max_abs_err=err, us=round(us, 1), tflops=round(flops / us / 1e6, 1),
                cudnn_us=round(cudnn_us, 1), cudnn_tflops=round(flops / cudnn_us / 1e6, 1),
                vs_cudnn=round(cudnn_us / us, 3), **VARIANTS[name])


def run_peers(shape: str) -> list[dict]:
    """cuDNN and FlashAttention-2 (SDPA, dense, query heads' K/V repeated, no copy) and our paged kernel
    (pages of 16, shuffled; no store) on one shape."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from compiled_attn.kernels.paged_attention import paged_attention
    q, k, v = _inputs(shape)
    nb, n = SHAPES[shape]
    kh, vh = k.repeat_interleave(H // KV_HEADS, 2), v.repeat_interleave(H // KV_HEADS, 2)
    qt, kt, vt = q.transpose(1, 2), kh.transpose(1, 2), vh.transpose(1, 2)
    rows, flops = [], _flops(shape)
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
        def sdpa(backend=backend):
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
        us = _time(sdpa)
        rows.append(dict(variant=f"sdpa {backend.name}", shape=shape, us=round(us, 1),
                         tflops=round(flops / us / 1e6, 1)))
    cache, block_table = _paged(k, v, 16)
    query_start_loc = torch.arange(0, nb * n + 1, n, device="cuda", dtype=torch.int32)
    seq_lens = torch.full((nb,), n, device="cuda", dtype=torch.int32)
    one = torch.ones((), device="cuda")
    out = torch.full_like(q, float("nan"))

    def ours():
        paged_attention(q.view(nb * n, H, D), cache, query_start_loc, seq_lens, block_table, out.view(nb * n, H, D),
                        max_query_len=n, scale=D ** -0.5, k_scale=one, v_scale=one)
    ours()
    torch.cuda.synchronize()
    err = (out.float() - _reference(q, k, v)).abs().max().item()
    us = _time(ours)
    rows.append(dict(variant="ours: paged_attention, pages of 16 (no store_kv)", shape=shape, us=round(us, 1),
                     tflops=round(flops / us / 1e6, 1), max_abs_err=err))
    return rows


def compile_sm90(name: str, n: int = 2048):
    """Variant ``name``'s kernel built for an H100 on this machine (no GPU needed), specialised as a
    launch on one ``n``-token sequence would be: a screen, and what the CPU test checks."""
    from compiled_attn.kernels import _aot

    variant = dict(VARIANTS[name])
    q = torch.empty(1, n, H, D, dtype=torch.bfloat16)
    rows = torch.empty(n, KV_HEADS * D, dtype=torch.bfloat16)
    table = torch.zeros(1, n // variant.get("page", n), dtype=torch.int32) if "page" in variant else None
    _, args, constexprs = launch_args(q, torch.empty_like(q), rows, rows, block_table=table, **variant)
    return _aot.compile_gluon(_causal_attention, args, constexprs)


# (query lengths, sequence lengths) of each step. The mixed ones are chunked-prefill steps: a prefill
# chunk and the running sequences' decodes in one launch, as the scheduler batches them.
AB_CASES = {"8x2048": ([2048] * 8, [2048] * 8), "1x16384": ([16384], [16384]),
            "4x2048 over 8192": ([2048] * 4, [10240] * 4),
            "2048 over 8192 + 64 decodes of 4096": ([2048] + [1] * 64, [10240] + [4096] * 64),
            "512 + 128 decodes of 2048": ([512] + [1] * 128, [512] + [2048] * 128),
            "32x64 over 4096": ([64] * 32, [4096] * 32), "32x128 over 4096": ([128] * 32, [4096] * 32)}


# gluon_prefill's module constants, by setting (the first is the one the others are checked against).
# Earlier runs' settings name switches of those commits: one program an item against persistent
# (benchmarks/gluon_prefill_ab_h100.json); TMA store and a ping-pong between the consumers since
# removed (gluon_prefill_ab2_h100.json); every sequence in the Gluon kernel
# (gluon_prefill_mixed_ab_h100.json); one Triton launch of the short sequences, also at 128
# (gluon_prefill_short_ab_h100.json); programmatic dependent launch of the Gluon kernel and the short
# launches, not kept (gluon_prefill_pdl_ab_h100.json); consumers deferring an item's last P·V into the
# next, timed with --ab-against, not kept (gluon_prefill_pipelined_ab*_h100.json); the K/V store inside
# the kernel, not kept (gluon_prefill_store_ab_h100.json), and through TMA from the loaded tiles (a
# branch a copy: gluon_prefill_fused_store_ab*_h100.json, the code in gluon_prefill_fused_store.diff;
# straight-line: gluon_prefill_fused_store_tile*_h100.json, timed with --ab-store; FUSE_STORE since).
AB_SETTINGS = {
    "as committed": dict(SHORT_QUERY_LEN=64),
}


def kernel_of(path: str) -> dict:
    """The launch of another version of gluon_prefill.py (``git show REV:compiled_attn/kernels/
    gluon_prefill.py > FILE``), as a setting: its ``launch_args`` and ``_prefill_kernel`` stand in
    for the package's."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("compiled_attn.kernels._gluon_prefill_ab", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return dict(launch_args=module.launch_args, _prefill_kernel=module._prefill_kernel)


# --ab-store: the step with its K/V store, the kernel storing most of it against store_kv first.
AB_STORE_SETTINGS = {"fused store": dict(FUSE_STORE=True), "store_kv then kernel": dict(FUSE_STORE=False)}


def run_ab(rounds: int, cases=tuple(AB_CASES), against: dict[str, str] | None = None, head_size: int = D,
           store: bool = False) -> list[dict]:
    """The package's paged_attention (pages of 16, shuffled; no store) at the prefill-shaped steps
    ``cases`` of AB_CASES, graph-replayed, under each of AB_SETTINGS in turn, the kernels of the
    files ``against`` names (:func:`kernel_of`) and the Triton kernel, ``rounds`` times, and each
    output's error against the first setting's; heads of ``head_size``. ``store``: the step stores
    its new K/V first (as the ``triton`` backend does), under AB_STORE_SETTINGS, and each setting's
    cache is checked against the new K/V once (new slots NaN before)."""
    from triton.testing import do_bench_cudagraph

    from compiled_attn.kernels import gluon_prefill as gp
    from compiled_attn.kernels.paged_attention import fused_store_plan, paged_attention
    from compiled_attn.kernels.store_kv import store_kv
    own = dict(launch_args=gp.launch_args, _prefill_kernel=gp._prefill_kernel)
    chosen = AB_STORE_SETTINGS if store else AB_SETTINGS
    settings = {name: dict(ENABLED=True, **own, **setting) for name, setting in chosen.items()}
    for name, path in (against or {}).items():
        settings[name] = dict(ENABLED=True, **kernel_of(path), **(dict(FUSE_STORE=True) if store else {}))
    settings["triton"] = dict(ENABLED=False)
    rows = []
    for case in cases:
        q_lens, seq_lens = AB_CASES[case]
        gen = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(sum(q_lens), H, head_size, device="cuda", dtype=torch.bfloat16, generator=gen)
        pages = [triton.cdiv(n, 16) for n in seq_lens]
        cache = torch.randn(2, sum(pages), 16, KV_HEADS, head_size, device="cuda", dtype=torch.bfloat16,
                            generator=gen)
        order = torch.randperm(sum(pages), device="cuda", generator=gen).to(torch.int32)
        block_table = torch.zeros(len(pages), max(pages), device="cuda", dtype=torch.int32)
        for i, part in enumerate(order.split(pages)):
            block_table[i, :len(part)] = part
        query_start_loc = torch.tensor([0] + q_lens, device="cuda", dtype=torch.int32).cumsum(0, dtype=torch.int32)
        lens = torch.tensor(seq_lens, device="cuda", dtype=torch.int32)
        one = torch.ones((), device="cuda")
        n = max(q_lens)
        k_new, v_new = (torch.randn(sum(q_lens), KV_HEADS, head_size, device="cuda", dtype=torch.bfloat16,
                                    generator=gen) for _ in range(2))
        if os.environ.get("AB_QKV_VIEWS"):  # q, k and v as views of one projection's output, as in a model
            qkv = torch.cat([q, k_new, v_new], 1)
            q, k_new, v_new = qkv[:, :H], qkv[:, H:H + KV_HEADS], qkv[:, H + KV_HEADS:]
        positions = torch.cat([torch.arange(c - q, c, device="cuda") for q, c in zip(q_lens, seq_lens)])
        seq_of = torch.repeat_interleave(torch.arange(len(q_lens), device="cuda"), torch.tensor(q_lens, device="cuda"))
        slots = block_table[seq_of, positions // 16].long() * 16 + positions % 16
        flops = sum(4 * H * head_size * (q * (c - q) + q * (q + 1) / 2) for q, c in zip(q_lens, seq_lens))
        outs = {}
        for r in range(rounds):
            for name, setting in settings.items():
                for key, value in setting.items():
                    setattr(gp, key, value)
                out = torch.full_like(q, float("nan"))

                def fn():
                    fused = None
                    if store:
                        fused = fused_store_plan(q, k_new, v_new, cache, out, max_query_len=n)
                        store_kv(k_new, v_new, cache, slots, one, one,
                                 skip_fused=fused and (query_start_loc, lens, *fused))
                    paged_attention(q, cache, query_start_loc, lens, block_table, out, max_query_len=n,
                                    scale=head_size ** -0.5, k_scale=one, v_scale=one, new_kv=fused and (k_new, v_new))

                if store and r == 0:
                    flat = cache.view(2, -1, KV_HEADS, head_size)
                    flat[:, slots] = float("nan")
                    fn()
                    torch.cuda.synchronize()
                    wrong = ((flat[0, slots] != k_new).sum() + (flat[1, slots] != v_new).sum()).item()
                    rows.append(dict(case=case, setting=name, cache_values_wrong=wrong, fused=gp.FUSE_STORE))
                    print("ROW " + json.dumps(rows[-1]), flush=True)
                fn()
                us = do_bench_cudagraph(fn, rep=300) * 1e3
                outs[name] = out
                row = dict(case=case, head_size=head_size, setting=name, round=r, us=round(us, 1),
                           tflops=round(flops / us / 1e6, 1))
                rows.append(row)
                print("ROW " + json.dumps(row), flush=True)
        ref = outs[next(iter(chosen))].float()
        for name, out in outs.items():
            err = ((out.float() - ref).norm() / ref.norm()).item()
            rows.append(dict(case=case, setting=name, rel_error_vs_first=err, nan=bool(out.isnan().any())))
            print("ROW " + json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    import subprocess
    import sys

    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default="gluon_probe.json")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--shapes", default="8x2048,1x16384")
    parser.add_argument("--one", nargs=2, metavar=("VARIANT", "SHAPE"), help="run one (in a child process)")
    parser.add_argument("--peers", metavar="SHAPE", help="run the peers on one shape (in a child process)")
    parser.add_argument("--timeout", type=int, default=120, help="seconds a child may take (a hang is a result)")
    parser.add_argument("--ab", type=int, metavar="ROUNDS",
                        help="time the package's kernels under each gluon_prefill setting instead")
    parser.add_argument("--ab-cases", default=",".join(AB_CASES), help="the steps --ab times (AB_CASES)")
    parser.add_argument("--ab-head-size", type=int, default=D, help="the head size --ab times")
    parser.add_argument("--ab-against", nargs=2, action="append", metavar=("NAME", "FILE"), default=[],
                        help="one more --ab setting: the kernel of another gluon_prefill.py")
    parser.add_argument("--ab-store", action="store_true",
                        help="--ab times the step with its K/V store: fused into the kernel against store_kv first")
    args = parser.parse_args()
    if args.ab:
        rows = run_ab(args.ab, args.ab_cases.split(","), dict(args.ab_against), args.ab_head_size, args.ab_store)
        against = "".join(f" --ab-against '{name}' {path}" for name, path in args.ab_against)
        against += " --ab-store" if args.ab_store else ""
        against += f" --ab-head-size {args.ab_head_size}" if args.ab_head_size != D else ""
        Path(args.json).write_text(json.dumps(dict(
            card=torch.cuda.get_device_name(), triton=triton.__version__, torch=torch.__version__,
            command=f"python scripts/gluon_prefill_probe.py --ab {args.ab} --ab-cases '{args.ab_cases}'{against}",
            rows=rows), indent=1))
        return
    if args.one:
        print("ROW " + json.dumps(run_variant(*args.one)), flush=True)
        return
    if args.peers:
        for row in run_peers(args.peers):
            print("ROW " + json.dumps(row), flush=True)
        return
    rows = []

    def child(*child_args: str, label: dict) -> None:
        try:
            done = subprocess.run([sys.executable, __file__, *child_args], capture_output=True, text=True,
                                  timeout=args.timeout)
            found = [json.loads(line[4:]) for line in done.stdout.splitlines() if line.startswith("ROW ")]
            if not found:
                tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
                found = [dict(label, error=" | ".join(tail)[-600:])]
        except subprocess.TimeoutExpired:
            found = [dict(label, error=f"no result in {args.timeout} s (a hang)")]
        for row in found:
            rows.append(row)
            print(json.dumps(row), flush=True)

    for shape in args.shapes.split(","):
        child("--peers", shape, label=dict(variant="peers", shape=shape))
        for name in args.variants.split(","):
            child("--one", name, shape, label=dict(variant=name, shape=shape))
    Path(args.json).write_text(json.dumps(dict(
        card=torch.cuda.get_device_name(), triton=triton.__version__, torch=torch.__version__,
        command="python scripts/gluon_prefill_probe.py", heads=H, kv_heads=KV_HEADS, head_size=D, dtype="bfloat16",
        causal=True, rows=rows), indent=1))


if __name__ == "__main__":
    main()
