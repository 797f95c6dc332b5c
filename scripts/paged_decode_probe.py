"""Does reading pages with the tensor-memory accelerator (TMA) stream decode faster than pointer
loads? A diagnostic for the gap between our decode and dense cuDNN (GPU only, sm_90; not part of
the package).

    python scripts/paged_decode_probe.py --json out/decode_probe.json

The benchmark's decode 32x4096 (32 query heads, 8 KV heads, head size 128, bf16) over a head-major
paged cache (``[2, blocks, kv_heads, 16, D]``: one head's page is 4 KB in one piece) with random page
order, by minimal kernels that differ only in how a page reaches shared memory: one program a
(sequence, KV head) walking all of its pages, as cuDNN's dense kernel walks its context, with
pointer loads of 64-key tiles (four pages, ``cp.async``) or one TMA box a page (16 keys), at a few
pipeline depths. PyTorch's cuDNN SDPA over the same keys laid out dense, and our unified kernel over
the same pages (as the package splits the context, and with at most 1 or 2 splits), run in the same
process; each timed as the benchmark times, in a CUDA graph of 4 calls.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton
import triton.language as tl

from compiled_attn import bench

CASE = next(case for case in bench.CASES if case.name == "decode 32x4096")
B, CONTEXT = len(CASE.seq_lens), CASE.seq_lens[0]
H, KVH, D = bench.LLAMA3_8B.num_heads, bench.LLAMA3_8B.num_kv_heads, bench.LLAMA3_8B.head_size
PAGE = 16
CALLS = 4  # calls a CUDA graph replays (the cache, 1 GB, is far larger than L2)
LOG2E = 1.4426950408889634


@triton.jit
def _online_softmax(acc, m_i, l_i, s, v, qk_scale):
    """One key tile's step: scores ``s`` (natural units) into the running max, sum and output."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    p = tl.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    return acc * alpha[:, None] + tl.dot(p.to(v.dtype), v), m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _decode_probe(q_ptr, cache, bt_ptr, out_ptr, qk_scale, num_blocks, seq_lens_ptr, s_cb, s_ch, s_cs,
                  PAGES: tl.constexpr, KVH: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                  BM: tl.constexpr, PAGE: tl.constexpr, TILE_PAGES: tl.constexpr, TMA: tl.constexpr,
                  STAGES: tl.constexpr, DYN_LEN: tl.constexpr, RT_STRIDES: tl.constexpr, GDC: tl.constexpr,
                  TWO_LOOPS: tl.constexpr):
    """One (sequence, KV head): its G query heads (padded to BM rows) over all PAGES pages.

    What our kernel does and this one need not, each a switch: the trip count from the sequence's
    length (``DYN_LEN``), the cache's strides as arguments (``RT_STRIDES``), and waiting for the
    kernel before it (``GDC``, programmatic dependent launch), and a second, masked loop for a last
    part-filled tile, which this shape never runs (``TWO_LOOPS``)."""
    if GDC:
        tl.extra.cuda.gdc_wait()
    seq = tl.program_id(0) // KVH
    head = tl.program_id(0) % KVH
    offs_m = tl.arange(0, BM)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < G
    q = tl.load(q_ptr + (seq * KVH * G + head * G + offs_m)[:, None] * D + offs_d[None, :], mask=row_ok[:, None],
                other=0.0)
    acc = tl.zeros((BM, D), tl.float32)
    m_i = tl.full((BM,), float("-inf"), tl.float32)
    l_i = tl.zeros((BM,), tl.float32)
    v_rows = num_blocks * KVH * PAGE  # the V half of the cache, in rows of D
    if TMA:
        for page in tl.range(0, PAGES, num_stages=STAGES):
            block = tl.load(bt_ptr + seq * PAGES + page)
            row = (block * KVH + head) * PAGE
            k = cache.load([row, 0])
            v = cache.load([v_rows + row, 0])
            acc, m_i, l_i = _online_softmax(acc, m_i, l_i, tl.dot(q, k.T), v, qk_scale)
    else:
        TILE_N: tl.constexpr = TILE_PAGES * PAGE
        offs_n = tl.arange(0, TILE_N)
        tiles = PAGES // TILE_PAGES
        seq_len = PAGES * PAGE
        if DYN_LEN or TWO_LOOPS:
            seq_len = tl.load(seq_lens_ptr + seq)
            tiles = seq_len // TILE_N
        for tile in tl.range(0, tiles, num_stages=STAGES):
            block = tl.load(bt_ptr + seq * PAGES + tile * TILE_PAGES + offs_n // PAGE)
            if RT_STRIDES:
                kv = (block * s_cb + (offs_n % PAGE) * s_cs)[:, None] + head * s_ch + offs_d[None, :]
                k = tl.load(cache + kv)
                v = tl.load(cache + v_rows * D + kv)
            else:
                rows = (block * KVH + head) * PAGE + offs_n % PAGE
                k = tl.load(cache + rows[:, None] * D + offs_d[None, :])
                v = tl.load(cache + (v_rows + rows)[:, None] * D + offs_d[None, :])
            acc, m_i, l_i = _online_softmax(acc, m_i, l_i, tl.dot(q, k.T), v, qk_scale)
        if TWO_LOOPS:
            for tile in tl.range(tiles, tl.cdiv(seq_len, TILE_N), num_stages=STAGES):
                key_ok = tile * TILE_N + offs_n < seq_len
                block = tl.load(bt_ptr + seq * PAGES + tile * TILE_PAGES + offs_n // PAGE, mask=key_ok, other=0)
                rows = (block * KVH + head) * PAGE + offs_n % PAGE
                k = tl.load(cache + rows[:, None] * D + offs_d[None, :], mask=key_ok[:, None], other=0.0)
                v = tl.load(cache + (v_rows + rows)[:, None] * D + offs_d[None, :], mask=key_ok[:, None], other=0.0)
                s = tl.where(key_ok[None, :], tl.dot(q, k.T), float("-inf"))
                acc, m_i, l_i = _online_softmax(acc, m_i, l_i, s, v, qk_scale)
    out = acc / l_i[:, None]
    tl.store(out_ptr + (seq * KVH * G + head * G + offs_m)[:, None] * D + offs_d[None, :], out.to(q.dtype),
             mask=row_ok[:, None])


# (The block-table load that feeds each tile takes pipeline stages too: a TMA page at 4 stages holds
# about 1.5 buffers of shared memory on sm_90, at 8 about 3.5.)
POINTER = dict(tma=False, tile_pages=4, stages=4, warps=4)
VARIANTS = [dict(POINTER, stages=s) for s in (3, 4, 6)] + [
    dict(tma=False, tile_pages=1, stages=s, warps=4) for s in (4, 8)] + [
    dict(tma=True, tile_pages=1, stages=s, warps=4) for s in (4, 6, 8, 12)] + [
    dict(tma=True, tile_pages=1, stages=8, warps=1)] + [
    dict(POINTER, **{switch: True}) for switch in ("dyn_len", "rt_strides", "gdc")] + [
    dict(POINTER, dyn_len=True, rt_strides=True, gdc=True), dict(POINTER, two_loops=True),
    dict(POINTER, dyn_len=True, rt_strides=True, gdc=True, two_loops=True)]


def decode_probe(variant: dict, q, cache, block_table, out, seq_lens):
    """A launcher of one variant for ``q``/``out`` ``[B, H, D]`` over a head-major ``cache``
    ``[2, blocks, KVH, PAGE, D]`` whose sequences are all ``block_table.shape[1]`` pages long."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    batch, heads, d = q.shape
    _, num_blocks, kv_heads, page, _ = cache.shape
    flat = cache.view(-1, d)
    src = TensorDescriptor.from_tensor(flat, [page, d]) if variant["tma"] else flat
    extra = dict(launch_pdl=True) if variant.get("gdc") else {}

    def launch():
        _decode_probe[(batch * kv_heads,)](
            q, src, block_table, out, d ** -0.5 * LOG2E, num_blocks, seq_lens, kv_heads * page * d, page * d, d,
            PAGES=block_table.shape[1], KVH=kv_heads, G=heads // kv_heads, D=d, BM=16, PAGE=page,
            TILE_PAGES=variant["tile_pages"], TMA=variant["tma"], STAGES=variant["stages"],
            DYN_LEN=variant.get("dyn_len", False), RT_STRIDES=variant.get("rt_strides", False),
            GDC=variant.get("gdc", False), TWO_LOOPS=variant.get("two_loops", False),
            num_warps=variant["warps"], num_stages=variant["stages"], **extra)
    return launch


def main() -> None:

    from compiled_attn.kernels import paged_attention as pa
    from compiled_attn.kernels.paged_attention import paged_attention

    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default="decode_probe.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    pages = CONTEXT // PAGE
    num_blocks = 2 * B * pages  # a pool twice the batch's pages, the batch's in random order
    cache = torch.randn(2, num_blocks, KVH, PAGE, D, device="cuda", dtype=torch.bfloat16)
    block_table = torch.randperm(num_blocks, device="cuda")[: B * pages].view(B, pages).to(torch.int32)
    q = torch.randn(B, H, D, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(q)
    # The same keys dense, [B, KVH, CONTEXT, D], for cuDNN and the reference.
    k_dense = cache[0][block_table.long()].permute(0, 2, 1, 3, 4).reshape(B, KVH, CONTEXT, D).contiguous()
    v_dense = cache[1][block_table.long()].permute(0, 2, 1, 3, 4).reshape(B, KVH, CONTEXT, D).contiguous()
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.float().unsqueeze(2), k_dense.float(), v_dense.float(), enable_gqa=True).squeeze(2)
    kv_bytes = 2 * B * KVH * CONTEXT * D * 2
    rows = []

    def report(name, fn):
        try:
            out.fill_(float("nan"))
            fn()
            torch.cuda.synchronize()
            err = (out.float() - ref).abs().max().item()
            us = bench.time_graph(lambda: [fn() for _ in range(CALLS)], CALLS)
            row = dict(name=name, us=round(us, 1), gbs=round(kv_bytes / us / 1e3), max_abs_err=err)
        except Exception as err:  # a variant that does not compile is a result too
            row = dict(name=name, error=f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
        rows.append(row)
        print(json.dumps(row), flush=True)

    from torch.nn.attention import SDPBackend, sdpa_kernel
    q4 = q.unsqueeze(2)

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            out.copy_(torch.nn.functional.scaled_dot_product_attention(q4, k_dense, v_dense, enable_gqa=True).squeeze(2))
    report("sdpa CUDNN_ATTENTION (dense, with a copy into out)", cudnn)

    seq_lens = torch.full((B,), CONTEXT, device="cuda", dtype=torch.int32)
    for variant in VARIANTS:
        report("probe " + json.dumps(variant), decode_probe(variant, q, cache, block_table, out, seq_lens))

    query_start_loc = torch.arange(0, B + 1, device="cuda", dtype=torch.int32)
    one = torch.ones((), device="cuda")

    def ours():
        paged_attention(q, cache.transpose(2, 3), query_start_loc, seq_lens, block_table, out, max_query_len=1,
                        scale=D ** -0.5, k_scale=one, v_scale=one)
    report("ours: paged_attention over the same head-major pages (splits as the package picks)", ours)
    for splits in (1, 2):
        default = pa.MAX_SPLITS
        pa.MAX_SPLITS = splits
        try:
            report(f"ours: paged_attention, at most {splits} split(s)", ours)
        finally:
            pa.MAX_SPLITS = default
    Path(args.json).write_text(json.dumps(dict(
        card=torch.cuda.get_device_name(), triton=triton.__version__, torch=torch.__version__,
        command="python scripts/paged_decode_probe.py",
        shape=dict(batch=B, context=CONTEXT, heads=H, kv_heads=KVH, head_size=D, page=PAGE, dtype="bfloat16"),
        rows=rows), indent=1))


if __name__ == "__main__":
    main()
