"""The op boundary: ``torch.ops.compiled_attn.*`` schemas, fake impls and typed wrappers.

Ops take tensors and scalars only (no Python objects, no global context), so eager mode,
``torch.compile``, CUDA graphs and export all see the same graph. Every op passes
``torch.library.opcheck`` (tests/test_ops.py).
"""

from __future__ import annotations

import torch

from .backends import get_backend
from .metadata import AttentionMetadata
from .backends.paged_torch import store_kv as _store_kv_torch
from .checks import check_kv_shapes, check_metadata, check_scales

# Scalars cannot be None in a schema: 0 means "no sliding window", 0.0 "no soft-cap".
_NO_WINDOW = 0
_NO_SOFT_CAP = 0.0


@torch.library.custom_op("compiled_attn::attention", mutates_args=("kv_cache", "out"))
def _attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    slot_mapping: torch.Tensor,
    out: torch.Tensor,
    k_scale: torch.Tensor,
    v_scale: torch.Tensor,
    alibi_slopes: torch.Tensor | None,
    backend: str,
    scale: float,
    sliding_window: int,
    logits_soft_cap: float,
    max_query_len: int,
) -> None:
    _check_call(q, k, v, kv_cache, query_start_loc, seq_lens, block_table, slot_mapping, out, k_scale, v_scale,
                sliding_window, logits_soft_cap)
    meta = AttentionMetadata(query_start_loc, seq_lens, block_table, slot_mapping, max_query_len)
    impl = get_backend(backend)
    features = dict(sliding_window=sliding_window or None, logits_soft_cap=logits_soft_cap or None,
                    alibi_slopes=alibi_slopes)
    # Static facts only: the check costs nothing under capture and keeps kernels from bad calls.
    reason = impl.call_reason(kv_cache, **features)
    if reason:
        raise ValueError(f"backend {backend!r} cannot serve this call: {reason}")
    impl.forward(q, k, v, kv_cache, meta, out, scale=scale, k_scale=k_scale, v_scale=v_scale, **features)


def _check_call(q, k, v, kv_cache, query_start_loc, seq_lens, block_table, slot_mapping, out, k_scale, v_scale,
                sliding_window, logits_soft_cap) -> None:
    # Static facts only: shapes, dtypes, devices (the layer checked more against its spec; a direct
    # op call gets these).
    if q.dim() != 3 or out.shape != q.shape:
        raise ValueError(f"q and out must both be [num_tokens, num_heads, head_size], got {tuple(q.shape)} and "
                         f"{tuple(out.shape)}")
    check_kv_shapes(k, v, kv_cache, q.shape[0])
    if q.shape[2] != kv_cache.shape[4] or q.shape[1] % kv_cache.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} needs the cache's head_size ({kv_cache.shape[4]}) and a multiple of "
                         f"its {kv_cache.shape[3]} KV heads")
    check_metadata(query_start_loc, seq_lens, block_table, slot_mapping, q.shape[0], q.device)
    check_scales(k_scale, v_scale)
    for name, value in (("sliding_window", sliding_window), ("logits_soft_cap", logits_soft_cap)):
        if value < 0:
            raise ValueError(f"{name} must be positive, or 0 for none; got {value}")


@_attention.register_fake
def _(q, k, v, kv_cache, query_start_loc, seq_lens, block_table, slot_mapping, out, k_scale, v_scale,
      alibi_slopes, backend, scale, sliding_window, logits_soft_cap, max_query_len) -> None:
    return None


@torch.library.custom_op("compiled_attn::store_kv", mutates_args=("kv_cache",))
def _store_kv(
    k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
    k_scale: torch.Tensor, v_scale: torch.Tensor,
) -> None:
    if slot_mapping.dim() != 1:
        raise ValueError(f"slot_mapping must be 1-D [num_tokens], got {tuple(slot_mapping.shape)}")
    check_kv_shapes(k, v, kv_cache, slot_mapping.shape[0])
    check_scales(k_scale, v_scale)
    _store_kv_torch(k, v, kv_cache, slot_mapping, k_scale, v_scale)


@_store_kv.register_fake
def _(k, v, kv_cache, slot_mapping, k_scale, v_scale) -> None:
    return None


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    out: torch.Tensor,
    *,
    backend: str,
    scale: float,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    k_scale: torch.Tensor,
    v_scale: torch.Tensor,
) -> torch.Tensor:
    """Store the new K/V and write paged attention into ``out`` (``[T, H, D]``); returns ``out``.

    q ``[T, H, D]``, k/v ``[T, KVH, D]``, kv_cache ``[2, num_blocks, block_size, KVH, D]``,
    k_scale/v_scale float32 scalars (used by fp8 caches). See ``backends.reference`` for the math.
    """
    _attention(
        q, k, v, kv_cache, meta.query_start_loc, meta.seq_lens, meta.block_table, meta.slot_mapping, out,
        k_scale, v_scale, alibi_slopes, backend, scale, sliding_window or _NO_WINDOW,
        logits_soft_cap or _NO_SOFT_CAP, meta.max_query_len,
    )
    return out


def store_kv(
    k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
    k_scale: torch.Tensor, v_scale: torch.Tensor,
) -> None:
    """``kv_cache[:, slot // bs, slot % bs] = quantize(k, v)`` for each token whose slot is not -1."""
    _store_kv(k, v, kv_cache, slot_mapping, k_scale, v_scale)


# ---- functional twins (for export: the exporter cannot take ops that mutate their inputs) ----
# Schema choices, for torch-tensorrt's plugin generation (tensors first; Tensor/int/float/bool/
# str only): ``alibi_slopes`` is a required tensor, empty (``[0]``) for no ALiBi.


@torch.library.custom_op("compiled_attn::attention_functional", mutates_args=())
def attention_functional(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor,
    v_scale: torch.Tensor,
    alibi_slopes: torch.Tensor,
    backend: str,
    scale: float,
    sliding_window: int,
    logits_soft_cap: float,
    max_query_len: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``compiled_attn::attention`` without side effects: returns ``(out [T, H, D], new_kv_cache)``.

    Equivalent PyTorch code::

        new_kv_cache = kv_cache.clone(); out = torch.empty_like(q)
        torch.ops.compiled_attn.attention(q, k, v, new_kv_cache, ..., out, ...)
        return out, new_kv_cache

    ``alibi_slopes`` is ``[H]`` float32, or empty (``[0]``) for no ALiBi.
    """
    new_cache = kv_cache.clone()
    out = torch.empty_like(q)
    # The mutating op itself (its checks, its backend dispatch) on the copy: the two never diverge.
    torch.ops.compiled_attn.attention.default(
        q, k, v, new_cache, query_start_loc, seq_lens, block_table, slot_mapping, out, k_scale, v_scale,
        alibi_slopes if alibi_slopes.numel() else None, backend, scale, sliding_window, logits_soft_cap,
        max_query_len,
    )
    return out, new_cache


@attention_functional.register_fake
def _(q, k, v, kv_cache, query_start_loc, seq_lens, block_table, slot_mapping, k_scale, v_scale, alibi_slopes,
      backend, scale, sliding_window, logits_soft_cap, max_query_len):
    return torch.empty_like(q), torch.empty_like(kv_cache)


@torch.library.custom_op("compiled_attn::store_kv_functional", mutates_args=())
def store_kv_functional(
    k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
    k_scale: torch.Tensor, v_scale: torch.Tensor,
) -> torch.Tensor:
    """``compiled_attn::store_kv`` without side effects: returns the new cache."""
    new_cache = kv_cache.clone()
    torch.ops.compiled_attn.store_kv.default(k, v, new_cache, slot_mapping, k_scale, v_scale)
    return new_cache


@store_kv_functional.register_fake
def _(k, v, kv_cache, slot_mapping, k_scale, v_scale):
    return torch.empty_like(kv_cache)
