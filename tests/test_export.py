"""Export: functional twins of the cache-writing ops, ONNX for ONNX Runtime (run and compared with
PyTorch), ONNX with TensorRT plugin nodes (checked structurally), clear errors, the example."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.utils._pytree as pytree
from torch import nn

import compiled_attn as ca
from compiled_attn import models
from batches import TOLERANCE, make_batch, rel_error
from compiled_attn.export import UnsupportedExportError, functional_attention, metadata_dynamic_shapes

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from compiled_attn.export import to_onnx  # noqa: E402  (needs onnx)
from compiled_attn.export.onnx import TRT_DOMAIN  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]

# (batch spec, layer features, query dtype): every optional feature the onnxruntime target lowers,
# GQA and MQA, decode, prefill, prefix prefill and mixed batches.
LAYER_CASES = {
    "gqa_mixed": ("mixed", dict(num_kv_heads=2), torch.float32),
    "mqa_large_decode": ("large_decode", dict(num_kv_heads=1), torch.float32),
    "window_spec_decode": ("spec_decode", dict(num_kv_heads=2, sliding_window=6), torch.float32),
    "softcap_prefix_prefill": ("prefix_prefill", dict(num_kv_heads=2, logits_soft_cap=2.0), torch.float32),
    "alibi_chunked_prefill": ("chunked_prefill", dict(num_kv_heads=2, alibi_slopes=(0.5, 0.25, 0.125, 0.0625)),
                              torch.float32),
    "all_features_fp16": ("mixed", dict(num_kv_heads=1, sliding_window=9, logits_soft_cap=3.0,
                                        alibi_slopes=(0.3, 0.2, 0.1, 0.05)), torch.float16),
}


def tensor_leaves(args) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(args) if isinstance(t, torch.Tensor)]


def run_onnx(model: onnx.ModelProto, args) -> list:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {n: t.numpy() for n, t in zip(names, tensor_leaves(args))})


def layer(**features) -> ca.Attention:
    spec = ca.AttentionSpec(num_heads=4, head_size=16, **features)
    return ca.Attention(spec, backend="reference", device="cpu")


# ---------------------------------------------------------------------------------------------
# The functional ops


@pytest.mark.parametrize("alibi", [False, True])
def test_attention_functional_opcheck(alibi):
    slopes = (0.5, 0.25, 0.125, 0.0625) if alibi else None
    spec = ca.AttentionSpec(num_heads=4, num_kv_heads=2, head_size=16, alibi_slopes=slopes, sliding_window=7)
    b = make_batch("mixed", spec)
    m, one = b.meta, torch.tensor(1.0)
    slopes_t = torch.tensor(slopes) if alibi else torch.empty(0)
    args = (b.q, b.k, b.v, b.kv_cache, m.query_start_loc, m.seq_lens, m.block_table, m.slot_mapping, one, one,
            slopes_t, "reference", spec.softmax_scale, 7, 0.0, m.max_query_len)
    torch.library.opcheck(torch.ops.compiled_attn.attention_functional.default, args)


def test_store_kv_functional_opcheck():
    b = make_batch("spec_decode", ca.AttentionSpec(num_heads=4, num_kv_heads=2, head_size=16))
    one = torch.tensor(1.0)
    torch.library.opcheck(torch.ops.compiled_attn.store_kv_functional.default,
                          (b.k, b.v, b.kv_cache, b.meta.slot_mapping, one, one))


def test_functional_attention_is_the_same_computation():
    attn = layer(num_kv_heads=2, sliding_window=5, alibi_slopes=(0.1, 0.2, 0.3, 0.4))
    b = make_batch("mixed", attn.spec)
    cache_a, cache_b = b.kv_cache.clone(), b.kv_cache.clone()
    expected = attn(b.q, b.k, b.v, cache_a, b.meta)
    with functional_attention() as mode:
        got = attn(b.q, b.k, b.v, cache_b, b.meta)
    assert mode.wrote(cache_b)
    assert torch.equal(got, expected)
    assert torch.equal(cache_b, cache_a)


# ---------------------------------------------------------------------------------------------
# One layer through ONNX Runtime


@pytest.mark.parametrize("case", LAYER_CASES)
def test_layer_onnxruntime_matches_torch(case):
    name, features, dtype = LAYER_CASES[case]
    attn = layer(**features)
    b = make_batch(name, attn.spec, dtype=dtype)
    args = (b.q, b.k, b.v, b.kv_cache, b.meta)
    model = to_onnx(attn, args)  # runs onnx.checker
    assert [i.name for i in model.graph.input] == ["q", "k", "v", "kv_cache", "meta_query_start_loc",
                                                   "meta_seq_lens", "meta_block_table", "meta_slot_mapping"]
    assert [o.name for o in model.graph.output] == ["output", "new_kv_cache"]
    assert not {n.domain for n in model.graph.node} - {""}, "onnxruntime target must use standard ops only"

    expected_cache = b.kv_cache.clone()
    expected = attn(b.q, b.k, b.v, expected_cache, b.meta)
    out, new_cache = (torch.from_numpy(x) for x in run_onnx(model, args))
    assert rel_error(out, expected) <= TOLERANCE[dtype]
    assert torch.equal(new_cache, expected_cache), "the exported cache update differs from the op's"
    assert not out[b.num_real_tokens:].any(), "padding tokens must produce zeros"


# ---------------------------------------------------------------------------------------------
# Whole models: caches in, caches out


class TinyStacked(nn.Module):
    """A model of our own: two attention layers over one stacked cache ``[L, 2, blocks, bs, KVH, D]``."""

    def __init__(self, spec: ca.AttentionSpec, hidden: int = 32) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.spec = spec
        self.qkv = nn.ModuleList(nn.Linear(hidden, (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_size)
                                 for _ in range(2))
        self.out = nn.ModuleList(nn.Linear(spec.num_heads * spec.head_size, hidden) for _ in range(2))
        self.attn = nn.ModuleList(ca.Attention(spec, backend="reference", device="cpu") for _ in range(2))

    def forward(self, x: torch.Tensor, kv: torch.Tensor, meta: ca.AttentionMetadata) -> torch.Tensor:
        s = self.spec
        for i in range(2):
            q, k, v = self.qkv[i](x).split([s.num_heads * s.head_size, s.num_kv_heads * s.head_size,
                                            s.num_kv_heads * s.head_size], dim=-1)
            a = self.attn[i](q.view(-1, s.num_heads, s.head_size), k.view(-1, s.num_kv_heads, s.head_size),
                             v.view(-1, s.num_kv_heads, s.head_size), kv[i], meta)
            x = x + self.out[i](a.flatten(1))
        return x


def test_own_model_step_function_with_stacked_cache():
    spec = ca.AttentionSpec(num_heads=4, num_kv_heads=2, head_size=8, sliding_window=12)
    model = TinyStacked(spec).eval()
    b = make_batch("mixed", spec)
    kv = torch.stack([b.kv_cache, b.kv_cache.flip(1)])

    def step(x, kv, meta):  # a plain function: the model's weights become graph constants
        return model(x, kv, meta)

    x = torch.randn(b.meta.num_tokens, 32)
    onnx_model = to_onnx(step, (x, kv, b.meta))
    assert [o.name for o in onnx_model.graph.output] == ["output", "new_kv"]
    ops = {n.op_type for n in onnx_model.graph.node}
    # The per-layer write into the stacked cache is one ScatterND of one layer, not torchlib's
    # ScatterElements with a whole-cache index constant.
    assert "ScatterElements" not in ops
    biggest = max(onnx.numpy_helper.to_array(t).size for t in onnx_model.graph.initializer)
    assert biggest < kv[0].numel()

    expected_kv = kv.clone()
    with torch.no_grad():
        expected = model(x, expected_kv, b.meta)
    out, new_kv = (torch.from_numpy(a) for a in run_onnx(onnx_model, (x, kv, b.meta)))
    assert rel_error(out, expected) <= 1e-4
    assert rel_error(new_kv, expected_kv) <= 1e-6  # K/V come out of a Linear: same math, not the same bits


def test_cache_that_is_not_a_step_input_is_an_error():
    attn = layer(num_kv_heads=2)
    b = make_batch("small_decode", attn.spec)

    class HoldsItsCache(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = attn
            self.register_buffer("kv", b.kv_cache.clone())

        def forward(self, q, k, v, meta):
            return self.attn(q, k, v, self.kv, meta)

    with pytest.raises(ValueError, match="not an input of the exported step"):
        to_onnx(HoldsItsCache(), (b.q, b.k, b.v, b.meta))


# ---------------------------------------------------------------------------------------------
# The Llama-family model: prefill and decode graphs, greedy decoding driven through ONNX Runtime


BLOCK_SIZE, NUM_BLOCKS, MAX_BLOCKS = 4, 24, 7
PROMPTS = [[5, 17, 33, 2, 9, 41], [100, 7, 64]]
DECODE_STEPS = 16


@pytest.fixture(scope="module")
def llama():
    config = models.LlamaConfig.preset("tiny")
    return models.LlamaForCausalLM.random(config, seed=0, backend="reference", device="cpu",
                                          dtype=torch.float32).eval()


def llama_inputs(chunks, num_tokens, max_blocks=MAX_BLOCKS):
    return models.build_step_inputs(chunks, BLOCK_SIZE, num_tokens=num_tokens, num_seqs=len(chunks),
                                    max_blocks=max_blocks, num_blocks=NUM_BLOCKS)


def llama_args(step, caches, with_index=True):
    return (step.input_ids, step.positions, caches, step.meta) + ((step.logits_index,) if with_index else ())


def test_llama_greedy_decode_through_onnxruntime(llama):
    cache = llama.new_cache(NUM_BLOCKS, BLOCK_SIZE, shuffle_seed=3)
    blocks = [cache.allocator.allocate(MAX_BLOCKS) for _ in PROMPTS]
    prefill = llama_inputs([models.SeqChunk(p, 0, b) for p, b in zip(PROMPTS, blocks)], num_tokens=12)
    decode = llama_inputs([models.SeqChunk([0], len(p), b) for p, b in zip(PROMPTS, blocks)], num_tokens=2)
    # Two fixed-shape graphs, one per bucket; the prefill graph takes the stacked cache, the decode
    # graph one tensor per layer: both forms are threaded through as inputs and outputs.
    prefill_graph = to_onnx(llama, llama_args(prefill, cache.kv.clone()), output_names=["logits"])
    decode_graph = to_onnx(llama, llama_args(decode, list(cache.kv.clone()), with_index=False),
                           output_names=["logits"])
    assert [o.name for o in prefill_graph.graph.output] == ["logits", "new_kv_caches"]
    assert [o.name for o in decode_graph.graph.output] == ["logits", "new_kv_caches_0", "new_kv_caches_1"]
    assert [i.name for i in decode_graph.graph.input][2:4] == ["kv_caches_0", "kv_caches_1"]
    sessions = [ort.InferenceSession(g.SerializeToString(), providers=["CPUExecutionProvider"])
                for g in (prefill_graph, decode_graph)]

    def run(session, args):
        names = [i.name for i in session.get_inputs()]
        return session.run(None, {n: t.numpy() for n, t in zip(names, tensor_leaves(args))})

    torch_cache = cache.kv.clone()
    with torch.no_grad():
        expected = llama(*llama_args(prefill, torch_cache))
    logits, onnx_cache = run(sessions[0], llama_args(prefill, cache.kv))
    assert rel_error(torch.from_numpy(logits), expected) <= 1e-4
    torch_tokens, onnx_tokens = [expected.argmax(-1).tolist()], [logits.argmax(-1).tolist()]
    onnx_caches = list(onnx_cache)  # the decode graph takes one tensor per layer
    lengths = [len(p) for p in PROMPTS]
    for _ in range(DECODE_STEPS):
        # Each side feeds its own previous tokens and its own returned cache.
        t_step = llama_inputs([models.SeqChunk([t], n, b) for t, n, b in zip(torch_tokens[-1], lengths, blocks)], 2)
        o_step = llama_inputs([models.SeqChunk([t], n, b) for t, n, b in zip(onnx_tokens[-1], lengths, blocks)], 2)
        with torch.no_grad():
            expected = llama(*llama_args(t_step, torch_cache, with_index=False))
        logits, *onnx_caches = run(sessions[1], llama_args(o_step, [torch.from_numpy(c) for c in onnx_caches],
                                                           with_index=False))
        assert rel_error(torch.from_numpy(logits), expected) <= 1e-4
        torch_tokens.append(expected.argmax(-1).tolist())
        onnx_tokens.append(logits.argmax(-1).tolist())
        lengths = [n + 1 for n in lengths]
    assert onnx_tokens == torch_tokens
    assert max(abs(c - t.numpy()).max() for c, t in zip(onnx_caches, torch_cache)) <= 1e-5


def test_llama_one_graph_with_dynamic_shapes(llama):
    from torch.export import Dim

    cache = llama.new_cache(NUM_BLOCKS, BLOCK_SIZE, shuffle_seed=4)
    blocks = [cache.allocator.allocate(MAX_BLOCKS) for _ in range(3)]
    tokens, seqs, width = Dim("num_tokens", min=2), Dim("num_seqs", min=2), Dim("max_blocks", min=2)
    dynamic = {"input_ids": {0: tokens}, "positions": {0: tokens}, "kv_caches": None,
               "meta": metadata_dynamic_shapes(tokens, seqs, width), "logits_index": {0: seqs}}
    example = llama_inputs([models.SeqChunk(p, 0, b) for p, b in zip(PROMPTS, blocks)], num_tokens=12)
    graph = to_onnx(llama, llama_args(example, cache.kv.clone()), dynamic_shapes=dynamic)
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    # Other token counts, sequence counts and table widths than the example's: a mixed batch.
    cache.kv.normal_(generator=torch.Generator().manual_seed(0))
    chunks = [models.SeqChunk([3, 4, 5], 9, blocks[0]), models.SeqChunk([8], 20, blocks[1]),
              models.SeqChunk(list(range(7)), 0, blocks[2])]
    for chunks_, num_tokens, width_ in ((chunks, 13, 6), (chunks[1:], 8, 7)):
        step = llama_inputs(chunks_, num_tokens, max_blocks=width_)
        torch_cache = cache.kv.clone()
        with torch.no_grad():
            expected = llama(*llama_args(step, torch_cache))
        logits, new_cache = session.run(None, {n: t.numpy() for n, t in
                                               zip(names, tensor_leaves(llama_args(step, cache.kv)))})
        assert logits.shape == tuple(expected.shape)
        assert rel_error(torch.from_numpy(logits), expected) <= 1e-4
        assert abs(new_cache - torch_cache.numpy()).max() <= 1e-5


# ---------------------------------------------------------------------------------------------
# The tensorrt target: plugin nodes


def test_tensorrt_target_plugin_nodes(llama):
    attn = layer(num_kv_heads=2, sliding_window=8, logits_soft_cap=5.0, alibi_slopes=(1.0, 0.5, 0.25, 0.125))
    b = make_batch("mixed", attn.spec)
    model = to_onnx(attn, (b.q, b.k, b.v, b.kv_cache, b.meta), target="tensorrt")
    onnx.checker.check_model(model, full_check=True)
    assert {(o.domain, o.version) for o in model.opset_import} >= {(TRT_DOMAIN, 1)}
    (node,) = [n for n in model.graph.node if n.domain == TRT_DOMAIN]
    assert node.op_type == "PagedAttention"
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["num_heads"] == 4 and attrs["num_kv_heads"] == 2 and attrs["head_size"] == 16
    assert attrs["block_size"] == 16 and attrs["sliding_window"] == 8
    assert attrs["scale"] == pytest.approx(0.25) and attrs["logits_soft_cap"] == pytest.approx(5.0)
    assert attrs["plugin_version"] == b"1" and attrs["plugin_namespace"] == b"compiled_attn"
    assert len(node.input) == 11  # ALiBi slopes present
    assert list(node.output) == ["output", "new_kv_cache"]
    assert "Softmax" not in {n.op_type for n in model.graph.node}

    # A whole model: one plugin node per layer, no ALiBi input, the rest standard ops.
    cache = llama.new_cache(NUM_BLOCKS, BLOCK_SIZE)
    blocks = [cache.allocator.allocate(2) for _ in PROMPTS]
    step = llama_inputs([models.SeqChunk([1], 5, b) for b in blocks], 2, max_blocks=2)
    graph = to_onnx(llama, llama_args(step, cache), target="tensorrt", output_names=["logits"])  # PagedKVCache
    plugins = [n for n in graph.graph.node if n.domain == TRT_DOMAIN]
    assert len(plugins) == llama.config.num_layers
    assert all(len(n.input) == 10 for n in plugins)
    assert [o.name for o in graph.graph.output] == ["logits", "new_kv_caches"]


# ---------------------------------------------------------------------------------------------
# Errors


def test_untranslated_feature_names_op_feature_and_target():
    spec = ca.AttentionSpec(num_heads=4, num_kv_heads=2, head_size=16, kv_cache_dtype="fp8_e4m3")
    attn = ca.Attention(spec, backend="reference", device="cpu")
    b = make_batch("small_decode", spec)
    args = (b.q, b.k, b.v, b.kv_cache, b.meta)
    for target in ("onnxruntime", "tensorrt"):
        # Found before tracing (a module's layers) ...
        with pytest.raises(UnsupportedExportError, match=rf"compiled_attn::attention: fp8_kv_cache .*'{target}'"):
            to_onnx(attn, args, target=target)
        # ... and while tracing (a plain function hides its layers).
        with pytest.raises(UnsupportedExportError, match=rf"compiled_attn::attention: fp8_kv_cache .*'{target}'"):
            to_onnx(lambda *a: attn(*a), args, target=target)
    with pytest.raises(ValueError, match="unknown export target 'tflite'"):
        to_onnx(attn, args, target="tflite")


def test_store_kv_op_exports_and_other_mutating_ops_are_named():
    b = make_batch("chunked_prefill", ca.AttentionSpec(num_heads=4, num_kv_heads=2, head_size=16))
    one = torch.tensor(1.0)

    def store(k, v, kv, slots):  # the op called directly, through its packet
        torch.ops.compiled_attn.store_kv(k, v, kv, slots, one, one)
        return k.sum()

    args = (b.k, b.v, b.kv_cache, b.meta.slot_mapping)
    model = to_onnx(store, args)
    assert [o.name for o in model.graph.output] == ["output", "new_kv"]
    expected = b.kv_cache.clone()
    ca.ops.store_kv(b.k, b.v, expected, b.meta.slot_mapping, one, one)
    assert torch.equal(torch.from_numpy(run_onnx(model, args)[1]), expected)

    @torch.library.custom_op("compiled_attn::_test_export_scribble", mutates_args=("x",))
    def scribble(x: torch.Tensor) -> None:
        x.zero_()

    with pytest.raises(UnsupportedExportError, match="compiled_attn::_test_export_scribble mutates its inputs"):
        to_onnx(lambda x: scribble(x), (torch.ones(3),))


def test_to_tensorrt_without_torch_tensorrt_names_the_extra(monkeypatch):
    from compiled_attn.export import to_tensorrt

    monkeypatch.setitem(sys.modules, "torch_tensorrt", None)  # import fails, installed or not
    with pytest.raises(ImportError, match=r"pip install compiled-attn\[tensorrt\]"):
        to_tensorrt(layer(num_kv_heads=2), ())


@pytest.mark.gpu
def test_to_tensorrt_matches_torch():
    pytest.importorskip("torch_tensorrt", reason="torch-tensorrt (and TensorRT) is not installed")
    from compiled_attn.export import to_tensorrt

    spec = ca.AttentionSpec(num_heads=4, num_kv_heads=2, head_size=64)
    attn = ca.Attention(spec, device="cuda", dtype=torch.float16)
    b = make_batch("mixed", spec, dtype=torch.float16, device="cuda")
    args = (b.q, b.k, b.v, b.kv_cache, b.meta)
    compiled = to_tensorrt(attn, args)
    out, (new_cache,) = compiled(*args)
    expected_cache = b.kv_cache.clone()
    expected = attn(b.q, b.k, b.v, expected_cache, b.meta)
    assert rel_error(out, expected) <= TOLERANCE[torch.float16]
    assert torch.equal(new_cache, expected_cache)


# ---------------------------------------------------------------------------------------------
# The example and the command line


def test_export_onnx_example():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "examples/export_onnx.py", "--steps", "4"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == "OK", proc.stdout
    error = next(line for line in lines if line.startswith("max |logits error|"))
    assert float(error.rsplit(":", 1)[1]) < 1e-4


def test_cli_export(tmp_path, capsys):
    from compiled_attn.cli import main

    path = tmp_path / "decode.onnx"
    assert main(["export", "--output", str(path), "--num-seqs", "2", "--verify"]) == 0
    out = capsys.readouterr().out
    assert path.exists() and "outputs: logits, new_kv_caches" in out
    error = out.split("max |logits error|")[1].split(",")[0]
    assert float(error) < 1e-4
    assert main(["export", "--output", str(tmp_path / "trt.onnx"), "--target", "tensorrt"]) == 0
    assert f"{TRT_DOMAIN}::PagedAttention" in capsys.readouterr().out
