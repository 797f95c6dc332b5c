"""Input checks shared by the layer, the ops and the metadata. The ``check_*`` functions are
static (shapes, dtypes, devices, never values), so they cost nothing under ``torch.compile`` (they
become guards) or CUDA-graph capture; each error names the tensor and what it should be.
:func:`contents_key` says when the host-side value checks must run again."""

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


INDEX_DTYPES = {"query_start_loc": torch.int32, "seq_lens": torch.int32, "block_table": torch.int32,
                "slot_mapping": torch.int64}


def check_metadata(query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor,
                   slot_mapping: torch.Tensor, num_tokens: int, device: torch.device) -> None:
    """The metadata's index dtypes and device, one batch size across it, and one slot a token."""
    tensors = dict(query_start_loc=query_start_loc, seq_lens=seq_lens, block_table=block_table,
                   slot_mapping=slot_mapping)
    for name, t in tensors.items():
        if t.dtype != INDEX_DTYPES[name]:
            raise ValueError(f"{name} must be {INDEX_DTYPES[name]}, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but q is on {device}; build the metadata on {device}")
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


def contents_key(*tensors: torch.Tensor) -> tuple:
    """What changes when the tensors' contents may have: their storage and in-place write counter.
    Inference tensors keep no counter, so an in-place change to one goes unseen (a new tensor in
    its place is seen)."""
    return tuple((t.data_ptr(), None if t.is_inference() else t._version) for t in tensors)
