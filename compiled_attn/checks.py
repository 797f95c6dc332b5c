"""Static input checks shared by the layer and the ops: shapes and dtypes only, never values, so
they cost nothing under ``torch.compile`` (they become guards) or CUDA-graph capture. Each error
names the tensor and what it should be."""

from __future__ import annotations

import torch


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def check_kv_shapes(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, num_tokens: int) -> None:
    """k/v ``[num_tokens, kv_heads, head_size]`` as the cache ``[2, num_blocks, block_size,
    kv_heads, head_size]`` holds them (a mismatch would broadcast into the cache unseen)."""
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError(f"kv_cache must be [2, num_blocks, block_size, kv_heads, head_size], got {_shape(kv_cache)}")
    expected = (num_tokens, kv_cache.shape[3], kv_cache.shape[4])
    for name, t in (("k", k), ("v", v)):
        if _shape(t) != expected:
            raise ValueError(f"{name} must be {list(expected)} (num_tokens, the cache's kv_heads and head_size), "
                             f"got {_shape(t)}")


def check_metadata_shapes(query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor,
                          slot_mapping: torch.Tensor, num_tokens: int) -> None:
    """One batch size across the metadata, and one slot a token."""
    if seq_lens.dim() != 1:
        raise ValueError(f"seq_lens must be 1-D [num_seqs], got {_shape(seq_lens)}")
    num_seqs = seq_lens.shape[0]
    if query_start_loc.dim() != 1 or query_start_loc.shape[0] != num_seqs + 1:
        raise ValueError(f"query_start_loc must be [num_seqs + 1] = [{num_seqs + 1}] for {num_seqs} seq_lens, "
                         f"got {_shape(query_start_loc)}")
    if block_table.dim() != 2 or block_table.shape[0] != num_seqs:
        raise ValueError(f"block_table must be [num_seqs, max_blocks] with num_seqs = {num_seqs}, "
                         f"got {_shape(block_table)}")
    if slot_mapping.dim() != 1 or slot_mapping.shape[0] != num_tokens:
        raise ValueError(f"slot_mapping must be [num_tokens] = [{num_tokens}], got {_shape(slot_mapping)}")


def check_scales(k_scale: torch.Tensor, v_scale: torch.Tensor) -> None:
    """One float32 scale a layer for K and for V (kernels read a single value)."""
    for name, t in (("k_scale", k_scale), ("v_scale", v_scale)):
        if t.numel() != 1 or t.dtype != torch.float32:
            raise ValueError(f"{name} must be one float32 value (a per-layer scale), got {t.dtype} "
                             f"of shape {_shape(t)}")


def versions(*tensors: torch.Tensor) -> tuple[int | None, ...]:
    """The tensors' in-place write counters, to re-check values only after a change; ``None`` for
    inference tensors, which keep none (checked once, then)."""
    return tuple(None if t.is_inference() else t._version for t in tensors)
