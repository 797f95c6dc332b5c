"""``flash_attn3``: FlashAttention-3 (the ``flash_attn_3`` package, module ``flash_attn_interface``)
over the paged cache.

FlashAttention-3's ``flash_attn_with_kvcache`` takes varlen queries together with a paged cache,
so **one call serves every step** (prefill over a cached prefix, chunked prefill, decode,
spec-decode), with pages of any size (up to 256 tokens here, as the other backends):

1. **Store** the new K/V through ``slot_mapping`` (``store.store_kv``: one Triton launch on CUDA).
   FlashAttention-3's own append (``k=``/``v=``) is not used, for the reason given in
   ``flash_attn.py`` (it appends for every sequence, padding ones included).
2. **Attend**: ``flash_attn_with_kvcache(q [T, H, D], kv_cache[0], kv_cache[1],
   cache_seqlens=seq_lens, page_table=block_table, cu_seqlens_q=query_start_loc,
   max_seqlen_q=max(max_query_len, 2), softmax_scale=scale, causal=True, window_size=(w - 1, 0),
   softcap=cap, num_splits=n)``. ``cache_seqlens`` counts every key, the just-stored ones
   included; the causal mask is bottom-right aligned, as ours (query ``i`` of ``sq`` over ``sk``
   keys sees keys ``<= i + sk - sq``).
3. **Zero the padding rows** (tokens at or beyond ``query_start_loc[-1]``), which it leaves unwritten.

``num_splits`` is fixed from static shapes (never FlashAttention-3's own heuristic, ``0``): its
fake impl refuses ``0`` under ``torch.compile``, and a split count that differs between capture
and replay of a CUDA graph is a reported illegal-memory-access.

Limits (``supports`` reasons): CUDA compute capability 9.0 (the Hopper build), fp16/bf16, head
sizes that are multiples of 8 up to 256, no ALiBi (FlashAttention-3 has none), no fp8 KV cache
(its fp8 path wants q, K and V all in e4m3 with per-(sequence, KV head) descales; ours is a
K/V-only cache with per-layer scales).

Verified only against a stand-in module that implements the documented semantics on CPU
(``tests/test_flash_attn3.py``); not yet run against the real package on a GPU. Not in the
automatic priority list until measured: select it with ``backend="flash_attn3"``.
"""

from __future__ import annotations

import importlib
from typing import ClassVar

import torch

from ..metadata import AttentionMetadata
from ..split_kv import num_sms, split_count
from ..spec import AttentionSpec
from .base import AttentionBackend, head_size_reason, package_reason
from .flash_attn import copy_valid_rows, flash_window
from .store import store_kv

SPLIT_MAX_QUERY_LEN = 8  # split the keys only for decode-like buckets
SPLIT_TARGET_PROGRAMS_PER_SM = 2
SPLIT_MIN_KEYS = 256
MAX_SPLITS = 32


def _interface():
    """The imported ``flash_attn_interface`` (lazily: an optional dependency)."""
    return importlib.import_module("flash_attn_interface")


def static_num_splits(*, num_seqs: int, kv_heads: int, max_keys: int, max_query_len: int, num_sms: int) -> int:
    """A split count from static shapes only (the same for every replay of a bucket).

    >>> static_num_splits(num_seqs=1, kv_heads=8, max_keys=4096, max_query_len=1, num_sms=132)
    16
    >>> static_num_splits(num_seqs=256, kv_heads=8, max_keys=4096, max_query_len=1, num_sms=132)
    1
    >>> static_num_splits(num_seqs=1, kv_heads=8, max_keys=4096, max_query_len=512, num_sms=132)
    1
    """
    return split_count(
        programs=num_seqs * kv_heads, max_context=max_keys, max_query_len=max_query_len, num_sms=num_sms,
        split_max_query_len=SPLIT_MAX_QUERY_LEN, programs_per_sm=SPLIT_TARGET_PROGRAMS_PER_SM,
        min_keys=SPLIT_MIN_KEYS, max_splits=MAX_SPLITS)


@torch.library.custom_op("compiled_attn::flash_attn3_paged", mutates_args=())
def flash_attn3_paged(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cache_seqlens: torch.Tensor,
    page_table: torch.Tensor,
    max_seqlen_q: int,
    softmax_scale: float,
    window_left: int,
    softcap: float,
    num_splits: int,
) -> torch.Tensor:
    """Causal attention of every new token over its paged context via FlashAttention-3.

    q ``[T, H, D]`` fp16/bf16; k_cache/v_cache ``[num_pages, page, KVH, D]``; cu_seqlens_q
    ``[B+1]``, cache_seqlens ``[B]`` (every key, the new ones already stored) and page_table
    ``[B, max_pages]``, all int32; ``window_left`` -1 = no window; ``softcap`` 0.0 = none.
    Returns ``[T, H, D]``; rows at or beyond ``cu_seqlens_q[-1]`` are unspecified.
    """
    window = (window_left, 0) if window_left >= 0 else (-1, -1)
    out = _interface().flash_attn_with_kvcache(
        q, k_cache, v_cache, cache_seqlens=cache_seqlens, page_table=page_table, cu_seqlens_q=cu_seqlens_q,
        max_seqlen_q=max_seqlen_q, softmax_scale=softmax_scale, causal=True, window_size=window, softcap=softcap,
        num_splits=num_splits,
    )
    return out[0] if isinstance(out, tuple) else out  # (out, lse, ...) when asked for the LSE


@flash_attn3_paged.register_fake
def _(q, k_cache, v_cache, cu_seqlens_q, cache_seqlens, page_table, max_seqlen_q, softmax_scale, window_left,
      softcap, num_splits):
    return torch.empty_like(q)


class FlashAttn3Backend(AttentionBackend):
    """FlashAttention-3 through ``flash_attn_interface``: CUDA sm90, fp16/bf16, pages of 1-256 tokens."""

    name = "flash_attn3"
    reads_head_major = False  # the package's paged kernels take token-major pages
    device_types = ("cuda",)
    dtypes = (torch.float16, torch.bfloat16)
    head_size_multiple: ClassVar[int] = 8
    max_head_size: ClassVar[int] = 256
    features = frozenset({"sliding_window", "logits_soft_cap"})
    required_packages = ("flash_attn_interface",)
    min_compute_capability = (9, 0)

    @classmethod
    def extra_reason(
        cls, spec: AttentionSpec, *, device: torch.device, dtype: torch.dtype | None, block_size: int | None
    ) -> str | None:
        if reason := head_size_reason(spec.head_size, multiple=cls.head_size_multiple, largest=cls.max_head_size):
            return reason
        if device.type == "cuda":
            return package_reason("flash_attn_interface", _interface, ("flash_attn_with_kvcache",))
        return None

    @classmethod
    def forward(cls, q, k, v, kv_cache, meta: AttentionMetadata, out, *, scale, sliding_window, logits_soft_cap,
                alibi_slopes, k_scale, v_scale) -> None:
        if kv_cache.dtype.itemsize == 1:
            raise ValueError("flash_attn3 does not support fp8_kv_cache (FlashAttention-3's fp8 needs fp8 queries "
                             "and per-head descales); use backend='trtllm' or 'triton'")
        if alibi_slopes is not None:
            raise ValueError("flash_attn3 does not support alibi; use backend='trtllm' or 'triton'")
        store_kv(k, v, kv_cache, meta.slot_mapping, k_scale, v_scale)
        if q.shape[0] == 0:
            return
        kv_heads, block_table = kv_cache.shape[3], meta.block_table.contiguous()
        num_splits = static_num_splits(
            num_seqs=meta.seq_lens.shape[0], kv_heads=kv_heads, max_keys=block_table.shape[1] * kv_cache.shape[2],
            max_query_len=meta.max_query_len, num_sms=num_sms(q.device))
        # max_seqlen_q is only an upper bound; at least 2 keeps clear of single-query special cases
        # (FlashAttention-2 repacks GQA heads there, assuming token b is sequence b).
        result = flash_attn3_paged(
            q, kv_cache[0], kv_cache[1], meta.query_start_loc, meta.seq_lens, block_table,
            max(meta.max_query_len, 2), scale, flash_window(sliding_window)[0], float(logits_soft_cap or 0.0),
            num_splits)
        copy_valid_rows(out, result, meta.query_start_loc)

