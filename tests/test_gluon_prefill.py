"""The Hopper Gluon prefill kernel (compiled_attn/kernels/gluon_prefill.py) against the reference.

Gluon kernels do not run under the Triton interpreter, so these are GPU tests (an sm_90 GPU, ``-m
gpu``); on the CPU the kernel is compiled for sm_90 in tests/test_kernel_compile.py and the
dispatch is checked here. Every GPU case runs with a NaN-poisoned cache (unused blocks, the
block-table padding's trap block and every slot past a sequence's end) and a NaN-filled output,
and asserts that the Gluon kernel, not the Triton one, served it.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

pytest.importorskip("triton")

from compiled_attn.kernels import gluon_prefill as gp  # noqa: E402
from compiled_attn.kernels import paged_attention as pa_mod  # noqa: E402
from compiled_attn.kernels import store_kv as sk_mod  # noqa: E402
from batches import TOLERANCE, rel_error  # noqa: E402
from test_triton_kernels import (  # noqa: E402
    GPU_BATCHES, Case, _attention, _ragged, make_paged, nan_poisoned, reference_chunked, same_bits)

gpu = pytest.mark.gpu
needs_sm90 = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0) or gp.gluon is None,
    reason="needs an sm_90 GPU and Gluon's Hopper API")

BATCHES = dict(
    GPU_BATCHES,
    # lengths around the 128-token blocks and tiles, a 1-token prefill, one longer than a page table row's
    # first block, and tails that end inside a page
    varlen=([1, 127, 128, 129, 300, 17, 255], [1, 127, 128, 129, 300, 17, 255]),
    prefix_tails=([5, 128, 77, 1, 200], [133, 128 + 256, 1000, 2, 201]),
    mixed_small=_ragged(40, 700, [1, 1, 9, 130], 5),
)

BF16, FP16 = torch.bfloat16, torch.float16
CASES = {
    "prefill_bf16_d128_g4_bs16": ("prefill_2x1k", Case("", 32, 8, 128, 16, BF16)),
    "varlen_fp16_d128_g1_bs32": ("varlen", Case("", 8, 8, 128, 32, FP16)),
    "varlen_bf16_d64_g8_bs64": ("varlen", Case("", 16, 2, 64, 64, BF16)),
    "varlen_bf16_d128_mqa_bs256": ("varlen", Case("", 8, 1, 128, 256, BF16)),
    "prefix_bf16_d128_g4_bs16": ("prefix_prefill_4", Case("", 32, 8, 128, 16, BF16)),
    "prefix_tails_fp16_d64_g4_bs128": ("prefix_tails", Case("", 16, 4, 64, 128, FP16)),
    "prefix_tails_bf16_d128_g2_bs16": ("prefix_tails", Case("", 8, 4, 128, 16, BF16)),
    "chunked_32k_bf16": ("chunked_32k", Case("", 32, 8, 128, 16, BF16)),
    # head 256: 64-key tiles, outputs stored from registers
    "varlen_bf16_d256_g4_bs16": ("varlen", Case("", 16, 4, 256, 16, BF16)),
    "prefix_tails_fp16_d256_g2_bs64": ("prefix_tails", Case("", 8, 4, 256, 64, FP16)),
    "mixed_small_bf16_d256_bs16": ("mixed_small", Case("", 8, 1, 256, 16, BF16, max_query_len=130)),
    # padded heads: tiles of 128 or 256 columns reaching into the next head's (or past the last)
    "varlen_bf16_d80_g4_bs16": ("varlen", Case("", 16, 4, 80, 16, BF16)),
    "prefix_tails_fp16_d112_g2_bs32": ("prefix_tails", Case("", 8, 4, 112, 32, FP16)),
    "mixed_small_bf16_d96_mqa_bs16": ("mixed_small", Case("", 8, 1, 96, 16, BF16, max_query_len=130)),
    "prefix_tails_bf16_d192_g4_bs64": ("prefix_tails", Case("", 16, 4, 192, 64, BF16)),
    "mixed_small_bf16_bs32": ("mixed_small", Case("", 16, 4, 128, 32, BF16, max_query_len=130)),
    # a prefill bucket of short sequences only: the Gluon launch skips them all, the Triton one serves them
    "mixed_256_bf16": ("mixed_256", Case("", 32, 8, 128, 16, BF16, max_query_len=130)),
}


@pytest.fixture
def gluon_calls(monkeypatch):
    """Counts the steps the Gluon kernel served."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    calls = []
    launch = gp.prefill_attention

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return launch(*args, **kwargs)

    monkeypatch.setattr(gp, "prefill_attention", counted)
    return calls


def check_poisoned_step(case: Case, seed: int) -> None:
    """One step of ``paged_attention`` over a NaN-poisoned cache into a NaN-filled output, against
    the reference."""
    b = case.make("cuda", seed=seed, batches=BATCHES)
    sk_mod.store_kv_reference(b.k, b.v, b.kv_cache, b.meta.slot_mapping, b.k_scale, b.v_scale)
    ref = reference_chunked(b, **case.features())
    b = dataclasses.replace(b, kv_cache=nan_poisoned(b.kv_cache))
    out = torch.full_like(b.q, float("nan"))
    _attention(b, case, pa_mod.paged_attention, out)
    torch.cuda.synchronize()
    n = b.num_real_tokens
    assert not out.isnan().any(), "every row must be written, and no poisoned slot may reach a sum"
    assert rel_error(out[:n], ref[:n]) <= TOLERANCE[case.dtype]
    assert torch.all(out[n:] == 0), "padding tokens must produce zeros"


@gpu
@needs_sm90
@pytest.mark.parametrize("name", list(CASES))
def test_gpu_gluon_prefill(gluon_calls, name):
    batch_name, case = CASES[name]
    check_poisoned_step(dataclasses.replace(case, batch=batch_name), seed=len(name))
    assert len(gluon_calls) == 1, "the Gluon kernel must serve this step"


# Steps whose K/V the Gluon kernel stores in part itself (fuses_store: tiles of up to 128 columns):
# heads that fill their tiles and padded ones (whose copies carry the next head's columns, or reach
# past the last head's), pages of 16 to 256, sequences ending inside a chunk; sequences with a
# cached prefix and short ones (which store_kv stores) beside them.
FUSED_STORE_CASES = [
    "prefill_bf16_d128_g4_bs16", "varlen_fp16_d128_g1_bs32", "varlen_bf16_d64_g8_bs64", "varlen_bf16_d128_mqa_bs256",
    "prefix_tails_fp16_d64_g4_bs128", "prefix_tails_bf16_d128_g2_bs16", "chunked_32k_bf16", "mixed_small_bf16_bs32",
    "varlen_bf16_d80_g4_bs16", "prefix_tails_fp16_d112_g2_bs32", "mixed_small_bf16_d96_mqa_bs16",
]


@gpu
@needs_sm90
@pytest.mark.parametrize("name", FUSED_STORE_CASES)
def test_gpu_gluon_prefill_stores_the_step(gluon_calls, monkeypatch, name):
    """The ``triton`` backend's step, store and attention, with the Gluon kernel storing the whole
    chunks of new tokens of sequences without a cached prefix: the cache ends bit for bit as the
    reference store leaves it (the new tokens' slots NaN before, unused slots untouched) and the
    output matches the reference."""
    from compiled_attn.backends.triton import TritonBackend

    monkeypatch.setattr(gp, "FUSE_STORE", True)  # whatever the environment said
    batch_name, case = CASES[name]
    case = dataclasses.replace(case, batch=batch_name)
    b = case.make("cuda", seed=len(name), batches=BATCHES)
    stored = b.kv_cache.clone()
    sk_mod.store_kv_reference(b.k, b.v, stored, b.meta.slot_mapping, b.k_scale, b.v_scale)
    ref = reference_chunked(dataclasses.replace(b, kv_cache=stored), **case.features())
    cache = nan_poisoned(b.kv_cache)
    slots = b.meta.slot_mapping[b.meta.slot_mapping >= 0]
    cache.view(2, -1, *cache.shape[3:])[:, slots] = float("nan")
    expected = cache.clone()
    sk_mod.store_kv_reference(b.k, b.v, expected, b.meta.slot_mapping, b.k_scale, b.v_scale)
    out = torch.full_like(b.q, float("nan"))
    assert pa_mod.fused_store_plan(b.q, b.k, b.v, cache, out, max_query_len=b.meta.max_query_len) is not None
    TritonBackend.forward(b.q, b.k, b.v, cache, b.meta, out, alibi_slopes=None, k_scale=b.k_scale, v_scale=b.v_scale,
                          **case.features())
    torch.cuda.synchronize()
    assert len(gluon_calls) == 1
    assert same_bits(cache, expected), "the cache must hold exactly the step's K/V at its slots, and nothing else"
    n = b.num_real_tokens
    assert not out.isnan().any()
    assert rel_error(out[:n], ref[:n]) <= TOLERANCE[case.dtype]


@gpu
@needs_sm90
@pytest.mark.parametrize("head_size", [128, 256])
@pytest.mark.parametrize("batch", [([2048] * 8, [2048] * 8), ([2048] * 4, [10240] * 4)], ids=["8x2048", "prefix"])
def test_gpu_gluon_matches_triton_at_benchmark_shapes(gluon_calls, monkeypatch, batch, head_size):
    b = make_paged(*batch, heads=32, kv_heads=8, head_size=head_size, block_size=16, dtype=BF16, device="cuda")
    sk_mod.store_kv_reference(b.k, b.v, b.kv_cache, b.meta.slot_mapping, b.k_scale, b.v_scale)
    case = Case("", 32, 8, head_size, 16, BF16)
    out = torch.full_like(b.q, float("nan"))
    _attention(b, case, pa_mod.paged_attention, out)
    monkeypatch.setattr(gp, "ENABLED", False)
    triton_out = torch.full_like(b.q, float("nan"))
    _attention(b, case, pa_mod.paged_attention, triton_out)
    torch.cuda.synchronize()
    assert len(gluon_calls) == 1
    n = b.num_real_tokens
    assert rel_error(out[:n], triton_out[:n]) <= TOLERANCE[BF16]
    ref = reference_chunked(b, **case.features())
    assert rel_error(out[:n], ref[:n]) <= TOLERANCE[BF16]


@gpu
@needs_sm90
@pytest.mark.parametrize("short", [0, 8, 64])
@pytest.mark.parametrize("batch", ["mixed_small", "prefix_tails", "chunked_32k"])
def test_gpu_gluon_leaves_short_sequences_to_triton(gluon_calls, monkeypatch, batch, short):
    """Sequences of at most ``SHORT_QUERY_LEN`` new tokens (decodes, speculative tokens, short
    chunks) take the Triton kernel in launches of their own (up to 8 new tokens, and above), the rest
    the Gluon one (0: Gluon takes all); every row is written once and right, whatever the bound."""
    monkeypatch.setattr(gp, "SHORT_QUERY_LEN", short)
    short_launches = []
    plan = pa_mod._launch_plan

    def spied(*args, **kwargs):
        short_launches.append(kwargs.get("short_range"))
        return plan(*args, **kwargs)

    monkeypatch.setattr(pa_mod, "_launch_plan", spied)
    check_poisoned_step(Case(batch, 32, 8, 128, 16, BF16, max_query_len=max(BATCHES[batch][0])), seed=short)
    assert len(gluon_calls) == 1
    assert short_launches == {0: [], 8: [(0, 8)], 64: [(0, 8), (8, 64)]}[short]


@gpu
@needs_sm90
def test_gpu_gluon_prefill_compiled_and_graphed(gluon_calls):
    """The triton_op path under torch.compile(fullgraph=True) reaches the kernel through an opaque op,
    and a captured CUDA graph replays it."""
    case = Case("", 32, 8, 128, 16, BF16)
    b = make_paged(*BATCHES["prefix_tails"], heads=32, kv_heads=8, head_size=128, block_size=16, dtype=BF16,
                   device="cuda")
    sk_mod.store_kv_reference(b.k, b.v, b.kv_cache, b.meta.slot_mapping, b.k_scale, b.v_scale)
    m = b.meta
    scale = case.features()["scale"]

    def step(q, kv_cache, query_start_loc, seq_lens, block_table, k_scale, v_scale):
        out = torch.empty_like(q)
        torch.ops.compiled_attn.triton_paged_attention(q, kv_cache, query_start_loc, seq_lens, block_table, out,
                                                       k_scale, v_scale, None, scale, 0, 0.0, m.max_query_len, 0)
        return out

    args = (b.q, b.kv_cache, m.query_start_loc, m.seq_lens, m.block_table, b.k_scale, b.v_scale)
    expected = step(*args)
    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True)(*args)
    n = b.num_real_tokens
    assert torch.equal(got[:n], expected[:n])

    out = torch.full_like(b.q, float("nan"))
    fwd = lambda: pa_mod.paged_attention(b.q, b.kv_cache, m.query_start_loc, m.seq_lens, m.block_table, out,
                                         max_query_len=m.max_query_len, scale=scale, k_scale=b.k_scale,
                                         v_scale=b.v_scale)
    fwd()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fwd()
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out[:n], expected[:n])
    assert len(gluon_calls) >= 4  # eager, compiled, warm-up, capture


@gpu
@needs_sm90
def test_gpu_gluon_takes_only_what_it_supports():
    q = torch.empty(256, 32, 128, device="cuda", dtype=BF16)
    cache = torch.empty(2, 64, 16, 8, 128, device="cuda", dtype=BF16)
    static = dict(sliding_window=None, logits_soft_cap=None, alibi_slopes=None, num_splits=None, max_query_len=256,
                  split_max_query_len=pa_mod.SPLIT_MAX_QUERY_LEN)
    assert gp.supported(q, cache, q, **static)
    refused = {
        "decode bucket": dict(static, max_query_len=1),
        "short sequences only": dict(static, max_query_len=gp.SHORT_QUERY_LEN),
        "window": dict(static, sliding_window=64),
        "soft-cap": dict(static, logits_soft_cap=30.0),
        "alibi": dict(static, alibi_slopes=torch.ones(32, device="cuda")),
    }
    for what, kwargs in refused.items():
        assert not gp.supported(q, cache, q, **kwargs), what
    assert not gp.supported(q, cache.to(torch.float8_e4m3fn), q, **static), "fp8 cache"
    assert not gp.supported(q.float(), cache.float(), q.float(), **static), "fp32"
    q96, cache96 = q[..., :96].contiguous(), cache[..., :96].contiguous()
    assert gp.supported(q96, cache96, q96, **static), "head 96, in 128-column tiles"
    q48, cache48 = q[..., :48].contiguous(), cache[..., :48].contiguous()
    assert not gp.supported(q48, cache48, q48, **static), "head 48"
    head_major = cache.transpose(2, 3).contiguous().transpose(2, 3)
    assert not gp.supported(q, head_major, q, **static), "head-major pages"


def test_gluon_prefill_never_on_cpu_or_under_the_interpreter(monkeypatch):
    q = torch.empty(256, 32, 128, dtype=BF16)
    cache = torch.empty(2, 64, 16, 8, 128, dtype=BF16)
    args = (q, cache, q, 256, None, None, None, None)
    assert not pa_mod._takes_gluon_prefill(*args)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not pa_mod._takes_gluon_prefill(*args)


def test_gluon_prefill_switched_off_by_the_environment():
    import subprocess
    import sys

    code = "import compiled_attn.kernels.gluon_prefill as gp; print(gp.ENABLED)"
    for value, expected in (("0", "False"), ("off", "False"), ("1", "True")):
        env = dict(os.environ, COMPILED_ATTN_GLUON_PREFILL=value)
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert done.stdout.strip() == expected, (value, done.stdout, done.stderr)


def test_fused_store_on_by_default_and_switched_off_by_the_environment():
    import subprocess
    import sys

    code = "import compiled_attn.kernels.gluon_prefill as gp; print(gp.FUSE_STORE)"
    for value, expected in ((None, "True"), ("0", "False"), ("off", "False"), ("1", "True")):
        env = {k: v for k, v in os.environ.items() if k != "COMPILED_ATTN_FUSE_PREFILL_STORE"}
        if value is not None:
            env["COMPILED_ATTN_FUSE_PREFILL_STORE"] = value
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert done.stdout.strip() == expected, (value, done.stdout, done.stderr)


@pytest.mark.parametrize("head_size,fused", [(64, True), (80, True), (112, True), (128, True), (192, False),
                                             (256, False)])
def test_fused_store_for_tiles_of_up_to_128_columns(monkeypatch, head_size, fused):
    """Tiles of 256 columns (heads 192 and 256) keep store_kv first: the fused store was slower there."""
    monkeypatch.setattr(gp, "FUSE_STORE", True)
    cache = torch.empty(2, 4, 16, 2, head_size, dtype=BF16)
    k = torch.empty(8, 2, head_size, dtype=BF16)
    assert gp.fuses_store(k, k, cache) is fused
    assert not gp.fuses_store(k.half(), k.half(), cache), "k/v of another dtype than the cache's"


def test_new_kv_refused_where_no_fused_store_runs(monkeypatch):
    """``paged_attention(new_kv=...)`` promises that store_kv skipped the kernel's share: where the
    Gluon kernel does not store it (here: no sm_90 GPU), the call is refused rather than leaving
    new tokens unstored."""
    monkeypatch.setattr(gp, "FUSE_STORE", True)
    b = make_paged([20], [20], heads=4, kv_heads=2, head_size=64, block_size=16, dtype=torch.float16)
    assert pa_mod.fused_store_plan(b.q, b.k, b.v, b.kv_cache, b.q, max_query_len=20) is None
    with pytest.raises(ValueError, match="new_kv"):
        pa_mod.paged_attention(b.q, b.kv_cache, b.meta.query_start_loc, b.meta.seq_lens, b.meta.block_table,
                               torch.empty_like(b.q), max_query_len=20, scale=0.125, k_scale=b.k_scale,
                               v_scale=b.v_scale, new_kv=(b.k, b.v))
