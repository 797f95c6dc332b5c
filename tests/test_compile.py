"""The model step and a bare Attention layer under torch.compile(fullgraph=True): no graph
breaks, one graph per bucket (no recompiles across batch compositions), eager's answers."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import compiled_attn
from compiled_attn import AttentionMetadata, AttentionSpec
from compiled_attn.models import LlamaConfig, LlamaForCausalLM, SeqChunk, build_step_inputs

BLOCK = 16
# One padded shape (a bucket) for every batch below: tokens, sequences, block-table width.
BUCKET = dict(num_tokens=32, num_seqs=4, max_blocks=4, max_query_len=32)
# Named batch compositions, all inside BUCKET: (context already cached, new tokens) per sequence.
BATCHES = {
    "prefill_and_decodes": [(0, 20), (30, 1), (7, 1)],
    "chunked_prefill_with_prefix": [(16, 16), (40, 1), (2, 1), (12, 3)],
    "decodes_only": [(50, 1), (1, 1)],
}
TOLERANCE = 1e-4  # fp32: compiled and eager differ only by fusion/reduction order


def _batch(composition, seed: int):
    """StepInputs for a composition, with block ids drawn from a shuffled pool of 16."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.randperm(16, generator=g).tolist()
    chunks = []
    for context, new in composition:
        blocks = [pool.pop() for _ in range(-(-(context + new) // BLOCK))]
        tokens = torch.randint(0, 256, (new,), generator=g).tolist()
        chunks.append(SeqChunk(tokens, context, blocks))
    return build_step_inputs(chunks, BLOCK, num_blocks=16, **BUCKET)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _assert_one_graph_no_breaks():
    assert dict(counters["graph_break"]) == {}, f"graph breaks: {dict(counters['graph_break'])}"
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("backend", ["torch_native"])
def test_model_step_compiles_once_per_bucket(backend):
    model = LlamaForCausalLM.random(LlamaConfig.preset("tiny"), seed=0, backend=backend, device="cpu")
    keys = list(model.state_dict())
    compiled = model.compiled_step()
    assert model.compiled_step() is compiled and list(model.state_dict()) == keys  # cached, not a submodule
    cache = model.new_cache(num_blocks=16, block_size=BLOCK)
    cache.kv.normal_(generator=torch.Generator().manual_seed(0))  # a cache already holding contexts
    eager_kv = cache.kv.clone()
    for i, (name, composition) in enumerate(BATCHES.items()):
        inputs = _batch(composition, seed=i)
        args = (inputs.input_ids, inputs.positions)
        with torch.no_grad():
            expected = model(*args, eager_kv, inputs.meta, inputs.logits_index)
            # After the first call, any recompile inside the bucket is an error.
            with torch._dynamo.config.patch(error_on_recompile=i > 0):
                got = compiled(*args, cache.kv, inputs.meta, inputs.logits_index)
        assert got.shape == (BUCKET["num_seqs"], model.config.vocab_size)
        assert _rel_err(got[: len(composition)], expected[: len(composition)]) <= TOLERANCE, name
        assert _rel_err(cache.kv, eager_kv) <= TOLERANCE, f"{name}: cache differs"
    _assert_one_graph_no_breaks()


@pytest.mark.parametrize("backend", ["reference", "torch_native"])
def test_bare_attention_layer_compiles(backend):
    spec = AttentionSpec(num_heads=4, num_kv_heads=2, head_size=16)
    attn = compiled_attn.Attention(spec, backend=backend, device="cpu")

    def step(q, k, v, kv_cache, meta: AttentionMetadata):
        # Some math around the op, so the compiler has something to fuse across its boundary.
        return attn(q * 2.0, k, v, kv_cache, meta).relu() + 1.0

    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    g = torch.Generator().manual_seed(1)
    kv = torch.randn(2, 16, BLOCK, 2, 16, generator=g)
    eager_kv = kv.clone()
    for i, composition in enumerate(BATCHES.values()):
        meta = _batch(composition, seed=10 + i).meta
        q, k, v = (torch.randn(BUCKET["num_tokens"], h, 16, generator=g) for h in (4, 2, 2))
        expected = step(q, k, v, eager_kv, meta)
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            got = compiled(q, k, v, kv, meta)
        real = int(meta.query_start_loc[-1])
        assert _rel_err(got[:real], expected[:real]) <= TOLERANCE
        assert torch.equal(kv, eager_kv)  # the store is a copy: bit-exact
    _assert_one_graph_no_breaks()


def test_generate_compiled_matches_eager():
    model = LlamaForCausalLM.random(LlamaConfig.preset("tiny"), seed=0, backend="torch_native", device="cpu")
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6], [9] * 4]
    expected = model.generate(prompts, max_new_tokens=[6, 3, 5], max_num_seqs=2, shuffle_seed=0)
    got = model.generate(prompts, max_new_tokens=[6, 3, 5], max_num_seqs=2, shuffle_seed=0, compile=True)
    assert got == expected
    # Three buckets (tokens, max_query_len): (16, 16) for the first prefills, (8, 8) when
    # the third prompt joins two decodes, (8, 1) for pure decodes. One graph each.
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 3
