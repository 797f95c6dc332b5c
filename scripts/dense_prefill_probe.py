"""What Triton reaches on causal prefill attention with no pages: the ceiling our paged kernel is
held to on this compiler (GPU only; a diagnostic, not part of the package).

    python scripts/dense_prefill_probe.py --json out/dense_probe.json

8 sequences x 2,048 tokens, 32 query heads, head size 128, bf16, causal (the benchmark's prefill
8x2048), for dense kernels written the way ours is (online softmax in log2 units, mask-free tiles
below the diagonal, blocks longest first, K/V tiles software-pipelined by Triton), on
``[B, N, heads, D]`` tensors with 8 KV heads (a program's rows the ``BLOCK_M // 4`` tokens x 4 query
heads of one KV head, as in our kernel) or 32 (one query head a program). Each with pointer loads
(``cp.async``) or tensor descriptors (TMA), one program a query block or persistent (a program an
SM walking the blocks), and ``tl.range(warp_specialize=...)``. PyTorch's SDPA (cuDNN,
FlashAttention-2) and our paged kernel run in the same process.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton
import triton.language as tl

from compiled_attn import bench

CASE = next(case for case in bench.CASES if case.name == "prefill 8x2048")
B, N = len(CASE.query_lens), CASE.query_lens[0]
H, KV_HEADS, D = bench.LLAMA3_8B.num_heads, bench.LLAMA3_8B.num_kv_heads, bench.LLAMA3_8B.head_size
LOG2E = 1.4426950408889634


@triton.jit
def _key_tiles(acc, m_i, l_i, q, k_src, v_src, k_col, lo, hi, q_pos, qk_scale, D: tl.constexpr,
               BLOCK_N: tl.constexpr, ROW_STRIDE: tl.constexpr, MASKED: tl.constexpr, TMA: tl.constexpr,
               WS: tl.constexpr, STAGES: tl.constexpr):
    """Keys ``[lo, hi)`` (rows of k/v from row 0 of this sequence), online softmax in log2 units."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    for start in tl.range(lo, hi, BLOCK_N, num_stages=STAGES, warp_specialize=WS):
        if TMA:
            k = k_src.load([start, k_col])
            v = v_src.load([start, k_col])
        else:
            rows = (start + offs_n).to(tl.int64) * ROW_STRIDE + k_col
            k = tl.load(k_src + rows[:, None] + offs_d[None, :])
            v = tl.load(v_src + rows[:, None] + offs_d[None, :])
        s = tl.dot(q, k.T)
        if MASKED:
            s = tl.where(q_pos[:, None] >= (start + offs_n)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _query_block(block, seq, kvh, q_src, k_src, v_src, o_dst, qk_scale,
                 N: tl.constexpr, H: tl.constexpr, KVH: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, TMA: tl.constexpr, WS: tl.constexpr, STAGES: tl.constexpr):
    """One program's rows: ``BLOCK_M // G`` tokens x the ``G = H // KVH`` query heads of KV head
    ``kvh`` (G = 1: one head's tokens). Tensors are ``[B*N, heads, D]``; TMA views are 2-D
    ``[B*N, heads*D]`` for K/V and 3-D for q/o."""
    G: tl.constexpr = H // KVH
    BLOCK_Q: tl.constexpr = BLOCK_M // G
    first = block * BLOCK_Q
    rows = tl.arange(0, BLOCK_M)
    q_pos = first + rows // G
    tok = (seq * N + q_pos).to(tl.int64)
    head = kvh * G + rows % G
    offs_d = tl.arange(0, D)
    if TMA:
        q = q_src.load([seq * N + first, kvh * G, 0]).reshape(BLOCK_M, D)
        k_rows, v_rows = k_src, v_src
    else:
        q = tl.load(q_src + tok[:, None] * (H * D) + head[:, None] * D + offs_d[None, :])
        k_rows = k_src + tl.cast(seq * N, tl.int64) * (KVH * D)
        v_rows = v_src + tl.cast(seq * N, tl.int64) * (KVH * D)
    k_first = seq * N if TMA else 0
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    # Whole tiles before the block's first query need no mask. Row offsets: TMA coordinates count
    # from the tensor's first row, pointers from the sequence's.
    diagonal = (first // BLOCK_N) * BLOCK_N
    acc, m_i, l_i = _key_tiles(acc, m_i, l_i, q, k_rows, v_rows, kvh * D, k_first, k_first + diagonal,
                               q_pos + k_first, qk_scale, D, BLOCK_N, KVH * D, False, TMA, WS, STAGES)
    acc, m_i, l_i = _key_tiles(acc, m_i, l_i, q, k_rows, v_rows, kvh * D, k_first + diagonal,
                               k_first + first + BLOCK_Q, q_pos + k_first, qk_scale, D, BLOCK_N, KVH * D, True,
                               TMA, WS, STAGES)
    o = (acc / l_i[:, None]).to(tl.bfloat16)
    if TMA:
        o_dst.store([seq * N + first, kvh * G, 0], o.reshape(BLOCK_Q, G, D))
    else:
        tl.store(o_dst + tok[:, None] * (H * D) + head[:, None] * D + offs_d[None, :], o)


@triton.jit
def _dense_attention(q_src, k_src, v_src, o_dst, qk_scale, NB: tl.constexpr, N: tl.constexpr, H: tl.constexpr,
                     KVH: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     TMA: tl.constexpr, WS: tl.constexpr, STAGES: tl.constexpr, PERSISTENT: tl.constexpr,
                     PROGRAMS: tl.constexpr):
    """Query blocks longest first, the (sequence, KV head) pairs of a block on consecutive programs."""
    num_blocks: tl.constexpr = N // (BLOCK_M // (H // KVH))
    pairs: tl.constexpr = NB * KVH
    if PERSISTENT:
        for t in range(tl.program_id(0), num_blocks * pairs, PROGRAMS):
            _query_block(num_blocks - 1 - t // pairs, (t % pairs) // KVH, t % KVH, q_src, k_src, v_src, o_dst,
                         qk_scale, N, H, KVH, D, BLOCK_M, BLOCK_N, TMA, WS, STAGES)
    else:
        t = tl.program_id(0)
        _query_block(num_blocks - 1 - t // pairs, (t % pairs) // KVH, t % KVH, q_src, k_src, v_src, o_dst,
                     qk_scale, N, H, KVH, D, BLOCK_M, BLOCK_N, TMA, WS, STAGES)


def dense_attention(q, k, v, out, *, block_m: int, block_n: int, warps: int, stages: int, tma: bool, ws: bool,
                    persistent: bool, programs_per_sm: int = 1):
    """A launcher for ``q``/``out`` ``[B, N, H, D]`` and ``k``/``v`` ``[B, N, KVH, D]`` (contiguous)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    nb, n, h, d = q.shape
    kvh = k.shape[2]
    group = h // kvh
    tiles = (n // (block_m // group)) * nb * kvh
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
    programs = min(tiles, sms * programs_per_sm) if persistent else tiles
    if tma:
        q3, o3 = q.view(nb * n, h, d), out.view(nb * n, h, d)
        k2, v2 = k.view(nb * n, kvh * d), v.view(nb * n, kvh * d)
        srcs = (TensorDescriptor.from_tensor(q3, [block_m // group, group, d]),
                TensorDescriptor.from_tensor(k2, [block_n, d]), TensorDescriptor.from_tensor(v2, [block_n, d]),
                TensorDescriptor.from_tensor(o3, [block_m // group, group, d]))
    else:
        srcs = (q, k, v, out)

    def launch():
        _dense_attention[(programs,)](*srcs, d ** -0.5 * LOG2E, NB=nb, N=n, H=h, KVH=kvh, D=d, BLOCK_M=block_m,
                                      BLOCK_N=block_n, TMA=tma, WS=ws, STAGES=stages, PERSISTENT=persistent,
                                      PROGRAMS=programs, num_warps=warps, num_stages=stages)
    return launch


VARIANTS = [dict(block_m=m, block_n=n, warps=w, stages=s, tma=tma, ws=ws, persistent=p)
            for p in (False, True) for tma in (False, True) for ws in ((False, True) if tma else (False,))
            for m, n, w, s in ((256, 64, 8, 3), (256, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2))]


def main() -> None:
    from triton.testing import do_bench

    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default="dense_probe.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    q = torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16)
    kv = {heads: (torch.randn(B, N, heads, D, device="cuda", dtype=torch.bfloat16),
                  torch.randn(B, N, heads, D, device="cuda", dtype=torch.bfloat16)) for heads in (H, KV_HEADS)}
    out = torch.empty_like(q)
    flops = bench.prefill_flops(CASE, bench.LLAMA3_8B)
    rows = []

    def report(name, fn, heads, check):
        k, v = kv[heads]
        try:
            out.fill_(float("nan"))
            fn()
            torch.cuda.synchronize()
            err = None
            if check:
                ref = torch.nn.functional.scaled_dot_product_attention(
                    q.transpose(1, 2).float(), k.transpose(1, 2).float(), v.transpose(1, 2).float(), is_causal=True,
                    enable_gqa=True)
                err = (out.transpose(1, 2).float() - ref).abs().max().item()
            us = do_bench(fn, warmup=100, rep=400) * 1e3
            row = dict(name=name, kv_heads=heads, us=round(us, 1), tflops=round(flops / us / 1e6, 1), max_abs_err=err)
        except Exception as err:  # a variant that does not compile is a result too
            row = dict(name=name, kv_heads=heads, error=f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
        rows.append(row)
        print(json.dumps(row), flush=True)

    from torch.nn.attention import SDPBackend, sdpa_kernel
    qt, kt, vt = q.transpose(1, 2), kv[H][0].transpose(1, 2), kv[H][1].transpose(1, 2)
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
        def sdpa(backend=backend):
            with sdpa_kernel(backend):
                out.transpose(1, 2).copy_(torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True))
        report(f"sdpa {backend.name} (dense, MHA, with a copy into out)", sdpa, H, True)
    for heads in (KV_HEADS, H):
        for variant in VARIANTS:
            launch = dense_attention(q, *kv[heads], out, **variant)
            report("dense triton " + json.dumps(variant), launch, heads, True)

    from compiled_attn.kernels.paged_attention import paged_attention
    for heads in (KV_HEADS, H):
        k, v = kv[heads]
        block_size = 16
        blocks = B * N // block_size
        perm = torch.randperm(blocks, device="cuda")
        cache = torch.empty(2, blocks, block_size, heads, D, device="cuda", dtype=torch.bfloat16)
        cache[0][perm] = k.reshape(blocks, block_size, heads, D)
        cache[1][perm] = v.reshape(blocks, block_size, heads, D)
        block_table = perm.view(B, N // block_size).to(torch.int32)
        query_start_loc = torch.arange(0, B * N + 1, N, device="cuda", dtype=torch.int32)
        seq_lens = torch.full((B,), N, device="cuda", dtype=torch.int32)
        one = torch.ones((), device="cuda")
        q_flat, out_flat = q.view(B * N, H, D), out.view(B * N, H, D)

        def ours():
            paged_attention(q_flat, cache, query_start_loc, seq_lens, block_table, out_flat, max_query_len=N,
                            scale=D ** -0.5, k_scale=one, v_scale=one)
        report("ours: paged_attention, pages of 16 (no store_kv)", ours, heads, True)
    Path(args.json).write_text(json.dumps(dict(
        card=torch.cuda.get_device_name(), triton=triton.__version__, torch=torch.__version__,
        command="python scripts/dense_prefill_probe.py", shape=dict(batch=B, tokens=N, heads=H, head_size=D,
                                                                     causal=True, dtype="bfloat16"),
        rows=rows), indent=1))


if __name__ == "__main__":
    main()
