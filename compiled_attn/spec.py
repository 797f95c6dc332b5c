"""AttentionSpec: the static description of one attention layer."""

from __future__ import annotations

import dataclasses
import math
import numbers

import torch

# KV cache element types a layer may ask for. "auto" stores K/V in the query dtype.
KV_CACHE_DTYPES: dict[str, torch.dtype | None] = {
    "auto": None,
    "fp8_e4m3": torch.float8_e4m3fn,
}


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """What a layer computes; everything a backend needs to decide if it can serve it.

    >>> spec = AttentionSpec(num_heads=32, num_kv_heads=8, head_size=128)
    >>> spec.gqa_ratio, round(spec.softmax_scale, 5)
    (4, 0.08839)
    """

    num_heads: int
    """Query heads."""
    num_kv_heads: int
    """Key/value heads; must divide ``num_heads`` (GQA; 1 is MQA)."""
    head_size: int
    """Channels per head, shared by queries, keys and values."""
    scale: float | None = None
    """Softmax scale; ``None`` means ``1 / sqrt(head_size)``."""
    sliding_window: int | None = None
    """If set, a query at position p sees keys at positions (p - sliding_window, p]."""
    alibi_slopes: tuple[float, ...] | None = None
    """Per query head ALiBi slope; bias is ``slope * (key_pos - query_pos)``."""
    logits_soft_cap: float | None = None
    """If set, scores become ``cap * tanh(scores / cap)`` before the softmax."""
    kv_cache_dtype: str = "auto"
    """``"auto"`` (the query dtype) or ``"fp8_e4m3"`` (per-layer k/v scales)."""

    def __post_init__(self) -> None:
        for name in ("num_heads", "num_kv_heads", "head_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"AttentionSpec.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        # NaN and inf pass a bare "> 0" test or slip through it, and turn every output into NaN or 0.
        if self.scale is not None and not (self.scale > 0 and math.isfinite(self.scale)):
            raise ValueError(f"scale must be positive and finite, or None; got {self.scale}")
        window = self.sliding_window
        if window is not None:
            if not isinstance(window, numbers.Integral) or isinstance(window, bool) or window <= 0:
                raise ValueError(f"sliding_window must be positive (an int, in tokens) or None; got {window!r}")
            object.__setattr__(self, "sliding_window", int(window))  # numpy ints from configs too
        cap = self.logits_soft_cap
        if cap is not None and not (cap > 0 and math.isfinite(cap)):
            raise ValueError(f"logits_soft_cap must be positive and finite, or None; got {cap}")
        if self.alibi_slopes is not None:
            object.__setattr__(self, "alibi_slopes", tuple(float(s) for s in self.alibi_slopes))
            if len(self.alibi_slopes) != self.num_heads:
                raise ValueError(
                    f"alibi_slopes has {len(self.alibi_slopes)} entries; expected one per query head ({self.num_heads})"
                )
            if not all(math.isfinite(s) for s in self.alibi_slopes):
                raise ValueError(f"alibi_slopes must be finite, got {self.alibi_slopes}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype {self.kv_cache_dtype!r} is not supported (supported: {sorted(KV_CACHE_DTYPES)})"
            )

    @property
    def gqa_ratio(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def softmax_scale(self) -> float:
        return self.scale if self.scale is not None else 1.0 / math.sqrt(self.head_size)

    @property
    def is_fp8(self) -> bool:
        return self.kv_cache_dtype != "auto"

    def cache_dtype(self, compute_dtype: torch.dtype) -> torch.dtype:
        """The element type K/V are stored in, for queries of ``compute_dtype``."""
        return KV_CACHE_DTYPES[self.kv_cache_dtype] or compute_dtype

    def features(self) -> list[str]:
        """Names of the optional features this layer uses (for ``supports()`` checks)."""
        used = []
        if self.sliding_window is not None:
            used.append("sliding_window")
        if self.alibi_slopes is not None:
            used.append("alibi")
        if self.logits_soft_cap is not None:
            used.append("logits_soft_cap")
        if self.is_fp8:
            used.append("fp8_kv_cache")
        return used
