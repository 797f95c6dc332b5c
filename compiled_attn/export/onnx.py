"""ONNX export of a model step built on ``compiled_attn.Attention``.

:func:`to_onnx` traces the step with ``torch.export`` (the cache-writing ops replaced by their
functional twins, see :mod:`compiled_attn.export.functional`) and translates it with
``torch.onnx.export(dynamo=True, custom_translation_table=...)``. The graph takes every KV cache
as an input and returns its new value as an output, so a runtime drives decoding by feeding each
step's returned caches into the next.

Two targets:

``"onnxruntime"`` — standard ONNX ops only, so any ONNX runtime executes it:

* cache store: one ``ScatterND`` of the new K and V into the cache seen as ``[2, slots, KVH, D]``;
  padding tokens (``slot_mapping == -1``) go to a spare row that is sliced off afterwards;
* each token's sequence (a comparison with ``query_start_loc`` summed with ``ReduceSum``), its
  position, and its context: ``Gather`` of its block-table row, then ``Gather`` of those blocks;
* ``MatMul`` of queries grouped ``[T, KVH, H/KVH, D]`` against ``[T, KVH, D, L]`` keys (GQA/MQA
  without repeating K/V: query head ``h`` meets KV head ``h // group``, as a head repeat would);
* ALiBi as an ``Add`` of ``slope * (key_pos - query_pos)``, the soft-cap as ``cap * Tanh(s / cap)``,
  the causal and sliding-window masks as ``Where`` before ``Softmax``; padding tokens output zeros.

It computes in fp32 (fp64 for fp64 queries), like the ``reference`` backend, and gathers each
token's whole block-table row: portable and exact, not fast. fp8 caches are not translated.

``"tensorrt"`` — each attention call becomes one ``PagedAttention`` node of the custom domain
:data:`TRT_DOMAIN` (``"compiled_attn.trt"``, version 1) for a TensorRT plugin to implement; its
schema is registered with ``onnx.defs.register_schema`` on import of this module (so
``onnx.checker`` accepts the graph), and :data:`PAGED_ATTENTION_SCHEMA_DOC` documents it.
No TensorRT plugin implementing it ships with this package, and this target is not verified
against TensorRT here (TensorRT cannot be installed on our CI machines).

Shapes: a graph is exported with the example inputs' shapes fixed unless ``dynamic_shapes`` says
otherwise. The recommended use is one graph per bucket — a decode graph (``num_tokens ==
num_seqs``) and a prefill graph (a padded token count) — padded exactly as
``AttentionMetadata.build(num_tokens=..., num_seqs=..., max_blocks=...)`` pads them, which is also
how ``CUDAGraphRunner`` buckets. The lowering itself reads every size from ``Shape``, so a
dynamic token count works where the model around the attention exports with one (tested on a
small model).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

try:
    import onnx
    import onnx_ir as ir
    import onnxscript
    from onnxscript import opset18 as op
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        f"compiled_attn.export.onnx needs onnx, onnxscript and onnxruntime ({e.name} is missing): "
        "pip install compiled-attn[onnx]"
    ) from e

from .functional import TARGETS, check_supported, export_step

__all__ = ["TRT_DOMAIN", "TRT_DOMAIN_VERSION", "register_trt_schemas", "to_onnx", "translation_table"]

TRT_DOMAIN = "compiled_attn.trt"
"""ONNX domain of the plugin nodes of the ``tensorrt`` target."""
TRT_DOMAIN_VERSION = 1
TRT_PLUGIN_NAMESPACE = "compiled_attn"
"""Written as the ``plugin_namespace`` attribute: TensorRT's ONNX parser looks a node it does not
know up in the plugin registry by (op type, ``plugin_version``, ``plugin_namespace``)."""

_PAGED_ATTENTION_INPUTS = (
    ("q", "T", "[T, H, D] queries"),
    ("k", "T", "[T, KVH, D] new keys"),
    ("v", "T", "[T, KVH, D] new values"),
    ("kv_cache", "T", "[2, num_blocks, block_size, KVH, D] paged cache (0 = K, 1 = V)"),
    ("query_start_loc", "I32", "[B+1] cumulative new-token counts"),
    ("seq_lens", "I32", "[B] whole context of each sequence, new tokens included"),
    ("block_table", "I32", "[B, max_blocks] cache block ids of each sequence"),
    ("slot_mapping", "I64", "[T] flat cache slot of each new token; -1 = store nothing (padding)"),
    ("k_scale", "F", "[] float32 K scale (fp8 caches; 1.0 otherwise)"),
    ("v_scale", "F", "[] float32 V scale"),
    ("alibi_slopes", "F", "[H] float32 ALiBi slopes (optional: absent = no ALiBi)"),
)
_PAGED_ATTENTION_OUTPUTS = (
    ("out", "T", "[T, H, D] attention output; zeros for padding tokens"),
    ("new_kv_cache", "T", "the cache after storing the new tokens' K/V"),
)
_PAGED_ATTENTION_ATTRIBUTES = (
    ("scale", "FLOAT", "softmax scale"),
    ("sliding_window", "INT", "0 = none; else a query at p sees keys in (p - window, p]"),
    ("logits_soft_cap", "FLOAT", "0.0 = none; else scores = cap * tanh(scores / cap)"),
    ("num_heads", "INT", "query heads H"),
    ("num_kv_heads", "INT", "KV heads KVH (divides H)"),
    ("head_size", "INT", "channels per head D"),
    ("block_size", "INT", "tokens per cache block"),
    ("max_query_len", "INT", "static bound on any sequence's new tokens"),
    ("plugin_version", "STRING", "'1'"),
    ("plugin_namespace", "STRING", f"'{TRT_PLUGIN_NAMESPACE}'"),
)
PAGED_ATTENTION_SCHEMA_DOC = (
    f"{TRT_DOMAIN}::PagedAttention (version {TRT_DOMAIN_VERSION}): the whole attention step of one layer, "
    "as compiled_attn::attention — store the new K/V at slot_mapping, then causal attention of each new token "
    "over its sequence's context (GQA; optional ALiBi, sliding window, logit soft-cap).\n"
    + "\n".join(f"  input  {n}: {d}" for n, _, d in _PAGED_ATTENTION_INPUTS)
    + "\n" + "\n".join(f"  output {n}: {d}" for n, _, d in _PAGED_ATTENTION_OUTPUTS)
    + "\n" + "\n".join(f"  attr   {n} ({t.lower()}): {d}" for n, t, d in _PAGED_ATTENTION_ATTRIBUTES)
)
"""The contract a TensorRT plugin named ``PagedAttention`` must implement."""


def register_trt_schemas() -> None:
    """Register the ``tensorrt`` target's node schemas with ONNX (idempotent; done on import)."""
    if onnx.defs.has("PagedAttention", TRT_DOMAIN):
        return
    Param = onnx.defs.OpSchema.FormalParameter
    optional = onnx.defs.OpSchema.FormalParameterOption.Optional
    inputs = [
        Param(n, t, d, param_option=optional) if n == "alibi_slopes" else Param(n, t, d)
        for n, t, d in _PAGED_ATTENTION_INPUTS
    ]
    schema = onnx.defs.OpSchema(
        "PagedAttention",
        TRT_DOMAIN,
        TRT_DOMAIN_VERSION,
        PAGED_ATTENTION_SCHEMA_DOC,
        inputs=inputs,
        outputs=[Param(n, t, d) for n, t, d in _PAGED_ATTENTION_OUTPUTS],
        type_constraints=[
            ("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "activations and cache"),
            ("I32", ["tensor(int32)"], "int32 metadata"),
            ("I64", ["tensor(int64)"], "int64 slots"),
            ("F", ["tensor(float)"], "float32 scales and slopes"),
        ],
        attributes=[
            onnx.defs.OpSchema.Attribute(n, getattr(onnx.defs.OpSchema.AttrType, t), d, required=False)
            for n, t, d in _PAGED_ATTENTION_ATTRIBUTES
        ],
    )
    onnx.defs.register_schema(schema)


register_trt_schemas()
_trt = onnxscript.values.Opset(TRT_DOMAIN, TRT_DOMAIN_VERSION)


# ---------------------------------------------------------------------------------------------
# Lowering helpers (traced onnxscript: plain Python calling ONNX ops on graph values)


def _ints(values: Sequence[int]):
    return op.Constant(value_ints=list(values))


def _int(value: int):
    return op.Constant(value_int=value)


def _dim(x, axis: int):
    """``x.shape[axis]`` as a 1-D int64 value of one element."""
    return op.Shape(x, start=axis, end=axis + 1)


def _static(x, axis: int, what: str) -> int:
    d = x.shape[axis] if x.shape is not None else None
    if not isinstance(d, int):
        raise ValueError(f"ONNX lowering of compiled_attn attention needs a static {what} (axis {axis})")
    return d


def _store(k, v, kv_cache, slot_mapping):
    """The cache with the new tokens' K/V written at ``slot_mapping`` (one ScatterND)."""
    kv_heads, head_size = _static(kv_cache, 3, "num_kv_heads"), _static(kv_cache, 4, "head_size")
    flat = op.Reshape(kv_cache, _ints([2, -1, kv_heads, head_size]))  # [2, S, KVH, D]
    num_slots = _dim(flat, 1)
    # A spare slot S for padding tokens: ScatterND reads -1 as "the last slot", not "nowhere".
    spare = op.Slice(flat, _ints([0]), _ints([1]), _ints([1]))
    padded = op.Concat(flat, spare, axis=1)  # [2, S + 1, KVH, D]
    slot = op.Where(op.Less(slot_mapping, _int(0)), op.Squeeze(num_slots, _ints([0])), slot_mapping)
    num_tokens = _dim(slot_mapping, 0)
    which = op.Expand(op.Constant(value_ints=[0, 1]), op.Concat(num_tokens, _ints([2]), axis=0))  # [T, 2]
    which = op.Transpose(which, perm=[1, 0])  # [2, T]: 0 = K row, 1 = V row
    slots = op.Expand(op.Unsqueeze(slot, _ints([0])), op.Concat(_ints([2]), num_tokens, axis=0))
    indices = op.Concat(op.Unsqueeze(which, _ints([2])), op.Unsqueeze(slots, _ints([2])), axis=2)  # [2, T, 2]
    updates = op.Concat(op.Unsqueeze(op.CastLike(k, kv_cache), _ints([0])),
                        op.Unsqueeze(op.CastLike(v, kv_cache), _ints([0])), axis=0)  # [2, T, KVH, D]
    written = op.ScatterND(padded, indices, updates)
    kept = op.Slice(written, _ints([0]), num_slots, _ints([1]))
    return op.Reshape(kept, op.Shape(kv_cache))


def _attend(q, kv_cache, query_start_loc, seq_lens, block_table, alibi_slopes, *, kv_heads: int, scale: float,
            sliding_window: int, logits_soft_cap: float):
    """Causal paged attention of every token of ``q`` over its sequence's (already stored) context."""
    num_heads, head_size = _static(q, 1, "num_heads"), _static(q, 2, "head_size")
    group = num_heads // kv_heads
    compute = ir.DataType.DOUBLE if q.dtype == ir.DataType.DOUBLE else ir.DataType.FLOAT
    one = op.Constant(value_int=1)

    # Each token's sequence, position and validity (padding tokens come after the last sequence).
    starts = op.Cast(query_start_loc, to=ir.DataType.INT64)  # [B + 1]
    begins = op.Slice(starts, _ints([0]), _ints([-1]))  # [B]
    ends = op.Slice(starts, _ints([1]), _ints([2**62]))  # [B]
    token = op.Range(_int(0), op.Squeeze(_dim(q, 0), _ints([0])), one)  # [T]
    # seq[t] = #{b : ends[b] <= t}, clamped for padding tokens (they are masked out below).
    before = op.Cast(op.LessOrEqual(op.Unsqueeze(ends, _ints([0])), op.Unsqueeze(token, _ints([1]))),
                     to=ir.DataType.INT64)
    last_seq = op.Sub(op.Squeeze(_dim(seq_lens, 0), _ints([0])), one)
    seq = op.Min(op.ReduceSum(before, _ints([1]), keepdims=0), last_seq)
    valid = op.Less(token, op.Squeeze(op.Slice(starts, _ints([-1]), _ints([2**62])), _ints([0])))
    context = op.Sub(op.Cast(seq_lens, to=ir.DataType.INT64), op.Sub(ends, begins))
    pos = op.Add(op.Gather(context, seq), op.Sub(token, op.Gather(begins, seq)))  # [T]

    # Each token's context, densely: [T, L, KVH, D] with L = max_blocks * block_size.
    rows = op.Gather(op.Cast(block_table, to=ir.DataType.INT64), seq, axis=0)  # [T, max_blocks]

    def context_of(which: int):
        pool = op.Gather(kv_cache, _int(which), axis=0)  # [num_blocks, block_size, KVH, D]
        dense = op.Gather(pool, rows, axis=0)  # [T, max_blocks, block_size, KVH, D]
        return op.Cast(op.Reshape(dense, _ints([0, -1, kv_heads, head_size])), to=compute)

    keys = op.Transpose(context_of(0), perm=[0, 2, 3, 1])  # [T, KVH, D, L]
    values = op.Transpose(context_of(1), perm=[0, 2, 1, 3])  # [T, KVH, L, D]

    # Grouped queries meet their KV head directly: [T, KVH, G, D] @ [T, KVH, D, L].
    queries = op.Reshape(op.Cast(q, to=compute), _ints([0, kv_heads, group, head_size]))
    scores = op.Mul(op.MatMul(queries, keys), op.Cast(op.Constant(value_float=scale), to=compute))
    key_pos = op.Range(_int(0), op.Squeeze(_dim(keys, 3), _ints([0])), one)  # [L]
    rel = op.Sub(op.Unsqueeze(key_pos, _ints([0])), op.Unsqueeze(pos, _ints([1])))  # [T, L] key - query
    if alibi_slopes is not None:
        slopes = op.Reshape(op.Cast(alibi_slopes, to=compute), _ints([1, kv_heads, group, 1]))
        distance = op.Unsqueeze(op.Cast(rel, to=compute), _ints([1, 2]))  # [T, 1, 1, L]
        scores = op.Add(scores, op.Mul(slopes, distance))
    if logits_soft_cap:
        cap = op.Cast(op.Constant(value_float=logits_soft_cap), to=compute)
        scores = op.Mul(cap, op.Tanh(op.Div(scores, cap)))
    visible = op.LessOrEqual(rel, _int(0))  # causal
    if sliding_window:
        visible = op.And(visible, op.Greater(rel, _int(-sliding_window)))
    visible = op.Unsqueeze(visible, _ints([1, 2]))  # [T, 1, 1, L]
    minus_inf = op.Cast(op.Constant(value_float=float("-inf")), to=compute)
    probs = op.Softmax(op.Where(visible, scores, minus_inf), axis=-1)
    # Padding tokens see no key at all (a NaN row): zero them.
    real = op.Unsqueeze(valid, _ints([1, 2, 3]))
    probs = op.Where(real, probs, op.Cast(op.Constant(value_float=0.0), to=compute))
    out = op.MatMul(probs, values)  # [T, KVH, G, D]
    return op.CastLike(op.Reshape(out, _ints([0, num_heads, head_size])), q)


def _alibi_or_none(alibi_slopes):
    # An empty slope tensor means "no ALiBi" (see compiled_attn.export.functional).
    if alibi_slopes is None or (alibi_slopes.shape is not None and 0 in tuple(alibi_slopes.shape)):
        return None
    return alibi_slopes


def _check_cache(kv_cache, target: str, op_name: str) -> None:
    if kv_cache.dtype is not None and kv_cache.dtype.itemsize == 1:
        check_supported(target, op_name, ["fp8_kv_cache"])


# ---------------------------------------------------------------------------------------------
# Translations, per target


def _attention_onnxruntime(q, k, v, kv_cache, query_start_loc, seq_lens, block_table, slot_mapping, k_scale,
                           v_scale, alibi_slopes, backend, scale, sliding_window, logits_soft_cap, max_query_len):
    _check_cache(kv_cache, "onnxruntime", "compiled_attn::attention")
    new_cache = _store(k, v, kv_cache, slot_mapping)
    out = _attend(q, new_cache, query_start_loc, seq_lens, block_table, _alibi_or_none(alibi_slopes),
                  kv_heads=_static(kv_cache, 3, "num_kv_heads"), scale=scale, sliding_window=sliding_window,
                  logits_soft_cap=logits_soft_cap)
    return out, new_cache


def _store_kv_translation(target: str) -> Callable[..., Any]:
    # Standard ops on both targets: TensorRT has ScatterND too.
    def store_kv(k, v, kv_cache, slot_mapping, k_scale, v_scale):
        _check_cache(kv_cache, target, "compiled_attn::store_kv")
        return _store(k, v, kv_cache, slot_mapping)

    return store_kv


def _attention_tensorrt(q, k, v, kv_cache, query_start_loc, seq_lens, block_table, slot_mapping, k_scale,
                        v_scale, alibi_slopes, backend, scale, sliding_window, logits_soft_cap, max_query_len):
    _check_cache(kv_cache, "tensorrt", "compiled_attn::attention")
    inputs = [q, k, v, kv_cache, query_start_loc, seq_lens, block_table, slot_mapping, k_scale, v_scale]
    alibi_slopes = _alibi_or_none(alibi_slopes)
    if alibi_slopes is not None:
        inputs.append(alibi_slopes)
    out, new_cache = _trt.PagedAttention(
        *inputs,
        scale=float(scale),
        sliding_window=int(sliding_window),
        logits_soft_cap=float(logits_soft_cap),
        num_heads=_static(q, 1, "num_heads"),
        num_kv_heads=_static(kv_cache, 3, "num_kv_heads"),
        head_size=_static(q, 2, "head_size"),
        block_size=_static(kv_cache, 2, "block_size"),
        max_query_len=int(max_query_len),
        plugin_version="1",
        plugin_namespace=TRT_PLUGIN_NAMESPACE,
        _outputs=2,
    )
    return out, new_cache


def _select_scatter(x, src, dim: int, index: int):
    """``aten.select_scatter`` as a ScatterND of one slice (torchlib's lowering builds an index
    tensor as large as ``x``: a whole-cache constant when a layer writes ``kv[i]`` of a stacked cache)."""
    rank = len(x.shape)
    dim = dim % rank
    index = index % _static(x, dim, "select_scatter dimension")
    where = op.Constant(value=ir.tensor([[index]], dtype=ir.DataType.INT64))  # [1, 1]
    if dim == 0:
        return op.ScatterND(x, where, op.Unsqueeze(src, _ints([0])))
    perm = [dim, *[d for d in range(rank) if d != dim]]  # bring `dim` to the front, scatter, put it back
    # src's axes are x's other axes in their original order: exactly the moved x's trailing axes.
    moved = op.ScatterND(op.Transpose(x, perm=perm), where, op.Unsqueeze(src, _ints([0])))
    return op.Transpose(moved, perm=[perm.index(d) for d in range(rank)])


def translation_table(target: str = "onnxruntime") -> dict[Callable[..., Any], Callable[..., Any]]:
    """The ``custom_translation_table`` for ``torch.onnx.export`` on ``target``."""
    if target not in TARGETS:
        raise ValueError(f"unknown export target {target!r}; known: {', '.join(TARGETS)}")
    attention = _attention_onnxruntime if target == "onnxruntime" else _attention_tensorrt
    return {
        torch.ops.compiled_attn.attention_functional.default: attention,
        torch.ops.compiled_attn.store_kv_functional.default: _store_kv_translation(target),
        torch.ops.aten.select_scatter.default: _select_scatter,
    }


# ---------------------------------------------------------------------------------------------
# The entry point


def to_onnx(
    model_or_step: Callable[..., Any],
    example_inputs: Sequence[Any],
    path: str | os.PathLike | None = None,
    *,
    target: str = "onnxruntime",
    opset: int | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_shapes: Any = None,
    check: bool = True,
) -> onnx.ModelProto:
    """Export one model step to ONNX with every KV cache as an input and an output.

    ``model_or_step`` is a module, a bound method (``model.step``) or a function, called as
    ``model_or_step(*example_inputs)``; the KV caches must be among its arguments (one stacked
    tensor, or a list of per-layer tensors; a ``PagedKVCache`` is passed as its stacked tensor) and
    ``AttentionMetadata`` may be passed as is (its tensors become inputs, its ``max_query_len`` a
    constant). The tensors' values are not used beyond tracing.

    Graph inputs are the tensors of ``example_inputs``, named by parameter and pytree path
    (``kv_caches_0``, ``meta_slot_mapping``). Outputs are the step's outputs (``output_names``, by
    default ``output`` or ``output_0, output_1, ...``), then the new value of each cache the step
    wrote, named ``new_<input name>``.

    ``target``: ``"onnxruntime"`` (standard ops) or ``"tensorrt"`` (``PagedAttention`` plugin nodes
    of domain :data:`TRT_DOMAIN`); see the module docstring. A feature the target does not
    translate raises :class:`~compiled_attn.export.UnsupportedExportError` naming the op, the
    feature and the target. ``opset`` is the default-domain opset (``None``: the exporter's
    default).

    ``dynamic_shapes`` goes to ``torch.export.export``: one entry per example input, or a dict by
    parameter name (:func:`~compiled_attn.export.metadata_dynamic_shapes` builds the metadata's).
    The example's dynamic dimensions must be at least 2: ``torch.export`` specializes sizes 0 and 1.

    Writes ``path`` if given and returns the model; ``check`` runs ``onnx.checker.check_model``.

    >>> import compiled_attn as ca
    >>> spec = ca.AttentionSpec(num_heads=2, num_kv_heads=1, head_size=8)
    >>> attn = ca.Attention(spec, backend="reference", device="cpu")
    >>> cache = torch.zeros(2, 4, 4, 1, 8)
    >>> meta = ca.AttentionMetadata.build([3], [3], [[2]], block_size=4)
    >>> model = to_onnx(attn, (torch.randn(3, 2, 8), torch.randn(3, 1, 8), torch.randn(3, 1, 8), cache, meta))
    >>> [i.name for i in model.graph.output]
    ['output', 'new_kv_cache']
    """
    check_supported(target, "compiled_attn::attention", [])  # validates the target name
    program, input_names, written = export_step(model_or_step, example_inputs, target=target,
                                                dynamic_shapes=dynamic_shapes)
    num_step_outputs = len(program.graph_signature.user_outputs) - len(written)
    if output_names is None:
        output_names = ["output"] if num_step_outputs == 1 else [f"output_{i}" for i in range(num_step_outputs)]
    elif len(output_names) != num_step_outputs:
        raise ValueError(f"output_names has {len(output_names)} names but the step returns {num_step_outputs} tensors")
    names = list(output_names) + [f"new_{input_names[i]}" for i in written]
    onnx_program = torch.onnx.export(
        program,
        tuple(example_inputs),
        dynamo=True,
        custom_translation_table=translation_table(target),
        opset_version=opset,
        input_names=input_names,
        output_names=names,
        verbose=False,
    )
    model = onnx_program.model_proto
    if check:
        onnx.checker.check_model(model)
    if path is not None:
        onnx_program.save(os.fspath(path))
    return model
