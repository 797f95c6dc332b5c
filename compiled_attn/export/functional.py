"""Tracing a step through the functional twins of the cache-writing ops (defined in ``ops.py``).

``torch.export`` (and so ``torch.onnx.export(dynamo=True)`` and torch-tensorrt) cannot hand
``compiled_attn::attention`` to a translation: the op mutates its inputs, and the exporter fails
on the ``auto_functionalized`` node before it looks at a translation table. So export goes
through functional twins that *return* the new cache::

    compiled_attn::attention_functional(q, k, v, kv_cache, query_start_loc, seq_lens, block_table,
        slot_mapping, k_scale, v_scale, alibi_slopes, backend, scale, sliding_window,
        logits_soft_cap, max_query_len) -> (out, new_kv_cache)
    compiled_attn::store_kv_functional(k, v, kv_cache, slot_mapping, k_scale, v_scale) -> new_kv_cache

Inside :func:`functional_attention`, every call of the mutating ops is rewritten to its twin
followed by ``out.copy_(new_out)`` and ``kv_cache.copy_(new_cache)``: the model's semantics are
unchanged (it still "mutates" the cache), and ``torch.export``'s functionalization turns those
copies into plain dataflow. :class:`CacheThreadingStep` then returns every input that was written
as an extra output, so the exported graph has each KV cache as an input *and* an output.

Schema choices, both for torch-tensorrt's automatic plugin generation (``generate_plugin`` takes
only Tensor/int/float/bool/str arguments, tensors first): ``alibi_slopes`` is a required tensor,
empty (``[0]``) when the layer has no ALiBi; "no sliding window" is ``0`` and "no soft-cap" ``0.0``,
as in ``compiled_attn::attention``.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.overrides import TorchFunctionMode

from ..cache import PagedKVCache
from ..layer import Attention
from ..ops import attention_functional, store_kv_functional

TARGETS: dict[str, frozenset[str]] = {
    # Lowered to standard ONNX ops: the window and causal masks as Where, ALiBi as Add, the
    # soft-cap as Tanh. fp8 is not: Gather and ScatterND do not accept float8 tensors at the
    # opsets the exporter emits (onnxruntime 1.32 rejects such a graph), and ONNX has no bitcast
    # to move the cache as bytes.
    "onnxruntime": frozenset({"sliding_window", "alibi", "logits_soft_cap"}),
    # A plugin node whose attributes carry the window and soft-cap and whose inputs carry the
    # slopes; outputs are typed like q, so an fp8 cache has no place in the contract yet.
    "tensorrt": frozenset({"sliding_window", "alibi", "logits_soft_cap"}),
}
"""Export targets and the optional attention features each one translates."""


class UnsupportedExportError(ValueError):
    """An op or feature has no translation for the requested export target."""


def check_supported(target: str, op: str, features: Sequence[str]) -> None:
    """Raise :class:`UnsupportedExportError` naming the op, the feature and the target."""
    if target not in TARGETS:
        raise ValueError(f"unknown export target {target!r}; known: {', '.join(TARGETS)}")
    missing = [f for f in features if f not in TARGETS[target]]
    if missing:
        others = [t for t, ok in TARGETS.items() if t != target and all(f in ok for f in features)]
        hint = f"; target={others[0]!r} translates it" if others else "; no export target translates it yet"
        raise UnsupportedExportError(
            f"{op}: {', '.join(missing)} is not supported for export target {target!r} "
            f"(it translates: {', '.join(sorted(TARGETS[target])) or 'no optional feature'}){hint}"
        )


def op_features(kv_cache: torch.Tensor, alibi_slopes: torch.Tensor | None, sliding_window: int,
                logits_soft_cap: float) -> list[str]:
    """The optional features one attention call uses, named as in ``AttentionSpec.features()``."""
    used = []
    if sliding_window:
        used.append("sliding_window")
    if alibi_slopes is not None and alibi_slopes.numel():
        used.append("alibi")
    if logits_soft_cap:
        used.append("logits_soft_cap")
    if kv_cache.dtype.itemsize == 1:
        used.append("fp8_kv_cache")
    return used


# ---------------------------------------------------------------------------------------------
# Rewriting the mutating ops while a step is traced


class _FunctionalOpsMode(TorchFunctionMode):
    """Routes the mutating ops to their functional twins and writes the results back with copy_."""

    def __init__(self, target: str | None) -> None:
        super().__init__()
        self.target = target
        self.written: list[torch.Tensor] = []
        """Every cache tensor an op wrote, in call order (views of step inputs, usually)."""
        self.written_inputs: list[int] = []
        """Set by ``CacheThreadingStep``: indices (among the step's tensor inputs) of the caches it returned."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (isinstance(func, torch._ops.OpOverloadPacket) and func._qualified_op_name.startswith("compiled_attn::")
                and func.overloads() == ["default"]):
            func = func.default  # torch.ops.compiled_attn.x(...) arrives as the packet
        if func is torch.ops.compiled_attn.attention.default:
            return self._attention(*args, **kwargs)
        if func is torch.ops.compiled_attn.store_kv.default:
            return self._store_kv(*args, **kwargs)
        if (isinstance(func, torch._ops.OpOverload) and func.namespace == "compiled_attn" and func._schema.is_mutable
                and torch.compiler.is_compiling()):
            # The exporter would fail on it with a KeyError far from here.
            raise UnsupportedExportError(
                f"compiled_attn::{func._opname} mutates its inputs and has no functional twin, so it cannot be "
                "exported; call attention through compiled_attn.Attention (compiled_attn::attention)"
            )
        return func(*args, **kwargs)

    def _attention(self, q, k, v, kv_cache, query_start_loc, seq_lens, block_table, slot_mapping, out, k_scale,
                   v_scale, alibi_slopes, backend, scale, sliding_window, logits_soft_cap, max_query_len):
        if self.target is not None:
            features = op_features(kv_cache, alibi_slopes, sliding_window, logits_soft_cap)
            check_supported(self.target, "compiled_attn::attention", features)
        if alibi_slopes is None:
            alibi_slopes = torch.empty(0, dtype=torch.float32, device=q.device)
        new_out, new_cache = attention_functional(
            q, k, v, kv_cache, query_start_loc, seq_lens, block_table, slot_mapping, k_scale, v_scale,
            alibi_slopes, backend, scale, sliding_window, logits_soft_cap, max_query_len,
        )
        out.copy_(new_out)
        kv_cache.copy_(new_cache)
        self.written.append(kv_cache)

    def _store_kv(self, k, v, kv_cache, slot_mapping, k_scale, v_scale):
        if self.target is not None:
            check_supported(self.target, "compiled_attn::store_kv", op_features(kv_cache, None, 0, 0.0))
        kv_cache.copy_(store_kv_functional(k, v, kv_cache, slot_mapping, k_scale, v_scale))
        self.written.append(kv_cache)

    def wrote(self, tensor: torch.Tensor) -> bool:
        """Whether an op wrote ``tensor`` or a view of it."""
        return any(w is tensor or w._base is tensor for w in self.written)


@contextlib.contextmanager
def functional_attention(target: str | None = None) -> Iterator[_FunctionalOpsMode]:
    """Within the block, ``compiled_attn::attention``/``::store_kv`` run as their functional twins.

    Results are identical (the cache is still updated, by a copy), but a trace of the block
    holds only functional ops, which ``torch.export`` can carry to an exporter. With ``target``
    set, a call using a feature that target does not translate raises
    :class:`UnsupportedExportError` at trace time. Not thread-safe (a torch function mode).

    >>> import compiled_attn as ca
    >>> spec = ca.AttentionSpec(num_heads=2, num_kv_heads=1, head_size=8)
    >>> attn = ca.Attention(spec, backend="reference", device="cpu")
    >>> cache = torch.zeros(2, 2, 4, 1, 8)
    >>> meta = ca.AttentionMetadata.build([2], [2], [[1]], block_size=4)
    >>> with functional_attention() as mode:
    ...     out = attn(torch.randn(2, 2, 8), torch.ones(2, 1, 8), torch.ones(2, 1, 8), cache, meta)
    >>> mode.wrote(cache), int(cache[:, 1].sum())
    (True, 32)
    """
    mode = _FunctionalOpsMode(target)
    with mode:
        yield mode


# ---------------------------------------------------------------------------------------------
# The step wrapper: caches in, caches out


def _key_name(entry: Any) -> str:
    for attr in ("name", "key", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


class CacheThreadingStep(nn.Module):
    """``step(*args)`` returning ``(step's output, (new value of every cache input it wrote, ...))``.

    ``step`` is a module, a bound method of one (``model.step``), or any callable (then the
    tensors it closes over become constants of the exported graph). Run it inside
    :func:`functional_attention` and pass that context's mode. After a call, the mode's
    ``written_inputs`` holds the indices (among the tensor leaves of ``args``) of the returned
    caches, for naming the graph's outputs (kept on the mode: ``torch.export`` restores module
    attributes set while tracing).

    A cache must reach the attention op as a step input or a view of one (``kv[i]``, ``caches[i]``):
    a cache the model keeps as a buffer would have its update dropped by ONNX export, so it is an
    error.
    """

    def __init__(self, step: Callable[..., Any], mode: _FunctionalOpsMode) -> None:
        super().__init__()
        self._method: str | None = None
        self._fn: Callable[..., Any] | None = None
        if isinstance(step, nn.Module):
            self.model = step
        elif isinstance(getattr(step, "__self__", None), nn.Module):
            # Registered so its parameters keep their names in the exported graph.
            self.model = step.__self__
            self._method = step.__func__.__name__
        else:
            self._fn = step
        self._mode = mode

    def _call(self, *args: Any) -> Any:
        if self._fn is not None:
            return self._fn(*args)
        if self._method is not None:
            return getattr(self.model, self._method)(*args)
        return self.model(*args)

    def forward(self, *args: Any) -> tuple[Any, tuple[torch.Tensor, ...]]:
        leaves = [t for t in pytree.tree_leaves(args) if isinstance(t, torch.Tensor)]
        start = len(self._mode.written)
        out = self._call(*args)
        written = self._mode.written[start:]
        strays = [w for w in written if not any(w is t or w._base is t for t in leaves)]
        if strays:
            raise ValueError(
                f"an attention op wrote a KV cache of shape {tuple(strays[0].shape)} that is not an input of the "
                "exported step (nor a view of one); its update would be lost in the exported graph. Pass the cache "
                "as an argument of the step (a tensor, or a list of per-layer tensors)"
            )
        self._mode.written_inputs = [i for i, t in enumerate(leaves) if self._mode.wrote(t)]
        return out, tuple(leaves[i] for i in self._mode.written_inputs)

    def step_signature(self) -> inspect.Signature | None:
        fn = self._fn or (getattr(self.model, self._method) if self._method else self.model.forward)
        try:
            return inspect.signature(fn)
        except (TypeError, ValueError):
            return None


def tensor_input_names(step: CacheThreadingStep, args: Sequence[Any]) -> list[str]:
    """Names of the tensor leaves of ``args``: the parameter name plus the pytree path.

    ``step(input_ids, positions, kv_caches=[a, b], meta)`` gives ``input_ids, positions,
    kv_caches_0, kv_caches_1, meta_query_start_loc, meta_seq_lens, meta_block_table, meta_slot_mapping``.
    """
    sig = step.step_signature()
    names: list[str] = []
    try:
        bound = sig.bind(*args) if sig is not None else None
    except TypeError:
        bound = None
    params = list(bound.arguments.items()) if bound is not None else [(f"input_{i}", a) for i, a in enumerate(args)]
    for pname, value in params:
        for path, leaf in pytree.tree_flatten_with_path(value)[0]:
            if isinstance(leaf, torch.Tensor):
                names.append("_".join([pname, *(_key_name(p) for p in path)]))
    return names


def metadata_dynamic_shapes(num_tokens: Any, num_seqs: Any, max_blocks: Any = None) -> list[dict[int, Any]]:
    """The ``dynamic_shapes`` entry of an ``AttentionMetadata`` argument, built from ``torch.export.Dim`` objects.

    >>> from torch.export import Dim
    >>> spec = metadata_dynamic_shapes(Dim("num_tokens"), Dim("num_seqs"), Dim("max_blocks"))
    >>> len(spec)   # query_start_loc, seq_lens, block_table, slot_mapping
    4
    """
    table = {0: num_seqs} if max_blocks is None else {0: num_seqs, 1: max_blocks}
    return [{0: num_seqs + 1}, {0: num_seqs}, table, {0: num_tokens}]


def export_step(
    step: Callable[..., Any],
    example_inputs: Sequence[Any],
    *,
    target: str | None = None,
    dynamic_shapes: Any = None,
    strict: bool = False,
) -> tuple[torch.export.ExportedProgram, list[str], list[int]]:
    """``torch.export`` a step with its caches threaded out.

    ``dynamic_shapes`` follows ``torch.export``'s format, one entry per example input, as a
    sequence or a dict keyed by the step's parameter names. Returns the program, the names of its
    tensor inputs, and which of them are written caches (their new values are the program's last
    outputs, in input order).
    """
    _precheck(step, target)
    # A PagedKVCache is not a pytree: it goes in as its stacked tensor (the model must accept that form).
    example_inputs = tuple(a.kv if isinstance(a, PagedKVCache) else a for a in example_inputs)
    with functional_attention(target) as mode:
        wrapper = CacheThreadingStep(step, mode)
        if isinstance(dynamic_shapes, dict):
            dynamic_shapes = _positional(wrapper, example_inputs, dynamic_shapes)
        if dynamic_shapes is not None:
            # The wrapper's forward is forward(*args): its one parameter takes them all.
            dynamic_shapes = (tuple(dynamic_shapes),)
        try:
            # Inference graphs: no autograd (whose view checks also reject the cache write-back).
            with torch.no_grad():
                program = torch.export.export(wrapper, example_inputs, dynamic_shapes=dynamic_shapes, strict=strict)
        except Exception as e:  # the exporter wraps errors raised while tracing; surface ours
            cause = _find_cause(e, (UnsupportedExportError,))
            if cause is not None:
                raise cause from None
            raise
    return program, tensor_input_names(wrapper, example_inputs), list(mode.written_inputs)


def _positional(step: CacheThreadingStep, args: tuple[Any, ...], shapes: dict[str, Any]) -> list[Any]:
    sig = step.step_signature()
    if sig is None:
        raise ValueError("dynamic_shapes by name needs a step with an inspectable signature; pass a sequence")
    names = list(sig.bind(*args).arguments)
    unknown = sorted(set(shapes) - set(names))
    if unknown:
        raise ValueError(f"dynamic_shapes names {unknown} are not parameters given in example_inputs ({names})")
    return [shapes.get(n) for n in names]


def _precheck(step: Callable[..., Any], target: str | None) -> None:
    """Fail before tracing when a layer of the step's module asks for an untranslated feature."""
    if target is None:
        return
    module = step if isinstance(step, nn.Module) else getattr(step, "__self__", None)
    if not isinstance(module, nn.Module):
        return
    for name, layer in module.named_modules():
        if isinstance(layer, Attention):
            try:
                check_supported(target, "compiled_attn::attention", layer.spec.features())
            except UnsupportedExportError as e:
                where = f"layer {name!r}" if name else f"the {type(module).__name__} being exported"
                raise UnsupportedExportError(f"{where}: {e}") from None


def _find_cause(error: BaseException, kinds: tuple[type[BaseException], ...]) -> BaseException | None:
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, kinds):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None
