"""Export of models built on ``compiled_attn.Attention``: ONNX (ONNX Runtime or TensorRT plugin
nodes) and TensorRT engines through torch-tensorrt.

>>> from compiled_attn.export import to_onnx, to_tensorrt   # doctest: +SKIP

The cache-writing ops are traced as functional twins that return the new cache
(:mod:`compiled_attn.export.functional`), so every exported graph takes the KV caches as inputs
and returns their new values as outputs. ``to_onnx`` needs the ``onnx`` extra, ``to_tensorrt`` the
``tensorrt`` one; both are imported on first use.
"""

from __future__ import annotations

from typing import Any

from .functional import (
    TARGETS,
    UnsupportedExportError,
    export_step,
    functional_attention,
    metadata_dynamic_shapes,
)

__all__ = [
    "TARGETS",
    "UnsupportedExportError",
    "export_step",
    "functional_attention",
    "metadata_dynamic_shapes",
    "to_onnx",
    "to_tensorrt",
]


def __getattr__(name: str) -> Any:
    # Lazy: importing compiled_attn.export must not need onnx or torch_tensorrt.
    if name == "to_onnx":
        from .onnx import to_onnx

        return to_onnx
    if name == "to_tensorrt":
        from .tensorrt import to_tensorrt

        return to_tensorrt
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
