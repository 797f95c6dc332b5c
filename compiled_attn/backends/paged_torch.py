"""Paged-cache building blocks in plain PyTorch, shared by the PyTorch backends and export.

Every function here is free of host synchronisation and value-dependent shapes, so it can run
under CUDA-graph capture and be exported.
"""

from __future__ import annotations

import torch

from ..cache import cache_layout
from ..metadata import AttentionMetadata


def quantize(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast new K/V to the cache dtype; fp8 caches store ``x / scale`` saturated to the fp8 range."""
    if dtype.is_floating_point and dtype.itemsize == 1:
        limit = torch.finfo(dtype).max
        return (x.float() / scale).clamp(-limit, limit).to(dtype)
    return x.to(dtype)


def dequantize(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if x.dtype.itemsize == 1:
        return (x.float() * scale).to(dtype)
    return x.to(dtype)


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor,
    v_scale: torch.Tensor,
) -> None:
    """``kv_cache[:, slot // bs, slot % bs] = (k, v)`` for every token with ``slot >= 0`` (either
    memory order, see ``cache.cache_layout``)."""
    _, num_blocks, block_size, kv_heads, head_size = kv_cache.shape
    if slot_mapping.shape[0] == 0:
        return
    new_k = quantize(k, k_scale, kv_cache.dtype)
    new_v = quantize(v, v_scale, kv_cache.dtype)
    if kv_cache.dtype.itemsize == 1:
        # Index kernels have no fp8 implementations; moving bytes is the same thing.
        kv_cache, new_k, new_v = kv_cache.view(torch.uint8), new_k.view(torch.uint8), new_v.view(torch.uint8)
    # Tokens with slot -1 rewrite the slot and value of the last token that does store (or slot 0's
    # own value if none does): duplicate indices then carry identical bytes, so one index_copy_
    # of fixed size does the store -- no boolean-mask indexing, hence no host sync (capturable).
    stores = slot_mapping >= 0
    index = torch.arange(slot_mapping.shape[0], device=slot_mapping.device)
    last = torch.where(stores, index, -1).max(dim=0, keepdim=True).values  # [1]
    some = last >= 0
    last = last.clamp(min=0)
    slots = torch.where(stores, slot_mapping, torch.where(some, slot_mapping[last], 0))
    head_major = cache_layout(kv_cache) == "head_major"
    for cache, new in ((kv_cache[0], new_k), (kv_cache[1], new_v)):  # [num_blocks, block_size, kv_heads, D]
        filler = torch.where(some[:, None, None], new[last], cache[:1, 0])
        values = torch.where(stores[:, None, None], new, filler)
        if head_major:  # no flat token index over these strides: (block, offset) pairs
            cache.index_put_((slots // block_size, slots % block_size), values)
        else:
            cache.view(num_blocks * block_size, kv_heads, head_size).index_copy_(0, slots, values)


def token_layout(meta: AttentionMetadata, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each new token: (its sequence index, its absolute position, whether it is real).

    Padding tokens get sequence 0, position -1 and ``valid == False``.
    """
    device = meta.query_start_loc.device
    starts = meta.query_start_loc.long()
    token = torch.arange(num_tokens, device=device)
    seq = torch.searchsorted(starts[1:], token, right=True)
    valid = token < starts[-1]
    seq = torch.where(valid, seq, 0).clamp(max=meta.seq_lens.shape[0] - 1)
    query_lens = starts[1:] - starts[:-1]
    context = meta.seq_lens.long() - query_lens
    pos = torch.where(valid, context[seq] + token - starts[seq], -1)
    return seq, pos, valid


def gather_context(
    kv_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor, scale: torch.Tensor, which: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Each sequence's cached K (``which=0``) or V (1) laid out densely: [B, L, kv_heads, D]."""
    _, _, block_size, kv_heads, head_size = kv_cache.shape
    # Table entries past a sequence's blocks may hold anything (the kernels never read them): read
    # block 0 there, whose rows the causal mask hides, rather than index outside the cache.
    listed = torch.arange(block_table.shape[1], device=block_table.device) * block_size < seq_lens[:, None]
    ids = torch.where(listed, block_table.long(), 0)
    blocks = kv_cache[which][ids]  # [B, max_blocks, block_size, kv_heads, D]
    dense = blocks.reshape(block_table.shape[0], -1, kv_heads, head_size)
    return dequantize(dense, scale, dtype)


def score_bias_and_mask(
    query_pos: torch.Tensor,
    key_len: int,
    *,
    sliding_window: int | None,
    alibi_slopes: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal (+ window) visibility ``[..., key_len]`` and the ALiBi bias ``[..., H, key_len]`` or None.

    ``query_pos`` has any leading shape; keys are positions ``0 .. key_len-1``.
    """
    key_pos = torch.arange(key_len, device=query_pos.device)
    qp = query_pos[..., None]
    visible = key_pos <= qp
    if sliding_window is not None:
        visible &= key_pos > qp - sliding_window
    bias = None
    if alibi_slopes is not None:
        distance = (key_pos - qp).float()  # <= 0 for visible keys
        bias = alibi_slopes.float().view(*([1] * query_pos.dim()), -1, 1) * distance[..., None, :]
    return visible, bias
