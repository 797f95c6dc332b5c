"""Attention(nn.Module): the only thing a model holds."""

from __future__ import annotations

import math

import torch
from torch import nn

from . import config, ops
from .backends import select_backend
from .checks import check_metadata, check_scales, contents_key
from .metadata import AttentionMetadata
from .spec import AttentionSpec


class Attention(nn.Module):
    """Stores the step's new K/V into a paged cache and attends over each sequence's context.

    >>> spec = AttentionSpec(num_heads=4, num_kv_heads=2, head_size=32)
    >>> attn = Attention(spec, backend="reference", device="cpu")
    >>> cache = torch.zeros(2, 4, 16, 2, 32)
    >>> meta = AttentionMetadata.build([3], [3], [[1]], block_size=16)
    >>> attn(torch.randn(3, 4, 32), torch.randn(3, 2, 32), torch.randn(3, 2, 32), cache, meta).shape
    torch.Size([3, 4, 32])

    ``backend`` is ``"auto"`` (first by priority that supports the layer on ``device``; the
    ``COMPILED_ATTN_BACKEND`` environment variable overrides it) or a backend's name.
    ``k_scale``/``v_scale`` are the per-layer fp8 scales (buffers; 1.0 unless loaded).
    """

    def __init__(
        self,
        spec: AttentionSpec,
        backend: str = "auto",
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        block_size: int | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.backend = select_backend(spec, name=backend, device=device, dtype=dtype, block_size=block_size)
        self.register_buffer("k_scale", torch.ones((), dtype=torch.float32, device=device))
        self.register_buffer("v_scale", torch.ones((), dtype=torch.float32, device=device))
        slopes = None
        if spec.alibi_slopes is not None:
            slopes = torch.tensor(spec.alibi_slopes, dtype=torch.float32, device=device)
        self.register_buffer("alibi_slopes", slopes)

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) or .half() casts every floating buffer; the fp8 scales and the
        # ALiBi slopes stay float32, as the kernels read them.
        super()._apply(fn, recurse)
        for name in ("k_scale", "v_scale", "alibi_slopes"):
            t = getattr(self, name)
            if t is not None and t.dtype != torch.float32:
                setattr(self, name, t.float())
        return self

    def extra_repr(self) -> str:
        return f"{self.spec}, backend={self.backend.name}"

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """q ``[T, H, D]``, k/v ``[T, KVH, D]``, kv_cache ``[2, num_blocks, block_size, KVH, D]`` → ``[T, H, D]``."""
        self._check_inputs(q, k, v, kv_cache, meta)
        out = torch.empty_like(q)
        return ops.attention(
            q, k, v, kv_cache, meta, out,
            backend=self.backend.name,
            scale=self.spec.softmax_scale,
            sliding_window=self.spec.sliding_window,
            logits_soft_cap=self.spec.logits_soft_cap,
            alibi_slopes=self.alibi_slopes,
            k_scale=self.k_scale,
            v_scale=self.v_scale,
        )

    def _check_inputs(self, q, k, v, kv_cache, meta: AttentionMetadata) -> None:
        # Static checks (shapes, dtypes, devices): free under torch.compile, they become guards.
        s = self.spec
        if q.dim() != 3 or q.shape[1:] != (s.num_heads, s.head_size):
            raise ValueError(f"q must be [num_tokens, {s.num_heads}, {s.head_size}], got {tuple(q.shape)}")
        kv_shape = (q.shape[0], s.num_kv_heads, s.head_size)
        for name, t in (("k", k), ("v", v)):
            if tuple(t.shape) != kv_shape:
                raise ValueError(f"{name} must be {list(kv_shape)} (num_tokens, num_kv_heads, head_size), got {tuple(t.shape)}")
            if t.dtype != q.dtype:
                raise ValueError(f"{name} has dtype {t.dtype} but q has {q.dtype}; pass one dtype")
        if q.dtype not in self.backend.dtypes:
            raise ValueError(f"q dtype {q.dtype} is not supported by backend {self.backend.name!r} "
                             f"(supported: {', '.join(map(str, self.backend.dtypes))})")
        if kv_cache.dim() != 5 or kv_cache.shape[0] != 2 or kv_cache.shape[3:] != (s.num_kv_heads, s.head_size):
            raise ValueError(f"kv_cache must be [2, num_blocks, block_size, {s.num_kv_heads}, {s.head_size}], "
                             f"got {tuple(kv_cache.shape)}")
        # Stores write through it (a .contiguous() copy would lose them): one of the two dense memory orders.
        if not (kv_cache.is_contiguous() or kv_cache.transpose(2, 3).is_contiguous()):
            raise ValueError(f"kv_cache must be contiguous in that layout or head-major (memory [2, num_blocks, "
                             f"kv_heads, block_size, head_size]; strides {kv_cache.stride()}); allocate it as one tensor "
                             "(as PagedKVCache does) or index a per-layer stack along its first dim")
        if kv_cache.dtype != s.cache_dtype(q.dtype):
            raise ValueError(f"kv_cache dtype {kv_cache.dtype} does not match the layer's "
                             f"kv_cache_dtype={s.kv_cache_dtype!r} for {q.dtype} queries (expected {s.cache_dtype(q.dtype)})")
        check_metadata(meta.query_start_loc, meta.seq_lens, meta.block_table, meta.slot_mapping, q.shape[0], q.device)
        check_scales(self.k_scale, self.v_scale)
        buffers = (("k_scale", self.k_scale), ("v_scale", self.v_scale), ("alibi_slopes", self.alibi_slopes))
        for name, t in (("k", k), ("v", v), ("kv_cache", kv_cache), *buffers):
            if t is not None and t.device != q.device:
                raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
        if q.device.type not in self.backend.device_types:
            raise ValueError(f"backend {self.backend.name!r} runs on {self.backend.device_types}, not {q.device.type}; "
                             "construct Attention with device=... so the right backend is selected")
        if self._data_checks_wanted(q):
            meta.check_once(num_blocks=kv_cache.shape[1], block_size=kv_cache.shape[2])
            if s.is_fp8:
                self._check_scale_values()

    def _check_scale_values(self) -> None:
        # Loaded from a checkpoint, replaced or set in place: re-read only when a scale has changed.
        key = contents_key(self.k_scale, self.v_scale)
        if self.__dict__.get("_scales_checked_key") == key:
            return
        for name, t in (("k_scale", self.k_scale), ("v_scale", self.v_scale)):
            value = float(t)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} is {value}; an fp8 cache's scale must be positive and finite")
        self.__dict__["_scales_checked_key"] = key

    @staticmethod
    def _data_checks_wanted(q: torch.Tensor) -> bool:
        # Value checks read tensors on the host: never while compiling or capturing.
        if torch.compiler.is_compiling():
            return False
        if q.is_cuda and torch.cuda.is_current_stream_capturing():
            return False
        mode = config.input_checks()
        return mode == "always" or (mode == "cpu" and q.device.type == "cpu")
