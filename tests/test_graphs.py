"""CUDAGraphRunner: bucket choice, padding, the stale-plan check and the eager fallback (CPU),
replay against eager on the GPU."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import compiled_attn as ca
from compiled_attn.graphs import BatchLayout, Bucket, CUDAGraphRunner, choose_bucket, default_decode_buckets

SPEC = ca.AttentionSpec(num_heads=4, num_kv_heads=2, head_size=64)  # every GPU backend serves 64


def test_default_decode_buckets():
    assert default_decode_buckets(32) == [1, 2, 4, 8, 16, 24, 32]
    assert default_decode_buckets(20) == [1, 2, 4, 8, 16, 20]


@pytest.mark.parametrize(
    "query_lens, expected",
    [
        ([1, 1, 1], Bucket("decode", 4, 4)),
        ([1] * 8, Bucket("decode", 8, 8)),
        ([5, 1], Bucket("prefill", 8, 8)),
        ([9, 1, 1], Bucket("prefill", 16, 8)),
        ([1] * 9, Bucket("prefill", 16, 8)),  # over the largest decode bucket: a prefill bucket takes it
    ],
)
def test_choose_bucket(query_lens, expected):
    batch = BatchLayout(query_lens, [q + 3 for q in query_lens], [[i] for i in range(len(query_lens))])
    assert choose_bucket(batch, [1, 2, 4, 8], [8, 16], max_num_seqs=16, max_blocks=2) == dataclasses.replace(
        expected, num_seqs=expected.num_seqs if expected.kind == "decode" else 16)


@pytest.mark.parametrize(
    "batch, reason",
    [
        (BatchLayout([40], [40], [[0, 1, 2]]), "over the largest prefill bucket"),
        (BatchLayout([1], [40], [[0, 1, 2, 3]]), "over the 3 the graphs were captured with"),
        (BatchLayout([2] * 5, [2] * 5, [[i] for i in range(5)]), "over max_num_seqs=4"),
    ],
)
def test_choose_bucket_reasons(batch, reason):
    result = choose_bucket(batch, [1, 2, 4], [16, 32], max_num_seqs=4, max_blocks=3)
    assert isinstance(result, str) and reason in result


class TinyStep(torch.nn.Module):
    """A user's step: project tokens to q/k/v, one paged attention layer, back to features."""

    def __init__(self, backend: str = "reference", device: str = "cpu", block_size: int = 4, spec=SPEC):
        super().__init__()
        torch.manual_seed(0)
        self.qkv = torch.nn.Linear(16, (SPEC.num_heads + 2 * SPEC.num_kv_heads) * SPEC.head_size, device=device)
        self.attn = ca.Attention(spec, backend=backend, device=device)
        # In the memory order the backend allocates (fp8 caches of our kernels: head-major).
        self.kv_cache = ca.PagedKVCache(1, 32, block_size, spec, dtype=torch.float32, device=device,
                                        layout=self.attn.backend.kv_cache_layout(spec)).layer(0)

    def forward(self, x: torch.Tensor, meta: ca.AttentionMetadata) -> torch.Tensor:
        d = SPEC.head_size
        q, k, v = self.qkv(x).split([SPEC.num_heads * d, SPEC.num_kv_heads * d, SPEC.num_kv_heads * d], -1)
        out = self.attn(q.view(-1, SPEC.num_heads, d), k.view(-1, SPEC.num_kv_heads, d),
                        v.view(-1, SPEC.num_kv_heads, d), self.kv_cache, meta)
        return out.flatten(1)


def _runner(step, **kw):
    return CUDAGraphRunner(step, token_input_specs=[((16,), torch.float32)], block_size=4, max_blocks=4,
                           max_num_seqs=4, decode_buckets=[1, 2, 4], prefill_buckets=[8, 16], device="cpu", **kw)


def test_padded_run_equals_unpadded_eager():
    step, eager_step = TinyStep(), TinyStep()
    runner = _runner(step)
    runner.capture()
    batches = [
        BatchLayout([5, 2], [5, 2], [[3, 4], [9]]),  # prefill: pads 7 -> 8 tokens
        BatchLayout([1, 1], [6, 3], [[3, 4], [9]]),  # decode: bucket 2
        BatchLayout([1, 1, 3], [7, 4, 3], [[3, 4], [9], [11]]),  # mixed: pads 5 -> 8
    ]
    for batch in batches:
        x = torch.randn(batch.num_tokens, 16)
        got = runner.run([x], batch)
        meta = ca.AttentionMetadata.build(batch.query_lens, batch.seq_lens, batch.block_tables, 4)
        want = eager_step(x, meta)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert runner.last_eager_reason is None
    torch.testing.assert_close(step.kv_cache, eager_step.kv_cache)


def test_too_large_batch_runs_eagerly_with_reason():
    runner = _runner(TinyStep())
    runner.capture()
    batch = BatchLayout([20], [20], [[0, 1, 2, 3, 5]])
    out = runner.run([torch.randn(20, 16)], batch)
    assert out.shape == (20, SPEC.num_heads * SPEC.head_size)
    assert "over the 4 the graphs were captured with" in runner.last_eager_reason


def test_stale_plan_falls_back_to_eager():
    calls = {"n": 0}

    def plan(meta):
        # A plan that, after capture, asks for a wider block table than was captured.
        calls["n"] += 1
        if calls["n"] > len(runner.buckets()):
            wider = torch.nn.functional.pad(meta.block_table, (0, 5 - meta.block_table.shape[1]))
            return dataclasses.replace(meta, block_table=wider)
        return meta

    runner = _runner(TinyStep(), plan=plan)
    runner.capture()
    runner.run([torch.randn(2, 16)], BatchLayout([1, 1], [2, 2], [[0], [1]]))
    assert runner.last_eager_reason == "the backend's plan differs from the captured layout"


def test_graphs_need_cuda():
    with pytest.raises(ValueError, match="need a CUDA device"):
        CUDAGraphRunner(TinyStep(), token_input_specs=[], block_size=4, max_blocks=1, max_num_seqs=1,
                        device="cpu", use_graphs=True)


@pytest.mark.gpu
@pytest.mark.parametrize("backend,kv", [("reference", "auto"), ("torch_native", "auto"), ("triton", "auto"),
                                        ("trtllm", "auto"), ("triton", "fp8"), ("trtllm", "fp8")])
def test_replay_equals_eager_on_gpu(backend, kv):
    spec = dataclasses.replace(SPEC, kv_cache_dtype="fp8_e4m3") if kv == "fp8" else SPEC
    if ca.available_backends(spec, device="cuda").get(backend) != "available":
        pytest.skip(f"{backend} is not available here")
    bs = 16  # the smallest page every GPU backend serves
    step, eager_step = TinyStep(backend, "cuda", bs, spec), TinyStep(backend, "cuda", bs, spec)
    runner = CUDAGraphRunner(step, token_input_specs=[((16,), torch.float32)], block_size=bs, max_blocks=4,
                             max_num_seqs=8, decode_buckets=[1, 2, 4, 8], prefill_buckets=[8, 16], device="cuda")
    runner.capture()
    g = torch.Generator().manual_seed(1)
    # Every batch size of every decode bucket, and prefill steps of every sequence count, in one
    # run: the cache and block tables change from step to step.
    for num_seqs, decode in [(n, d) for n in range(1, 9) for d in (True, False)]:
        query_lens = [1] * num_seqs if decode else torch.randint(1, 3, (num_seqs,), generator=g).tolist()
        seq_lens = [q + int(torch.randint(0, 40, (1,), generator=g)) for q in query_lens]
        blocks = torch.randperm(32, generator=g).tolist()
        tables = [blocks[4 * i: 4 * i + -(-n // bs)] for i, n in enumerate(seq_lens)]
        batch = BatchLayout(query_lens, seq_lens, tables)
        x = torch.randn(batch.num_tokens, 16, device="cuda")
        allocations = torch.cuda.memory_stats()["allocation.all.allocated"]
        got = runner.run([x], batch)
        assert torch.cuda.memory_stats()["allocation.all.allocated"] == allocations, "a replayed step must not allocate"
        got = got.clone()
        assert runner.last_eager_reason is None
        meta = ca.AttentionMetadata.build(query_lens, seq_lens, tables, bs, "cuda")
        want = eager_step(x, meta)
        torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
    assert ca.cache.cache_layout(step.kv_cache) == step.attn.backend.kv_cache_layout(spec)
    torch.testing.assert_close(step.kv_cache.float(), eager_step.kv_cache.float(), rtol=1e-5, atol=1e-5)


def test_per_sequence_outputs_are_cut_to_the_sequence_count():
    # The prefill bucket (8 tokens) equals max_num_seqs: the row kind must come from output_rows.
    def last_rows(x, meta):
        return x[(meta.query_start_loc[1:] - 1).clamp(min=0)]

    runner = CUDAGraphRunner(last_rows, token_input_specs=[((), torch.float32)], block_size=4, max_blocks=2,
                             max_num_seqs=8, decode_buckets=[1], prefill_buckets=[8], device="cpu",
                             output_rows="seqs")
    runner.capture()
    out = runner.run([torch.arange(5.0)], BatchLayout([3, 2], [3, 2], [[0], [1]]))
    assert out.tolist() == [2.0, 4.0]


@pytest.mark.gpu
def test_capture_default_buckets_of_a_1b_shaped_model():
    from compiled_attn.models import LlamaConfig, LlamaForCausalLM
    from compiled_attn.models.steps import GraphedStep

    model = LlamaForCausalLM.random(LlamaConfig.preset("1b-shape"), device="cuda", dtype=torch.bfloat16)
    cache = model.new_cache(num_blocks=2048, block_size=16)
    graphed = GraphedStep(model, cache, max_num_seqs=64, max_batch_tokens=512, table_width=64,
                          device=torch.device("cuda"), progress=True)
    runner = graphed.runner
    assert len(runner._graphs) == len(runner.buckets()) >= 10
    assert all(graph is not None for graph, _, _ in runner._graphs.values())
    assert 0 < runner.graph_memory_bytes < 4 << 30, "graph memory is reported, and shared across buckets"
