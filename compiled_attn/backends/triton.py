"""``triton``: our Triton kernels (``compiled_attn.kernels``): store_kv, then one unified
paged-attention launch for the whole mixed batch (plus a split-KV reduction for decode buckets).

Importing this module does not import Triton; the kernels load on first use. On CPU the backend
runs only under the Triton interpreter (``TRITON_INTERPRET=1``, for tests) and is never chosen
by ``"auto"`` there.
"""

from __future__ import annotations

import os

import torch

from ..spec import AttentionSpec
from .base import ALL_FEATURES, AttentionBackend

_NOT_INTERPRETING = "needs CUDA (or TRITON_INTERPRET=1 for testing)"


def _interpreting() -> bool:
    # Mirrors kernels._jit.interpreting() without importing Triton.
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


class TritonBackend(AttentionBackend):
    name = "triton"
    device_types = ("cuda", "cpu")
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    head_sizes = (64, 80, 96, 112, 128, 192, 256)
    block_size_multiple = 16
    max_block_size = 256
    features = ALL_FEATURES
    required_packages = ("triton",)
    min_compute_capability = (8, 0)  # bf16 tl.dot

    @classmethod
    def kv_cache_layout(cls, spec: AttentionSpec) -> str:
        """fp8 caches head-major: each head's page in one piece, not 128-byte rows 1 KB apart. fp8 decode
        at 64x16384 on an H100: 782 us against 816-826 token-major; bf16 within 0.3% either way
        (BENCHMARKS.md; tune_h100.json "fp8_cache_layout", "page_layout")."""
        return "head_major" if spec.is_fp8 else "token_major"

    @classmethod
    def supports(cls, spec: AttentionSpec, *, device="cpu", dtype=None, block_size=None) -> str | None:
        reason = cls.unavailable_reason()
        if reason:
            return reason
        if torch.device(device).type == "cpu" and not _interpreting():
            return _NOT_INTERPRETING
        return super().supports(spec, device=device, dtype=dtype, block_size=block_size)

    @classmethod
    def block_size_reason(cls, block_size: int) -> str | None:
        if block_size & (block_size - 1) or not cls.block_size_multiple <= block_size <= cls.max_block_size:
            return (f"block_size {block_size} is not supported (needs a power of two from "
                    f"{cls.block_size_multiple} to {cls.max_block_size})")
        return None

    @classmethod
    def extra_reason(cls, spec, *, device, dtype, block_size) -> str | None:
        if device.type == "cpu" and dtype == torch.bfloat16:
            return "bfloat16 is not supported by the Triton interpreter on CPU; use float16 or float32"
        if device.type == "cuda" and spec.is_fp8 and torch.cuda.get_device_capability(device) < (8, 9):
            return "fp8_kv_cache needs compute capability >= (8, 9) for e4m3 conversions"
        return None

    @classmethod
    def forward(cls, q, k, v, kv_cache, meta, out, *, scale, sliding_window, logits_soft_cap, alibi_slopes,
                k_scale, v_scale) -> None:
        if q.device.type == "cpu" and not _interpreting():
            raise RuntimeError(f"backend 'triton' on CPU {_NOT_INTERPRETING}")
        from ..kernels.paged_attention import fused_store_plan, paged_attention
        from ..kernels.store_kv import store_kv

        # With gluon_prefill.FUSE_STORE (on unless switched off), a Hopper prefill step's kernel stores the
        # new K/V of its sequences without a cached prefix itself, from the tiles it loads anyway;
        # store_kv writes the rest first.
        fused = fused_store_plan(q, k, v, kv_cache, out, max_query_len=meta.max_query_len,
                                 sliding_window=sliding_window, logits_soft_cap=logits_soft_cap,
                                 alibi_slopes=alibi_slopes)
        store_kv(k, v, kv_cache, meta.slot_mapping, k_scale, v_scale,
                 skip_fused=fused and (meta.query_start_loc, meta.seq_lens, *fused))
        paged_attention(
            q, kv_cache, meta.query_start_loc, meta.seq_lens, meta.block_table, out,
            max_query_len=meta.max_query_len, scale=scale, sliding_window=sliding_window,
            logits_soft_cap=logits_soft_cap, alibi_slopes=alibi_slopes, k_scale=k_scale, v_scale=v_scale,
            new_kv=fused and (k, v),
        )
