"""TensorRT engines through torch-tensorrt's dynamo path, our ops as generated plugins.

**Unverified**: TensorRT cannot be installed on the machines this package is developed and
tested on, so this path has never run. It is written against torch-tensorrt's documented
automatic plugin generation (TensorRT >= 10.7 Quick Deployable Plugins) and the test that
exercises it is skipped where torch-tensorrt or CUDA is missing. Treat it as a starting point.

How it is meant to work: the step is traced by ``torch.export`` with the cache-writing ops
replaced by their functional twins (:mod:`compiled_attn.export.functional`), whose schemas were
chosen for plugin generation (tensors first, then str/float/int attributes, no optional
tensor). ``torch_tensorrt.dynamo.conversion.plugins.custom_op`` then generates, from each op's
schema and fake implementation, a TensorRT plugin (shapes from the fake; at run time the plugin
calls the op itself, that is the layer's backend, on TensorRT's stream) and the converter that
puts it into the engine. Everything around the attention is converted to TensorRT layers as usual.

Known limits, from how the generated plugins work: every plugin output is typed like the op's
first input (q), so fp8 KV caches are refused up front; the functional op returns a new cache,
which the generated plugin copies into TensorRT's output buffer (a whole-cache copy per layer and
step: correct, not fast); ALiBi-free layers pass an empty ``[0]`` slope tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .functional import export_step

__all__ = ["register_plugins", "to_tensorrt"]

PLUGIN_OPS = ("compiled_attn::attention_functional", "compiled_attn::store_kv_functional")
"""The ops turned into TensorRT plugins."""

_registered = False


def _import_torch_tensorrt():
    try:
        import torch_tensorrt
    except ImportError as e:
        raise ImportError(
            "compiled_attn.export.to_tensorrt needs torch-tensorrt and TensorRT >= 10.7 "
            f"({e.name or 'torch_tensorrt'} could not be imported): pip install compiled-attn[tensorrt]"
        ) from e
    return torch_tensorrt


def register_plugins() -> None:
    """Generate the TensorRT plugins and converters for :data:`PLUGIN_OPS` (once per process).

    Unverified (see the module docstring).
    """
    global _registered
    if _registered:
        return
    torch_tensorrt = _import_torch_tensorrt()
    for name in PLUGIN_OPS:
        # Shapes are read from the fake implementation symbolically, so one plugin serves every
        # token count and batch size.
        torch_tensorrt.dynamo.conversion.plugins.custom_op(name, supports_dynamic_shapes=True)
    _registered = True


def to_tensorrt(
    model_or_step: Callable[..., Any],
    example_inputs: Sequence[Any],
    *,
    dynamic_shapes: Any = None,
    **compile_options: Any,
) -> torch.nn.Module:
    """Compile one model step into TensorRT engines with our attention ops as plugins. Unverified.

    Arguments are those of :func:`compiled_attn.export.to_onnx` (the example inputs must be on
    CUDA); ``compile_options`` go to ``torch_tensorrt.dynamo.compile`` (``enabled_precisions``,
    ``min_block_size``, ...). The returned module is called like the step and returns
    ``(step's output, (new value of each cache input the step wrote, ...))``, as the exported
    ONNX graph does.

    Raises ``ImportError`` naming the extra (``pip install compiled-attn[tensorrt]``) when
    torch-tensorrt is missing, ``RuntimeError`` without CUDA, and
    :class:`~compiled_attn.export.UnsupportedExportError` for an fp8 KV cache.
    """
    torch_tensorrt = _import_torch_tensorrt()
    if not torch.cuda.is_available():
        raise RuntimeError("to_tensorrt needs a CUDA device (TensorRT engines run on NVIDIA GPUs)")
    register_plugins()
    program, _, _ = export_step(model_or_step, example_inputs, target="tensorrt", dynamic_shapes=dynamic_shapes)
    return torch_tensorrt.dynamo.compile(program, arg_inputs=tuple(example_inputs), **compile_options)
