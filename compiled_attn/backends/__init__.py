"""Backend registry and selection.

``select_backend`` walks a per-device priority list and returns the first backend whose
``supports()`` accepts the layer; an impossible request raises one error listing every
candidate and its reason.
"""

from __future__ import annotations

import torch

from .. import config
from ..spec import AttentionSpec
from .base import AttentionBackend
from .reference import ReferenceBackend
from .torch_native import TorchNativeBackend
from .triton import TritonBackend
from .flash_attn import FlashAttnBackend
from .flash_attn3 import FlashAttn3Backend
from .trtllm import TrtllmBackend
from .xformers import XFormersBackend

BACKENDS: dict[str, type[AttentionBackend]] = {
    b.name: b for b in (ReferenceBackend, TorchNativeBackend, TritonBackend, TrtllmBackend, FlashAttnBackend,
                       XFormersBackend, FlashAttn3Backend)
}

# First that can serve the layer wins. The reference is last everywhere: correct, never fast.
# CUDA order from the H100 figures in BENCHMARKS.md: trtllm (fused decode) >= triton on every
# decode shape and equal on prefill; both ahead of flash_attn, then xformers, on every shape.
# flash_attn3 is selectable by name only until it has been measured there.
PRIORITY: dict[str, tuple[str, ...]] = {
    "cuda": ("trtllm", "triton", "flash_attn", "xformers", "torch_native", "reference"),
    "cpu": ("torch_native", "reference"),
}


def register_backend(backend: type[AttentionBackend], *, priority: dict[str, int] | None = None) -> None:
    """Add a backend; ``priority`` maps a device type to its index in that device's list."""
    BACKENDS[backend.name] = backend
    for device_type, index in (priority or {}).items():
        order = [n for n in PRIORITY.get(device_type, ()) if n != backend.name]
        order.insert(index, backend.name)
        PRIORITY[device_type] = tuple(order)


def get_backend(name: str) -> type[AttentionBackend]:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}") from None


def backend_reasons(
    spec: AttentionSpec,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    block_size: int | None = None,
) -> dict[str, str | None]:
    """Every registered backend mapped to ``None`` (can serve the layer) or the reason it cannot."""
    return {
        name: backend.supports(spec, device=device, dtype=dtype, block_size=block_size)
        for name, backend in BACKENDS.items()
    }


def select_backend(
    spec: AttentionSpec,
    *,
    name: str = "auto",
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    block_size: int | None = None,
) -> type[AttentionBackend]:
    """The backend to use: ``name`` if given, else ``COMPILED_ATTN_BACKEND``, else the first by priority."""
    device = torch.device(device)
    if name == "auto":
        name = config.backend_override() or "auto"
    if name != "auto":
        backend = get_backend(name)
        reason = backend.supports(spec, device=device, dtype=dtype, block_size=block_size)
        if reason:
            raise ValueError(f"backend {name!r} cannot serve this layer: {reason}")
        return backend
    reasons = backend_reasons(spec, device=device, dtype=dtype, block_size=block_size)
    for candidate in PRIORITY.get(device.type, tuple(BACKENDS)):
        if candidate in reasons and reasons[candidate] is None:
            return BACKENDS[candidate]
    listing = "; ".join(f"{n}: {r or 'not in the priority list for ' + device.type}" for n, r in reasons.items())
    raise ValueError(f"no backend can serve {spec} on {device.type}: {listing}")


def available_backends(
    spec: AttentionSpec | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    block_size: int | None = None,
) -> dict[str, str]:
    """Every backend mapped to ``"available"`` or the reason it is not, for ``spec`` on ``device``.

    Without a spec, a plain layer (8 heads, 128 channels) is asked about, so the answer is about
    the machine: missing packages, devices.
    """
    spec = spec or AttentionSpec(num_heads=8, num_kv_heads=8, head_size=128)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    reasons = backend_reasons(spec, device=device, dtype=dtype, block_size=block_size)
    return {name: reason or "available" for name, reason in reasons.items()}
