"""``flash_attn``: FlashAttention-2 (the ``flash-attn`` package, 2.6 or newer) over the paged cache.

The canonical cache ``kv_cache [2, num_blocks, block_size, KVH, D]`` needs no copy: ``kv_cache[0]``
and ``kv_cache[1]`` are exactly flash-attn's paged ``k_cache``/``v_cache`` layout
``[num_blocks, page_block_size, KVH, D]``. One step is:

1. **Store** the new K/V through ``slot_mapping`` with ``store.store_kv`` (one Triton launch on
   CUDA; the same bytes every backend writes). flash-attn's fused append
   (``flash_attn_with_kvcache(k=, v=)``) is not used: it writes at ``cache_seqlens[b]`` for
   *every* sequence of the batch, and a padding sequence (``seq_len == 0``) cannot be told to
   store nothing.
2. **Attend**, choosing the call from static data only (``max_query_len`` is a Python int from the
   bucket, never read from a tensor):

   - ``meta.max_query_len == 1`` (a decode bucket): ``flash_attn_with_kvcache(q[B, 1, H, D],
     k_cache, v_cache, cache_seqlens=seq_lens, block_table=block_table, causal=True, ...)`` runs
     flash-attn's split-KV decode kernel. In the decode layout (one token per sequence, token i
     in sequence i) ``q`` is passed as it is; otherwise each sequence's query is gathered through
     ``query_start_loc`` and the results scattered back to their token rows.
   - otherwise ``flash_attn_varlen_func(q, k_cache, v_cache, cu_seqlens_q=query_start_loc,
     cu_seqlens_k=[0, cumsum(seq_lens)], max_seqlen_q=max(max_query_len, 2),
     max_seqlen_k=block_table.shape[1] * block_size, causal=True, block_table=block_table, ...)``.
     ``max_seqlen_q`` is at least 2 because with exactly 1 flash-attn switches (for GQA) to a
     layout that assumes token ``b`` belongs to sequence ``b``, which padded batches break.
3. **Zero the padding rows** (tokens at or beyond ``query_start_loc[-1]``): flash-attn leaves them
   unwritten. Done with ``torch.where`` on the device, no host sync.

Features, mapped onto flash-attn's conventions (``p`` = the query's absolute position):

- sliding window ``w`` (keys ``(p - w, p]``) -> ``window_size=(w - 1, 0)``;
- ALiBi: flash adds ``-slope * |p - j|`` = ``slope * (j - p)`` for visible keys, our definition;
- soft-cap: flash computes ``cap * tanh(scale * q.k / cap)``, ours too, but flash adds the ALiBi
  bias *after* the cap and ours adds it before, so ALiBi together with soft-cap is refused;
- fp8 KV caches: refused (FlashAttention-2 has none).

Both library calls are wrapped in our own ``torch.library`` custom ops
(``compiled_attn::flash_attn_varlen_paged``, ``compiled_attn::flash_attn_paged_decode``) with
exact fake impls, so calling them directly under ``torch.compile(fullgraph=True)`` never breaks
the graph (flash-attn's ``flash_attn_with_kvcache`` is not a registered op). The backend's
``forward`` is capturable in a CUDA graph: no host syncs, no value-dependent shapes.

Not done: the FlashAttention-3 interface (``flash_attn_interface``, Hopper builds) is not wired;
it would lift the page-size restriction and add fp8.
"""

from __future__ import annotations

import importlib
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..metadata import AttentionMetadata
from ..spec import AttentionSpec
from .base import AttentionBackend, head_size_reason, package_reason
from .store import store_kv

# flash_attn_with_kvcache's num_splits: 0 = its own heuristic. FACTS.md (H100, page 256) measured
# that heuristic 10-15% short of the best fixed split at small and ragged decode batches; a tuned
# value belongs in a plan step fed by `compiled-attn bench`, not here.
DECODE_NUM_SPLITS = 0


def flash_window(sliding_window: int | None) -> tuple[int, int]:
    """flash-attn's ``window_size`` for our ``sliding_window`` (keys ``(p - w, p]``).

    >>> flash_window(None), flash_window(1), flash_window(8)
    ((-1, -1), (0, 0), (7, 0))
    """
    if sliding_window is None:
        return (-1, -1)
    return (sliding_window - 1, 0)


def copy_valid_rows(out: torch.Tensor, result: torch.Tensor, query_start_loc: torch.Tensor) -> None:
    """``result`` into ``out`` with the padding rows (tokens at or beyond ``query_start_loc[-1]``,
    which the FlashAttention calls leave unwritten) zeroed; no host sync."""
    valid = torch.arange(out.shape[0], device=out.device) < query_start_loc[-1]
    out.copy_(torch.where(valid[:, None, None], result, 0))


def _flash():
    """The imported ``flash_attn`` package (imported lazily: it is an optional dependency)."""
    return importlib.import_module("flash_attn")


@torch.library.custom_op("compiled_attn::flash_attn_varlen_paged", mutates_args=())
def flash_attn_varlen_paged(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    block_table: torch.Tensor,
    alibi_slopes: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    window_left: int,
    softcap: float,
) -> torch.Tensor:
    """Causal paged varlen attention via ``flash_attn.flash_attn_varlen_func``; returns ``[T, H, D]``.

    q ``[T, H, D]`` fp16/bf16; k_cache/v_cache ``[num_blocks, page, KVH, D]`` (page a multiple of
    256); cu_seqlens_q/k ``[B+1]`` int32; block_table ``[B, max_blocks]`` int32; alibi_slopes
    ``[H]`` fp32 or None; ``window_left`` -1 = no window; ``softcap`` 0.0 = none. Rows at or beyond
    ``cu_seqlens_q[-1]`` are left unspecified (flash-attn does not write them).

    Equivalent PyTorch, per sequence b with ``sq`` queries and ``sk`` keys, query i, key j::

        p = i + sk - sq;  s = scale * q_i . k_j  (softcap: s = cap * tanh(s / cap));  s -= slope * |p - j|
        visible: j <= p and (window_left < 0 or j >= p - window_left);  out_i = softmax(s) @ v
    """
    window = (window_left, 0) if window_left >= 0 else (-1, -1)
    return _flash().flash_attn_varlen_func(
        q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        softmax_scale=softmax_scale, causal=True, window_size=window, softcap=softcap,
        alibi_slopes=alibi_slopes, block_table=block_table,
    )


@flash_attn_varlen_paged.register_fake
def _(q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, block_table, alibi_slopes, max_seqlen_q, max_seqlen_k,
      softmax_scale, window_left, softcap):
    return torch.empty_like(q)


@torch.library.custom_op("compiled_attn::flash_attn_paged_decode", mutates_args=())
def flash_attn_paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    block_table: torch.Tensor,
    alibi_slopes: torch.Tensor | None,
    softmax_scale: float,
    window_left: int,
    softcap: float,
    num_splits: int,
) -> torch.Tensor:
    """One query per sequence over its paged context via ``flash_attn.flash_attn_with_kvcache``.

    q ``[B, H, D]`` (the query of sequence b is the token at position ``cache_seqlens[b] - 1``);
    cache_seqlens ``[B]`` int32 (whole context, the query's own key included, already stored);
    other arguments as ``flash_attn_varlen_paged``. Returns ``[B, H, D]``; a sequence with
    ``cache_seqlens == 0`` gets zeros. Nothing is appended to the cache (no ``k=``/``v=``).
    """
    window = (window_left, 0) if window_left >= 0 else (-1, -1)
    out = _flash().flash_attn_with_kvcache(
        q.unsqueeze(1), k_cache, v_cache, cache_seqlens=cache_seqlens, block_table=block_table,
        softmax_scale=softmax_scale, causal=True, window_size=window, softcap=softcap,
        alibi_slopes=alibi_slopes, num_splits=num_splits,
    )
    return out.squeeze(1)


@flash_attn_paged_decode.register_fake
def _(q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes, softmax_scale, window_left, softcap,
      num_splits):
    return torch.empty_like(q)


class FlashAttnBackend(AttentionBackend):
    """FlashAttention-2 through the ``flash-attn`` package: CUDA, sm80-sm90, fp16/bf16, pages of 256*k."""

    name = "flash_attn"
    reads_head_major = False  # the package's paged kernels take token-major pages
    device_types = ("cuda",)
    dtypes = (torch.float16, torch.bfloat16)
    head_sizes = None  # any multiple of 8 up to 256, checked in extra_reason
    head_size_multiple: ClassVar[int] = 8
    max_head_size: ClassVar[int] = 256
    block_size_multiple = 256  # FlashAttention-2: "Paged KV cache block size must be divisible by 256"
    max_block_size = 512  # not a flash-attn limit: the largest page the tests run
    features = frozenset({"sliding_window", "alibi", "logits_soft_cap"})
    required_packages = ("flash_attn",)
    min_compute_capability = (8, 0)
    # flash_attn_2_cuda accepts only these majors ("FlashAttention only supports Ampere GPUs or newer"
    # is raised for anything that is neither sm8x nor sm90).
    compute_capability_majors: ClassVar[tuple[int, ...]] = (8, 9)
    min_version: ClassVar[tuple[int, int]] = (2, 6)  # softcap arrived in 2.6.0
    block_size_message = (
        "block_size {block_size} is not supported: FlashAttention-2's paged KV needs pages that are "
        "a multiple of {multiple} (at most {largest} here); use block_size=256 or another backend")

    @classmethod
    def extra_reason(
        cls, spec: AttentionSpec, *, device: torch.device, dtype: torch.dtype | None, block_size: int | None
    ) -> str | None:
        if reason := head_size_reason(spec.head_size, multiple=cls.head_size_multiple, largest=cls.max_head_size):
            return reason
        if spec.alibi_slopes is not None and spec.logits_soft_cap is not None:
            return ("does not support alibi together with logits_soft_cap (flash-attn adds the ALiBi bias "
                    "after the soft-cap, compiled_attn before it)")
        if device.type == "cuda":
            major = torch.cuda.get_device_capability(device)[0]
            if major not in cls.compute_capability_majors:
                return f"FlashAttention-2 runs on compute capability 8.x and 9.x only, device has {major}.x"
            return cls.import_reason()
        return None

    @classmethod
    def import_reason(cls) -> str | None:
        """Why the installed package cannot be used (fails to import, too old), or None."""
        reason = package_reason("flash_attn", _flash, ("flash_attn_varlen_func", "flash_attn_with_kvcache"))
        if reason:
            return reason
        flash = _flash()
        version = _version_tuple(getattr(flash, "__version__", "0"))
        if version < cls.min_version or version[0] != 2:
            return (f"flash_attn {getattr(flash, '__version__', '?')} is not supported "
                    f"(needs 2.x, at least {'.'.join(map(str, cls.min_version))})")
        return None

    @classmethod
    def forward(cls, q, k, v, kv_cache, meta: AttentionMetadata, out, *, scale, sliding_window, logits_soft_cap,
                alibi_slopes, k_scale, v_scale) -> None:
        if kv_cache.dtype.itemsize == 1:
            raise ValueError("flash_attn does not support fp8_kv_cache (FlashAttention-2 has no fp8 KV); "
                             "use backend='torch_native' or 'reference'")
        if alibi_slopes is not None and logits_soft_cap is not None:
            raise ValueError("flash_attn does not support alibi together with logits_soft_cap; "
                             "use backend='reference'")
        store_kv(k, v, kv_cache, meta.slot_mapping, k_scale, v_scale)
        num_tokens = q.shape[0]
        if num_tokens == 0:
            return
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        window_left = flash_window(sliding_window)[0]
        softcap = float(logits_soft_cap or 0.0)
        slopes = None if alibi_slopes is None else alibi_slopes.float().contiguous()
        block_table = meta.block_table.contiguous()
        starts = meta.query_start_loc
        if meta.is_decode_layout(num_tokens):  # padding sequences are the trailing tokens, zeroed below
            result = flash_attn_paged_decode(q, k_cache, v_cache, meta.seq_lens, block_table, slopes, scale,
                                             window_left, softcap, DECODE_NUM_SPLITS)
        elif meta.max_query_len == 1:
            result = _decode(q, k_cache, v_cache, meta, block_table, slopes, scale, window_left, softcap)
        else:
            cu_seqlens_k = F.pad(torch.cumsum(meta.seq_lens, 0, dtype=torch.int32), (1, 0))
            result = flash_attn_varlen_paged(
                q, k_cache, v_cache, starts, cu_seqlens_k, block_table, slopes,
                max(meta.max_query_len, 2), block_table.shape[1] * kv_cache.shape[2], scale, window_left, softcap,
            )
        copy_valid_rows(out, result, starts)


def _decode(q, k_cache, v_cache, meta: AttentionMetadata, block_table, slopes, scale, window_left, softcap):
    """Decode bucket (every sequence has at most one new token): gather, attend, scatter back."""
    num_tokens = q.shape[0]
    starts = meta.query_start_loc.long()
    first = starts[:-1].clamp(max=num_tokens - 1)
    per_seq = flash_attn_paged_decode(q[first], k_cache, v_cache, meta.seq_lens, block_table, slopes, scale,
                                      window_left, softcap, DECODE_NUM_SPLITS)
    # Sequences without a new token write to a spare row that is dropped.
    dest = torch.where(starts[1:] > starts[:-1], first, num_tokens)
    rows = q.new_zeros(num_tokens + 1, *q.shape[1:])
    rows.index_copy_(0, dest, per_seq.to(q.dtype))
    return rows[:num_tokens]


def _version_tuple(version: str) -> tuple[int, int]:
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit()) or "0"
        parts.append(int(digits))
    return tuple((parts + [0, 0])[:2])
