"""The backend contract: capabilities as data, ``supports()`` reasons, one ``forward`` per step."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from types import ModuleType
from typing import ClassVar

import torch

from ..cache import cache_layout
from ..metadata import AttentionMetadata
from ..spec import AttentionSpec

ALL_FEATURES = frozenset({"sliding_window", "alibi", "logits_soft_cap", "fp8_kv_cache"})


def package_reason(module: str, load: Callable[[], ModuleType], needed: tuple[str, ...]) -> str | None:
    """Why the installed package ``module`` (imported by ``load``) cannot be used: it fails to
    import, or lacks one of the ``needed`` functions. None if it can."""
    try:
        imported = load()
    except Exception as err:  # a build for another torch raises anything from ImportError to OSError
        return f"package '{module}' is installed but failed to import ({type(err).__name__}: {err})"
    missing = [name for name in needed if not hasattr(imported, name)]
    return f"package '{module}' has no {', '.join(missing)}" if missing else None


def head_size_reason(head_size: int, *, multiple: int, largest: int) -> str | None:
    """The FlashAttention packages' head-size rule (a multiple of ``multiple``, at most ``largest``)."""
    if head_size % multiple or head_size > largest:
        return f"head_size {head_size} is not supported (needs a multiple of {multiple}, at most {largest})"
    return None


class AttentionBackend:
    """Stateless; subclasses declare what they can do and implement ``forward``.

    ``forward`` stores the new tokens' K/V into ``kv_cache`` through ``meta.slot_mapping`` and
    writes attention of every new token over its sequence's whole context into ``out``. It must
    not synchronise with the host or branch on tensor values (it runs under CUDA-graph capture);
    host-side decisions belong in ``plan``.
    """

    name: ClassVar[str]
    device_types: ClassVar[tuple[str, ...]] = ("cpu", "cuda")
    dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.float32, torch.float16, torch.bfloat16)
    head_sizes: ClassVar[tuple[int, ...] | None] = None
    """Supported head sizes; ``None`` = any."""
    block_size_multiple: ClassVar[int] = 1
    """Block sizes must be multiples of this."""
    max_block_size: ClassVar[int] = 256
    features: ClassVar[frozenset[str]] = ALL_FEATURES
    required_packages: ClassVar[tuple[str, ...]] = ()
    min_compute_capability: ClassVar[tuple[int, int] | None] = None
    cuda_graph_support: ClassVar[str] = "full"
    """``"full"``: every call is capturable (no host syncs, shapes fixed by the bucket)."""
    reads_head_major: ClassVar[bool] = True
    """Whether ``forward`` takes a head-major cache (``cache.cache_layout``) through its strides."""

    block_size_message: ClassVar[str] = (
        "block_size {block_size} is not supported (needs a multiple of {multiple}, at most {largest})")
    """What :meth:`block_size_reason` says (``str.format`` fields: block_size, multiple, largest)."""

    @classmethod
    def block_size_reason(cls, block_size: int) -> str | None:
        """Why pages of ``block_size`` tokens cannot be served, or None (pure arithmetic: checked per call)."""
        if block_size % cls.block_size_multiple or block_size > cls.max_block_size:
            return cls.block_size_message.format(
                block_size=block_size, multiple=cls.block_size_multiple, largest=cls.max_block_size)
        return None

    @classmethod
    def call_reason(cls, kv_cache: torch.Tensor, *, sliding_window: int | None, logits_soft_cap: float | None,
                    alibi_slopes: torch.Tensor | None) -> str | None:
        """Why one op call cannot be served, from static facts only (free under compile and capture)."""
        used = {"sliding_window": sliding_window is not None, "logits_soft_cap": logits_soft_cap is not None,
                "alibi": alibi_slopes is not None, "fp8_kv_cache": kv_cache.dtype.itemsize == 1}
        missing = [f for f, on in used.items() if on and f not in cls.features]
        if missing:
            return f"does not support {', '.join(missing)}"
        if not cls.reads_head_major and cache_layout(kv_cache) == "head_major":
            return ("needs a token-major cache (memory [2, num_blocks, block_size, kv_heads, head_size]); this one is "
                    "head-major: allocate it with PagedKVCache(..., layout='token_major')")
        return cls.block_size_reason(kv_cache.shape[2])

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why this backend cannot run on this machine at all (missing package), or None."""
        for package in cls.required_packages:
            if importlib.util.find_spec(package) is None:
                return f"package '{package}' is not installed"
        return None

    @classmethod
    def supports(
        cls,
        spec: AttentionSpec,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        block_size: int | None = None,
    ) -> str | None:
        """``None`` if this backend can serve the layer, else a human-readable reason."""
        reason = cls.unavailable_reason()
        if reason:
            return reason
        device = torch.device(device)
        if device.type not in cls.device_types:
            return f"runs on {'/'.join(cls.device_types)}, not {device.type}"
        if cls.min_compute_capability and device.type == "cuda":
            if not torch.cuda.is_available():
                return "CUDA is not available"
            cc = torch.cuda.get_device_capability(device)
            if cc < cls.min_compute_capability:
                return f"needs compute capability >= {cls.min_compute_capability}, device has {cc}"
        if dtype is not None and dtype not in cls.dtypes:
            return f"dtype {dtype} is not supported (supported: {', '.join(map(str, cls.dtypes))})"
        if cls.head_sizes is not None and spec.head_size not in cls.head_sizes:
            return f"head_size {spec.head_size} is not supported (supported: {', '.join(map(str, cls.head_sizes))})"
        if block_size is not None and (reason := cls.block_size_reason(block_size)):
            return reason
        missing = [f for f in spec.features() if f not in cls.features]
        if missing:
            return f"does not support {', '.join(missing)}"
        return cls.extra_reason(spec, device=device, dtype=dtype, block_size=block_size)

    @classmethod
    def extra_reason(
        cls, spec: AttentionSpec, *, device: torch.device, dtype: torch.dtype | None, block_size: int | None
    ) -> str | None:
        """Hook for limits that are not simple data; default: none."""
        return None

    @staticmethod
    def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int) -> tuple[int, ...]:
        """The per-layer cache shape; every built-in backend uses the canonical layout."""
        return (2, num_blocks, block_size, num_kv_heads, head_size)

    @classmethod
    def kv_cache_layout(cls, spec: AttentionSpec) -> str:
        """The cache memory order this backend reads fastest (``cache.LAYOUTS``); the shape is
        always :meth:`kv_cache_shape`'s. Default: token-major."""
        return "token_major"

    @classmethod
    def plan(cls, meta: AttentionMetadata) -> AttentionMetadata:
        """Host-side preparation once per step (outside captured code); default: nothing."""
        return meta

    @classmethod
    def forward(
        cls,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        out: torch.Tensor,
        *,
        scale: float,
        sliding_window: int | None,
        logits_soft_cap: float | None,
        alibi_slopes: torch.Tensor | None,
        k_scale: torch.Tensor,
        v_scale: torch.Tensor,
    ) -> None:
        raise NotImplementedError
