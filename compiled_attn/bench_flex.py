"""The FlexAttention peer of ``compiled-attn bench``: PyTorch's ``flex_attention`` over our paged cache.

This is how PyTorch itself does paged attention with FlexAttention (the pattern of
``torch.nn.attention.experimental._paged_attention``): the physical pool is one long sequence
``[1, KVH, num_blocks * block_size, D]`` (a free view of ``kv_cache[0]``/``kv_cache[1]``, batch
broadcast to the queries' batch), and a ``BlockMask`` with one sparse KV block per cache page
lists each sequence's pages in its block-table order. Pages wholly visible to a query block go
in the mask's *full* lists (no ``mask_mod`` call); the rest run a ``mask_mod`` that maps a
physical key index back to its logical position through a ``[B, num_blocks]`` table and applies
causality. Compiled with ``torch.compile`` (eager FlexAttention materialises the scores).

Only for the benchmark: sequences of one workload have equal query lengths (the dense query
layout ``[B, H, L, D]``), which every benchmark case has.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Q_BLOCK = 128  # FlexAttention's default sparse query block


def page_lists(seq_len: int, query_len: int, pages: list[int], block_size: int, q_block: int):
    """Per query block of one sequence: (full pages, partially visible pages), in logical order."""
    context = seq_len - query_len
    result = []
    for start in range(0, query_len, q_block):
        first_pos = context + start
        last_pos = context + min(start + q_block, query_len) - 1
        num_full = (first_pos + 1) // block_size  # pages whose last key is visible to the first query
        num_any = last_pos // block_size + 1
        result.append((pages[:num_full], pages[num_full:num_any]))
    return result


def _padded(rows: list[list[int]], width: int) -> torch.Tensor:
    return torch.tensor([row + [0] * (width - len(row)) for row in rows], dtype=torch.int32)


def build_block_mask(query_lens, seq_lens, tables, *, block_size: int, num_blocks: int, mask_mod, device):
    """A ``BlockMask`` over the physical pool for one replica (shapes depend only on the case)."""
    from torch.nn.attention.flex_attention import BlockMask

    query_len = query_lens[0]
    num_q_blocks = math.ceil(query_len / Q_BLOCK)
    width = num_blocks  # a BlockMask's index rows span every KV block of the (physical) sequence
    full, partial = [], []
    for q_len, n, pages in zip(query_lens, seq_lens, tables):
        lists = page_lists(n, q_len, list(pages), block_size, Q_BLOCK)
        full.append([f for f, _ in lists])
        partial.append([p for _, p in lists])

    def as_tensors(per_seq):
        counts = torch.tensor([[len(x) for x in seq] for seq in per_seq], dtype=torch.int32)
        indices = torch.stack([_padded(seq, width) for seq in per_seq])
        return counts[:, None].to(device), indices[:, None].to(device)  # [B, 1, QB], [B, 1, QB, width]

    kv_num, kv_idx = as_tensors(partial)
    full_num, full_idx = as_tensors(full)
    assert kv_num.shape[-1] == num_q_blocks
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=(Q_BLOCK, block_size),
                                    mask_mod=mask_mod, seq_lengths=(query_len, num_blocks * block_size),
                                    compute_q_blocks=False)  # forward only


def make_mask_mod(query_lens, seq_lens, tables, *, block_size: int, num_blocks: int, device):
    """Causal visibility of physical key ``kv`` for query ``q`` of sequence ``b`` (exact on its own,
    so eager FlexAttention, which reads only the ``mask_mod``, agrees with the block lists)."""
    to_logical = torch.full((len(seq_lens), num_blocks), -1, dtype=torch.int32)
    for b, pages in enumerate(tables):
        to_logical[b, torch.tensor(pages, dtype=torch.long)] = torch.arange(len(pages), dtype=torch.int32)
    to_logical = to_logical.to(device)
    context = torch.tensor([n - q for q, n in zip(query_lens, seq_lens)], dtype=torch.int32, device=device)

    def mask_mod(b, h, q_idx, kv_idx):
        logical_page = to_logical[b, kv_idx // block_size]
        logical = logical_page * block_size + kv_idx % block_size
        return (logical_page >= 0) & (logical <= context[b] + q_idx)

    return mask_mod


def flex_paged_contender(*, compile: bool = True) -> Callable:
    """``make(workload) -> run()`` for ``compiled-attn bench`` (the ``peer:flex(paged)`` row)."""
    from torch.nn.attention.flex_attention import flex_attention

    def make(w) -> Callable[[], None]:
        case, spec = w.case, w.spec
        if len(set(case.query_lens)) > 1:
            raise ValueError("this FlexAttention peer needs equal query lengths")
        if w.kv_cache.dtype.itemsize == 1:
            raise ValueError("FlexAttention has no fp8 KV path")
        _, num_blocks, block_size, kv_heads, head = w.kv_cache.shape
        device = w.kv_cache.device
        tables = [m.block_table.tolist() for m in w.metas]
        tables = [[row[:math.ceil(n / block_size)] for row, n in zip(t, case.seq_lens)] for t in tables]
        masks = []
        for t in tables:
            mask_mod = make_mask_mod(case.query_lens, case.seq_lens, t, block_size=block_size,
                                     num_blocks=num_blocks, device=device)
            masks.append(build_block_mask(case.query_lens, case.seq_lens, t, block_size=block_size,
                                          num_blocks=num_blocks, mask_mod=mask_mod, device=device))
        pool = w.kv_cache.view(2, 1, num_blocks * block_size, kv_heads, head).transpose(2, 3)
        b, length = len(case.seq_lens), case.query_lens[0]
        queries = [q.view(b, length, spec.num_heads, head).transpose(1, 2) for q, _, _ in w.qkv]
        outs = [o.view(b, length, spec.num_heads, head) for o in w.outs]
        if compile:
            torch._dynamo.reset()  # one compile per case; keeps clear of the recompile limit
            attend = torch.compile(flex_attention, dynamic=False, fullgraph=True)
        else:
            attend = flex_attention
        # Pages of 16 are smaller than the prefill kernel's default key tile.
        options = {"BLOCK_N": block_size} if length > 1 and device.type == "cuda" else None

        def run() -> None:
            for q, mask, out in zip(queries, masks, outs):
                result = attend(q, pool[0], pool[1], block_mask=mask, scale=spec.softmax_scale, enable_gqa=True,
                                kernel_options=options)
                out.copy_(result.transpose(1, 2))

        run()  # compiles here, outside any capture; raises if FlexAttention cannot take the shape
        return run

    return make
