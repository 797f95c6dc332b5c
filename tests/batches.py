"""Named batch specs and a builder of fresh random paged batches, shared by the tests.

A batch holds each sequence's whole K/V densely (float64, the ground truth), a paged cache
whose context blocks hold the already-cached part (randomly permuted blocks; unused blocks
poisoned), and the new tokens' q/k/v.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from compiled_attn import AttentionMetadata, AttentionSpec

# (query_lens, seq_lens): seq_len counts the cached context plus the new tokens.
BATCH_SPECS: dict[str, tuple[list[int], list[int]]] = {
    "small_decode": ([1, 1, 1], [5, 17, 33]),
    "large_decode": ([1] * 12, [1, 7, 16, 17, 31, 64, 65, 90, 120, 128, 150, 200]),
    "mixed": ([7, 1, 1, 12], [7, 33, 130, 40]),
    "prefix_prefill": ([8, 5], [40, 21]),
    "chunked_prefill": ([16, 16], [16, 48]),
    "spec_decode": ([3, 4, 2], [20, 35, 9]),
}

# One tolerance rule: ||out - ref|| / ||ref|| per compute dtype.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}
ALIBI4 = [2.0 ** (-8 * (h + 1) / 4) for h in range(4)]  # the standard ALiBi slopes of 4 heads
POISON = 448.0  # finite in every cache dtype (fp8 e4m3 max), far from N(0, 1) data


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (out.double() - ref.double()).norm().item() / max(ref.double().norm().item(), 1e-30)


@dataclasses.dataclass
class Batch:
    spec: AttentionSpec
    meta: AttentionMetadata
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    kv_cache: torch.Tensor
    dense_k: list[torch.Tensor]  # per sequence [seq_len, KVH, D] float64 (the truth)
    dense_v: list[torch.Tensor]
    used_blocks: torch.Tensor  # bool [num_blocks]
    query_lens: list[int]
    num_real_tokens: int


def make_batch(
    name: str,
    spec: AttentionSpec,
    *,
    dtype: torch.dtype = torch.float32,
    block_size: int = 16,
    seed: int = 0,
    pad_tokens: int = 3,
    pad_seqs: int = 1,
    max_query_len: int | None = None,
    device: str = "cpu",
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> Batch:
    query_lens, seq_lens = BATCH_SPECS[name]
    g = torch.Generator().manual_seed(seed)
    cache_dtype = spec.cache_dtype(dtype)
    kvh, d = spec.num_kv_heads, spec.head_size
    needed = [math.ceil(n / block_size) for n in seq_lens]
    num_blocks = sum(needed) + 5  # spare blocks stay poisoned
    order = torch.randperm(num_blocks, generator=g).tolist()
    tables, used = [], torch.zeros(num_blocks, dtype=torch.bool)
    for n in needed:
        tables.append(order[:n])
        used[order[:n]] = True
        order = order[n:]
    kv_cache = torch.full((2, num_blocks, block_size, kvh, d), POISON).to(cache_dtype)
    dense_k, dense_v, new_k, new_v = [], [], [], []
    for q_len, n, blocks in zip(query_lens, seq_lens, tables):
        # Values representable in the cache dtype, so the truth and the cache agree exactly.
        ks = (torch.randn(n, kvh, d, generator=g) / k_scale).to(cache_dtype).double() * k_scale
        vs = (torch.randn(n, kvh, d, generator=g) / v_scale).to(cache_dtype).double() * v_scale
        if not spec.is_fp8:
            ks, vs = ks.to(dtype).double(), vs.to(dtype).double()
        dense_k.append(ks)
        dense_v.append(vs)
        for pos in range(n):
            b, off = blocks[pos // block_size], pos % block_size
            if pos < n - q_len:
                kv_cache[0, b, off] = (ks[pos] / k_scale).to(cache_dtype)
                kv_cache[1, b, off] = (vs[pos] / v_scale).to(cache_dtype)
            else:
                # New slots inside used blocks start as noise: the store must overwrite them.
                kv_cache[:, b, off] = torch.randn(2, kvh, d, generator=g).to(cache_dtype)
        new_k.append(ks[n - q_len:])
        new_v.append(vs[n - q_len:])
    total = sum(query_lens)
    pad = lambda x: torch.cat([torch.cat(x), torch.randn(pad_tokens, *x[0].shape[1:], generator=g, dtype=torch.float64)])
    meta = AttentionMetadata.build(query_lens, seq_lens, tables, block_size, device, num_tokens=total + pad_tokens,
                                   num_seqs=len(seq_lens) + pad_seqs, num_blocks=num_blocks,
                                   max_query_len=max_query_len)
    q = torch.randn(total + pad_tokens, spec.num_heads, d, generator=g).to(dtype)
    return Batch(
        spec=spec, meta=meta, q=q.to(device), k=pad(new_k).to(dtype).to(device), v=pad(new_v).to(dtype).to(device),
        kv_cache=kv_cache.to(device), dense_k=dense_k, dense_v=dense_v, used_blocks=used.to(device),
        query_lens=query_lens, num_real_tokens=total,
    )


def textbook_attention(batch: Batch, alibi_slopes: list[float] | None = None) -> torch.Tensor:
    """Dense causal attention per sequence in float64, from the dense truth (never the cache)."""
    spec, q = batch.spec, batch.q.double().cpu()
    group = spec.num_heads // spec.num_kv_heads
    out = torch.zeros_like(q)
    start = 0
    for q_len, ks, vs in zip(batch.query_lens, batch.dense_k, batch.dense_v):
        n = ks.shape[0]
        for i in range(q_len):
            p = n - q_len + i
            for h in range(spec.num_heads):
                scores = (ks[: p + 1, h // group] @ q[start + i, h]) * spec.softmax_scale
                key_pos = torch.arange(p + 1, dtype=torch.float64)
                if alibi_slopes is not None:
                    scores = scores + alibi_slopes[h] * (key_pos - p)
                if spec.logits_soft_cap is not None:
                    scores = spec.logits_soft_cap * torch.tanh(scores / spec.logits_soft_cap)
                if spec.sliding_window is not None:
                    scores = scores.masked_fill(key_pos <= p - spec.sliding_window, float("-inf"))
                out[start + i, h] = torch.softmax(scores, 0) @ vs[: p + 1, h // group]
        start += q_len
    return out
