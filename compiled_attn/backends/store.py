"""The cache store for backends that wrap another package's attention (``flash_attn``, ``xformers``).

On CUDA with Triton installed the store is our one-launch Triton kernel; elsewhere it is the
plain-PyTorch store (about fifteen small launches, which dominate a small decode step: measured
on the H100, batch-1 decode through ``flash_attn`` spent most of its time there). Both write the
same bytes.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from . import paged_torch


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor,
    v_scale: torch.Tensor,
) -> None:
    """``kv_cache[:, slot // bs, slot % bs] = (k, v)`` for every token with ``slot >= 0``."""
    if kv_cache.device.type == "cuda" and _triton_installed():
        from ..kernels import store_kv as triton_store

        triton_store.store_kv(k, v, kv_cache, slot_mapping, k_scale, v_scale)
    else:
        paged_torch.store_kv(k, v, kv_cache, slot_mapping, k_scale, v_scale)
