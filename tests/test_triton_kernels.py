"""The Triton kernels (compiled_attn.kernels) against their references and the reference backend.

CPU: every test runs the kernels under the Triton interpreter. The ``interpreter`` fixture sets
``TRITON_INTERPRET=1`` per test; the launchers read it at launch time and swap in interpreted
kernels, so it does not matter which test file imported Triton or the kernels first. Shapes are
tiny (the interpreter costs milliseconds per program and key tile).

GPU: ``python3 -m pytest tests/test_triton_kernels.py -m gpu`` runs the compiled kernels over a
grid of dtypes, head sizes, GQA ratios, block sizes, features and batches up to 256 sequences
and 32k context (skipped without CUDA).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

import compiled_attn as ca  # noqa: E402
from compiled_attn import AttentionMetadata, bench, ops  # noqa: E402
from compiled_attn.backends import BACKENDS, PRIORITY, select_backend  # noqa: E402
from compiled_attn.backends.reference import reference_attention  # noqa: E402
from compiled_attn.kernels import gluon_prefill as gp_mod  # noqa: E402
from compiled_attn.kernels import paged_attention as pa_mod  # noqa: E402
from compiled_attn.kernels import store_and_decode as sd_mod  # noqa: E402
from compiled_attn.kernels import store_kv as sk_mod  # noqa: E402
from batches import BATCH_SPECS, POISON, TOLERANCE, make_batch, rel_error  # noqa: E402

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@functools.lru_cache(maxsize=None)
def _interpreter_problem() -> str | None:
    """Why this Triton's interpreter cannot run our kernels (None if it can): triton 3.6's cannot
    take loop bounds loaded from memory (with numpy 2); 3.7's can."""
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    def probe(x_ptr):
        n = tl.load(x_ptr)
        for i in range(0, n):
            tl.store(x_ptr + 1 + i, i)

    x = torch.tensor([2, 0, 0], dtype=torch.int32)
    try:
        InterpretedFunction(probe)[(1,)](x)
    except Exception as e:  # noqa: BLE001 - any failure means "cannot test here"
        return f"triton {triton.__version__}'s interpreter cannot run these kernels ({type(e).__name__})"
    return None if x.tolist() == [2, 0, 1] else f"triton {triton.__version__}'s interpreter miscomputes a loop"


@pytest.fixture
def interpreter(monkeypatch):
    problem = _interpreter_problem()
    if problem:
        pytest.skip(problem)
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def compiled(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


# ---- random paged batches ---------------------------------------------------------------------

# (query_lens, seq_lens) — seq_len counts the cached context plus the new tokens.
BATCHES: dict[str, tuple[list[int], list[int]]] = {
    "decode": ([1, 1, 1], [5, 17, 40]),
    "prefill": ([12], [12]),
    "spec_decode": ([3, 2], [30, 11]),
    # prefix-prefill, decode, spec-decode, a prefill that fits one block
    "mixed": ([6, 1, 3, 4], [22, 37, 9, 4]),
}


@dataclasses.dataclass
class Paged:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    kv_cache: torch.Tensor
    meta: AttentionMetadata
    used_blocks: torch.Tensor  # bool [num_blocks]
    num_real_tokens: int
    k_scale: torch.Tensor
    v_scale: torch.Tensor
    alibi_slopes: torch.Tensor | None


def make_paged(
    query_lens, seq_lens, *, heads, kv_heads, head_size, block_size, dtype, fp8=False, alibi=False,
    pad_tokens=2, pad_seqs=1, max_query_len=None, device="cpu", seed=0,
) -> Paged:
    """Random q/k/v and a paged cache (permuted blocks); unused blocks, block-table padding (a trap
    block) and cache slots past each sequence's end hold POISON; the new tokens' slots hold noise."""
    g = torch.Generator().manual_seed(seed)
    cache_dtype = torch.float8_e4m3fn if fp8 else dtype
    needed = [math.ceil(n / block_size) for n in seq_lens]
    num_blocks = sum(needed) + 3
    order = torch.randperm(num_blocks, generator=g).tolist()
    trap = order.pop()  # block-table padding points here: reading it would show
    tables, used = [], torch.zeros(num_blocks, dtype=torch.bool)
    for n in needed:
        tables.append(order[:n])
        used[order[:n]] = True
        order = order[n:]
    k_scale, v_scale = (0.5, 2.0) if fp8 else (1.0, 1.0)
    cache = torch.full((2, num_blocks, block_size, kv_heads, head_size), POISON)
    for blocks, n, q_len in zip(tables, seq_lens, query_lens):
        dense = torch.randn(2, len(blocks) * block_size, kv_heads, head_size, generator=g)
        dense[0] /= k_scale
        dense[1] /= v_scale
        dense[:, n:] = POISON
        cache[:, blocks] = dense.view(2, len(blocks), block_size, kv_heads, head_size)
    total = sum(query_lens)
    num_tokens = total + pad_tokens
    meta = AttentionMetadata.build(
        query_lens, seq_lens, tables, block_size, num_tokens=num_tokens, num_seqs=len(seq_lens) + pad_seqs,
        max_query_len=max_query_len, num_blocks=num_blocks)
    table = meta.block_table.clone()
    for s, blocks in enumerate(tables):
        table[s, len(blocks):] = trap
    table[len(tables):] = trap
    meta = dataclasses.replace(meta, block_table=table).to(device)
    q = torch.randn(num_tokens, heads, head_size, generator=g)
    k = torch.randn(num_tokens, kv_heads, head_size, generator=g)
    v = torch.randn(num_tokens, kv_heads, head_size, generator=g)
    slopes = None
    if alibi:
        slopes = torch.tensor([2.0 ** (-8 * (h + 1) / heads) for h in range(heads)], device=device)
    return Paged(
        q=q.to(dtype).to(device), k=k.to(dtype).to(device), v=v.to(dtype).to(device),
        kv_cache=cache.to(cache_dtype).to(device), meta=meta, used_blocks=used.to(device), num_real_tokens=total,
        k_scale=torch.tensor(k_scale, device=device), v_scale=torch.tensor(v_scale, device=device),
        alibi_slopes=slopes,
    )


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def fp8_ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in e4m3 steps (same sign: the bit patterns are monotonic in magnitude)."""
    ai, bi = a.view(torch.uint8).int(), b.view(torch.uint8).int()
    return int((ai - bi).abs().max()) if ai.numel() else 0


def assert_cache_matches(cache, ref_cache, used_blocks, before):
    if cache.dtype == torch.float8_e4m3fn:
        # The GPU's fp32 -> fp8 conversion may round a value differently from torch: 1 step.
        assert fp8_ulps(cache, ref_cache) <= 1, "fp8 cache must match the reference within 1 ulp"
    else:
        assert same_bits(cache, ref_cache), "cache must equal the reference bit for bit"
    assert same_bits(cache[:, ~used_blocks], before[:, ~used_blocks]), "unused blocks must stay untouched"


# ---- store_kv -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,fp8", [(torch.float32, False), (torch.float16, False), (torch.float16, True)])
def test_store_kv_matches_reference(interpreter, dtype, fp8):
    b = make_paged(*BATCHES["mixed"], heads=4, kv_heads=2, head_size=80, block_size=16, dtype=dtype, fp8=fp8)
    ref = b.kv_cache.clone()
    sk_mod.store_kv_reference(b.k, b.v, ref, b.meta.slot_mapping, b.k_scale, b.v_scale)
    cache = b.kv_cache.clone()
    sk_mod.store_kv(b.k, b.v, cache, b.meta.slot_mapping, b.k_scale, b.v_scale)
    assert same_bits(cache, ref)  # the interpreter path rounds fp8 exactly like torch
    assert same_bits(cache[:, ~b.used_blocks], b.kv_cache[:, ~b.used_blocks])


def fused_store_tokens(meta, chunk: int, short_query_len: int) -> torch.Tensor:
    """Which tokens the Gluon prefill kernel stores itself (``gluon_prefill.fuses_store``), from
    the rule: a sequence of over ``short_query_len`` new tokens and no cached prefix, a
    ``chunk``-aligned run of keys all in the sequence."""
    starts, lens = meta.query_start_loc.tolist(), meta.seq_lens.tolist()
    fused = torch.zeros(meta.slot_mapping.shape[0], dtype=torch.bool)
    for s, seq_len in enumerate(lens):
        q_len, prefix = starts[s + 1] - starts[s], seq_len - (starts[s + 1] - starts[s])
        for i in range(q_len):
            first = (prefix + i) // chunk * chunk
            fused[starts[s] + i] = q_len > short_query_len and prefix == 0 and first + chunk <= seq_len
    return fused


@pytest.mark.parametrize("chunk", [4, 8])
def test_store_kv_skips_the_tokens_the_prefill_kernel_stores(interpreter, chunk):
    # Sequences with and without a cached prefix, ending inside a chunk and on its edge, a short
    # sequence, padding.
    b = make_paged([9, 16, 2, 13, 6], [14, 16, 30, 13, 10], heads=4, kv_heads=2, head_size=64, block_size=8,
                   dtype=torch.float16)
    fused = fused_store_tokens(b.meta, chunk, short_query_len=2)
    assert fused.any() and not fused.all()
    ref = b.kv_cache.clone()
    sk_mod.store_kv_reference(b.k, b.v, ref, b.meta.slot_mapping.masked_fill(fused, -1), b.k_scale, b.v_scale)
    cache = b.kv_cache.clone()
    sk_mod.store_kv(b.k, b.v, cache, b.meta.slot_mapping, b.k_scale, b.v_scale,
                    skip_fused=(b.meta.query_start_loc, b.meta.seq_lens, chunk, 2))
    assert same_bits(cache, ref)


def test_fp8_rounding_matches_torch(interpreter):
    # Ties, carries into the exponent, subnormals, saturation and signed zeros.
    grid = torch.tensor([2.0 ** e * (1 + m / 16) for e in range(-12, 9) for m in range(16)])
    values = torch.cat([grid, -grid, torch.tensor([0.0, -0.0, 500.0, -1e4, 7.6, 2.0 ** -10, 3 * 2.0 ** -11])])
    values = torch.cat([values, torch.randn(4096 - values.numel()) * 20]).view(8, 4, 128)
    cache = torch.zeros(2, 1, 8, 4, 128, dtype=torch.float8_e4m3fn)
    ref = cache.clone()
    slots = torch.arange(8)
    one = torch.tensor(1.0)
    sk_mod.store_kv(values, values, cache, slots, one, one)
    sk_mod.store_kv_reference(values, values, ref, slots, one, one)
    assert same_bits(cache, ref)


# ---- unified paged attention -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    batch: str
    heads: int = 4
    kv_heads: int = 1
    head_size: int = 64
    block_size: int = 16
    dtype: torch.dtype = torch.float16
    fp8: bool = False
    window: int | None = None
    alibi: bool = False
    soft_cap: float | None = None
    max_query_len: int | None = None  # None: the padded token count (metadata's safe default)
    num_splits: int | None = None
    tile_n: int | None = None

    def make(self, device="cpu", seed=0, batches=BATCHES) -> Paged:
        return make_paged(
            *batches[self.batch], heads=self.heads, kv_heads=self.kv_heads, head_size=self.head_size,
            block_size=self.block_size, dtype=self.dtype, fp8=self.fp8, alibi=self.alibi,
            max_query_len=self.max_query_len, device=device, seed=seed)

    def features(self) -> dict:
        return dict(scale=self.head_size ** -0.5, sliding_window=self.window, logits_soft_cap=self.soft_cap)


ATTENTION_CASES = {
    "decode_mha_d64_fp16": Case("decode", kv_heads=4, max_query_len=1),
    "decode_gqa4_d80_bs32_fp32": Case("decode", head_size=80, block_size=32, dtype=torch.float32, max_query_len=1),
    "decode_split3_gqa4_d96": Case("decode", head_size=96, max_query_len=1, num_splits=3, tile_n=16),
    "decode_split2_window": Case("decode", kv_heads=2, max_query_len=1, num_splits=2, window=9, tile_n=16),
    # More splits than tiles (empty splits) and than one merge chunk (a partly masked second chunk).
    "decode_split7_gqa4_fp32": Case("decode", dtype=torch.float32, max_query_len=1, num_splits=7, tile_n=16),
    "prefill_gqa2_fp32": Case("prefill", kv_heads=2, dtype=torch.float32, tile_n=16),
    "spec_decode_split2_gqa4": Case("spec_decode", max_query_len=3, num_splits=2),
    "mixed_mha_d64": Case("mixed", kv_heads=4),
    "mixed_gqa4_d80_fp32": Case("mixed", head_size=80, dtype=torch.float32, tile_n=16),
    "mixed_gqa4_bs32_window": Case("mixed", block_size=32, window=5),
    "mixed_alibi_fp32": Case("mixed", kv_heads=2, dtype=torch.float32, alibi=True),
    "mixed_soft_cap": Case("mixed", kv_heads=2, soft_cap=2.0),
    "mixed_fp8_fp16": Case("mixed", kv_heads=2, fp8=True),
    "mixed_fp8_fp32": Case("mixed", dtype=torch.float32, fp8=True),
    "mixed_everything_d96": Case("mixed", head_size=96, window=7, alibi=True, soft_cap=3.0, fp8=True, tile_n=16),
    "mixed_gqa3_d112": Case("mixed", heads=6, kv_heads=2, head_size=112),  # a group that is not a power of 2
    "spec_decode_gqa3_bs32": Case("spec_decode", heads=6, kv_heads=2, block_size=32, max_query_len=3),
}


def _attention(b: Paged, case: Case, fn, out):
    m = b.meta
    return fn(b.q, b.kv_cache, m.query_start_loc, m.seq_lens, m.block_table, out, max_query_len=m.max_query_len,
              alibi_slopes=b.alibi_slopes, k_scale=b.k_scale, v_scale=b.v_scale, num_splits=case.num_splits,
              tile_n=case.tile_n, **case.features())


def nan_poisoned(cache: torch.Tensor) -> torch.Tensor:
    """A copy of a test cache whose POISON slots (unused blocks, the trap block, slots past each
    sequence) hold NaN: a kernel that lets one of them into a score or a sum shows it, even where
    a finite poison would be multiplied by a zero probability. (The reference reads the padded
    table whole, so it keeps the finite poison.)"""
    c = cache.to(torch.float32, copy=True)  # never the caller's fp32 cache itself
    c[c == POISON] = float("nan")
    return c.to(cache.dtype)


def check_attention_case(case: Case, device="cpu", seed=0, batches=BATCHES, nan_poison=False):
    b = case.make(device, seed, batches)
    # Attention reads the cache after the store; store with the reference so this tests attention alone.
    sk_mod.store_kv_reference(b.k, b.v, b.kv_cache, b.meta.slot_mapping, b.k_scale, b.v_scale)
    ref = _attention(b, case, pa_mod.paged_attention_reference, None)
    if nan_poison:
        b = dataclasses.replace(b, kv_cache=nan_poisoned(b.kv_cache))
    before = b.kv_cache.clone()
    out = torch.full_like(b.q, float("nan"))
    _attention(b, case, pa_mod.paged_attention, out)
    n = b.num_real_tokens
    assert not out.isnan().any(), "every row of out must be written"
    assert rel_error(out[:n], ref[:n]) <= TOLERANCE[case.dtype]
    assert torch.all(out[n:] == 0), "padding tokens must produce zeros"
    assert same_bits(b.kv_cache, before), "attention must not write the cache"


@pytest.mark.parametrize("name", list(ATTENTION_CASES))
def test_paged_attention(interpreter, name):
    check_attention_case(ATTENTION_CASES[name])


@pytest.mark.parametrize("short_range", [(0, 3), (1, 4), (0, 1)])
@pytest.mark.parametrize("name", ["mixed_mha_d64", "mixed_fp8_fp16"])
def test_paged_attention_short_sequences_only(interpreter, name, short_range):
    """``SHORT_MIN``/``SHORT_MAX``, the launches that follow the Gluon prefill kernel on sm_90: one
    writes the rows of the sequences of ``SHORT_MIN < q_len <= SHORT_MAX`` new tokens (of 6, 1, 3, 4
    here) and nothing else, neither the other sequences' rows nor the padding's, from a grid of
    ``cdiv(SHORT_MAX, BLOCK_Q)`` blocks a sequence."""
    case = ATTENTION_CASES[name]
    b = case.make("cpu", 0, BATCHES)
    sk_mod.store_kv_reference(b.k, b.v, b.kv_cache, b.meta.slot_mapping, b.k_scale, b.v_scale)
    ref = _attention(b, case, pa_mod.paged_attention_reference, None)
    m = b.meta
    out = torch.full_like(b.q, float("nan"))
    lo, hi = short_range
    attn, reduce = pa_mod._launch_plan(
        b.q, b.kv_cache, m.query_start_loc, m.seq_lens, m.block_table, out, max_query_len=hi, alibi_slopes=None,
        k_scale=b.k_scale, v_scale=b.v_scale, num_splits=None, tile_n=None, short_range=short_range,
        **case.features())
    grid, _, constexprs = attn
    assert reduce is None and (constexprs["SHORT_MIN"], constexprs["SHORT_MAX"]) == short_range
    assert grid[0] * grid[1] == m.num_seqs * -(-hi // constexprs["BLOCK_Q"]) * case.kv_heads
    with pa_mod._jit.launching(vars(pa_mod)):
        pa_mod.launch_planned(pa_mod._paged_attention_kernel, attn, reduce)
    starts = m.query_start_loc.tolist()
    served = torch.zeros(b.q.shape[0], dtype=torch.bool)
    for s in range(len(starts) - 1):
        served[starts[s]:starts[s + 1]] = lo < starts[s + 1] - starts[s] <= hi
    assert served.any()
    assert rel_error(out[served], ref[served]) <= TOLERANCE[case.dtype]
    assert out[~served].isnan().all(), "the other sequences' rows and the padding rows are other launches'"


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("name", ["decode_split3_gqa4_d96", "decode_split2_window", "decode_split7_gqa4_fp32",
                                  "spec_decode_split2_gqa4"])
def test_split_reduction_fused_and_launched(interpreter, monkeypatch, name, fused):
    """Splits merge in the last program (fused, the default) or in a second launch (the path
    torch.compile traces); both agree with the reference and leave the counters zeroed."""
    monkeypatch.setattr(pa_mod, "FUSED_SPLIT_REDUCE", fused)
    check_attention_case(ATTENTION_CASES[name])
    counters = pa_mod._SPLIT_COUNTERS.get(torch.device("cpu"))
    if fused:
        assert counters is not None and not counters.any(), "every launch must leave its counters at zero"


@pytest.mark.parametrize("seed", range(8))
def test_paged_attention_random_batches(interpreter, seed):
    g = torch.Generator().manual_seed(1000 + seed)
    pick = lambda options: options[int(torch.randint(len(options), (1,), generator=g))]
    num_seqs = pick([1, 2, 3, 5])
    query_lens = [pick([1, 1, 2, 4, 9]) for _ in range(num_seqs)]
    seq_lens = [q + pick([0, 3, 16, 40]) for q in query_lens]
    heads, kv_heads = pick([(4, 4), (4, 1), (6, 3), (8, 2)])
    case = Case(
        "random", heads=heads, kv_heads=kv_heads, head_size=pick([64, 80, 96, 128]), block_size=pick([16, 32]),
        dtype=pick([torch.float16, torch.float32]), fp8=pick([False, True]), window=pick([None, 4, 20]),
        alibi=pick([False, True]), soft_cap=pick([None, 5.0]), max_query_len=pick([None, max(query_lens)]),
        num_splits=pick([None, 1, 2, 3]), tile_n=pick([None, 16]))
    check_attention_case(case, seed=seed, batches={"random": (query_lens, seq_lens)})


def test_interpreter_after_compiled_import(interpreter):
    # A fresh process: the kernels (and triton.language) are imported in compiled mode, the
    # variable is set afterwards, and the first launch is a kernel whose helpers live in another
    # module (store_and_decode -> paged_attention._attend_tile -> _tanh).
    code = (
        "import os, torch\n"
        "os.environ.pop('TRITON_INTERPRET', None)\n"
        "from compiled_attn.kernels import store_and_decode as sd\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "torch.manual_seed(0)\n"
        "q, k, v = torch.randn(1, 2, 64), torch.randn(1, 1, 64), torch.randn(1, 1, 64)\n"
        "cache = torch.randn(2, 2, 16, 1, 64)\n"
        "lens, table, slots = torch.tensor([20], dtype=torch.int32), torch.tensor([[1, 0]], dtype=torch.int32), "
        "torch.tensor([3])\n"
        "kw = dict(scale=0.125, logits_soft_cap=2.0, k_scale=torch.tensor(1.0), v_scale=torch.tensor(1.0))\n"
        "out = sd.store_and_decode(q, k, v, cache.clone(), lens, table, slots, torch.empty_like(q), **kw)\n"
        "ref = sd.store_and_decode_reference(q, k, v, cache.clone(), lens, table, slots, **kw)\n"
        "print(float((out - ref).abs().max()))\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(result.stdout.strip()) < 1e-5


def test_interpreter_swaps_kernels_in(interpreter):
    from triton.runtime.interpreter import InterpretedFunction

    check_attention_case(ATTENTION_CASES["decode_mha_d64_fp16"])
    assert isinstance(pa_mod._paged_attention_kernel, InterpretedFunction)
    assert isinstance(pa_mod._attend_tile, InterpretedFunction)


# ---- store_and_decode ---------------------------------------------------------------------------

DECODE_BATCH = ([1, 1, 1, 1], [1, 20, 41, 16])


def check_store_and_decode(case: Case, device="cpu", seed=0, batch=DECODE_BATCH, drop_slot=False,
                           nan_poison=False):
    q_lens, s_lens = batch
    b = make_paged(q_lens, s_lens, heads=case.heads, kv_heads=case.kv_heads, head_size=case.head_size,
                   block_size=case.block_size, dtype=case.dtype, fp8=case.fp8, alibi=case.alibi, pad_tokens=1,
                   pad_seqs=1, max_query_len=1, device=device, seed=seed)
    m = b.meta
    slots = m.slot_mapping.clone()
    if drop_slot:
        # Store nothing for sequence 1; its attention still uses its new key (from registers).
        slots[1] = -1
    before = b.kv_cache.clone()
    args = (b.q, b.k, b.v)
    kw = dict(alibi_slopes=b.alibi_slopes, k_scale=b.k_scale, v_scale=b.v_scale, **case.features())
    out = torch.full_like(b.q, float("nan"))
    cache = nan_poisoned(b.kv_cache) if nan_poison else b.kv_cache.clone()
    sd_mod.store_and_decode(*args, cache, m.seq_lens, m.block_table, slots, out, num_splits=case.num_splits,
                            tile_n=case.tile_n, **kw)
    if nan_poison:  # back to the finite poison the reference's cache holds
        cache = torch.where(cache.float().isnan(), POISON, cache.float()).to(cache.dtype)
    ref_cache = b.kv_cache.clone()
    ref = sd_mod.store_and_decode_reference(*args, ref_cache, m.seq_lens, m.block_table, m.slot_mapping, **kw)
    if drop_slot:
        ref_cache.view(2, -1, *ref_cache.shape[3:])[:, int(m.slot_mapping[1])] = \
            before.view(2, -1, *before.shape[3:])[:, int(m.slot_mapping[1])]
    n = b.num_real_tokens
    assert not out.isnan().any()
    assert rel_error(out[:n], ref[:n]) <= TOLERANCE[case.dtype]
    assert torch.all(out[n:] == 0), "padding sequences must produce zeros"
    assert_cache_matches(cache, ref_cache, b.used_blocks, before)


DECODE_CASES = {
    "mha_d64_fp16": Case("decode", kv_heads=4),
    "gqa4_d80_bs32_fp32_split3": Case("decode", head_size=80, block_size=32, dtype=torch.float32, num_splits=3,
                                      tile_n=16),
    "gqa2_window_split2": Case("decode", kv_heads=2, window=6, num_splits=2, tile_n=16),
    "gqa4_split7_fp32": Case("decode", dtype=torch.float32, num_splits=7, tile_n=16),
    "gqa4_alibi_soft_cap": Case("decode", alibi=True, soft_cap=2.5),
    "gqa2_fp8_d96_split2": Case("decode", kv_heads=2, head_size=96, fp8=True, num_splits=2),
    "gqa3_d64_fp32": Case("decode", heads=6, kv_heads=2, dtype=torch.float32),
}


@pytest.mark.parametrize("name", list(DECODE_CASES))
def test_store_and_decode(interpreter, name):
    check_store_and_decode(DECODE_CASES[name])


def test_split_counters_grow_without_freeing(monkeypatch):
    """A graph captured with the old buffer keeps using it: growing must not free it."""
    monkeypatch.setattr(pa_mod, "_SPLIT_COUNTERS", {})
    monkeypatch.setattr(pa_mod, "_RETIRED_SPLIT_COUNTERS", [])
    q = torch.zeros(1, 1, 1)
    small = pa_mod.split_counters(q, 10, num_splits=2)
    assert small is not None and small.numel() >= 10 and not small.any()
    assert pa_mod.split_counters(q, 10, num_splits=2) is small
    big = pa_mod.split_counters(q, small.numel() + 1, num_splits=2)
    assert big.numel() > small.numel() and pa_mod._RETIRED_SPLIT_COUNTERS == [small]
    assert pa_mod.split_counters(q, 10, num_splits=1) is None, "one split needs no merge"
    for kernel in ("paged_attention", "store_and_decode"):
        assert pa_mod.split_counters(q, 10, pa_mod.fused_max_splits(kernel) + 1, kernel) is None
        assert pa_mod.split_counters(q, 10, pa_mod.fused_max_splits(kernel), kernel) is big
    assert pa_mod.split_counters(q, 10, 8, "store_and_decode", block_m=32) is big
    assert pa_mod.split_counters(q, 10, 16, "store_and_decode", block_m=32) is None, \
        "one program would merge 16 splits of 32 rows: the reduction launch does"


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("name", ["gqa4_d80_bs32_fp32_split3", "gqa4_split7_fp32"])
def test_store_and_decode_split_reduction_fused_and_launched(interpreter, monkeypatch, name, fused):
    monkeypatch.setattr(pa_mod, "FUSED_SPLIT_REDUCE", fused)
    check_store_and_decode(DECODE_CASES[name])
    if fused:
        assert not pa_mod._SPLIT_COUNTERS[torch.device("cpu")].any()


@pytest.mark.parametrize("num_splits,fused", [(8, True), (16, False)])
def test_store_and_decode_many_rows_merged_by_the_reduction_launch(interpreter, monkeypatch, num_splits, fused):
    """32 query heads on one KV head (tiles of 32 rows): 8 splits are 256 partial rows for the last
    split to merge itself; 16 splits are more, and the reduction launch merges them."""
    monkeypatch.setattr(pa_mod, "FUSED_MAX_SPLITS", 16)
    plans = []
    real_plan = sd_mod._launch_plan
    monkeypatch.setattr(sd_mod, "_launch_plan", lambda *a, **k: plans.append(real_plan(*a, **k)) or plans[-1])
    check_store_and_decode(Case("", heads=32, kv_heads=1, head_size=64, dtype=torch.float32, num_splits=num_splits),
                           batch=([1, 1], [40, 300]))
    attn, reduce = plans[-1]
    assert attn[2]["FUSED_REDUCE"] is fused and (reduce is None) is fused


@pytest.mark.parametrize("seed", range(4))
def test_store_and_decode_random_batches(interpreter, seed):
    g = torch.Generator().manual_seed(2000 + seed)
    pick = lambda options: options[int(torch.randint(len(options), (1,), generator=g))]
    seq_lens = [pick([1, 2, 15, 16, 17, 33, 64]) for _ in range(pick([1, 2, 4]))]
    heads, kv_heads = pick([(4, 4), (4, 1), (6, 3), (8, 2)])
    case = Case(
        "", heads=heads, kv_heads=kv_heads, head_size=pick([64, 80, 96, 128]), block_size=pick([16, 32]),
        dtype=pick([torch.float16, torch.float32]), fp8=pick([False, True]), window=pick([None, 4, 20]),
        alibi=pick([False, True]), soft_cap=pick([None, 5.0]), num_splits=pick([None, 1, 2, 3]),
        tile_n=pick([None, 16]))
    check_store_and_decode(case, seed=seed, batch=([1] * len(seq_lens), seq_lens))


def test_store_and_decode_skips_unslotted_tokens(interpreter):
    check_store_and_decode(Case("decode", kv_heads=2, dtype=torch.float32), drop_slot=True)


# ---- the backend, through the public op -------------------------------------------------------

BACKEND_LAYERS = {
    "gqa2_d64": ca.AttentionSpec(num_heads=4, num_kv_heads=2, head_size=64),
    "mqa_d80_window_alibi": ca.AttentionSpec(num_heads=4, num_kv_heads=1, head_size=80, sliding_window=6,
                                             alibi_slopes=[0.5, 0.25, 0.125, 0.0625]),
    "fp8_soft_cap": ca.AttentionSpec(num_heads=4, num_kv_heads=2, head_size=64, logits_soft_cap=3.0,
                                     kv_cache_dtype="fp8_e4m3"),
}


def run_op(backend: str, b, spec, k_scale, v_scale):
    attn = ca.Attention(spec, backend=backend, device=b.q.device)
    attn.k_scale.fill_(k_scale)
    attn.v_scale.fill_(v_scale)
    cache = b.kv_cache.clone()
    out = torch.full_like(b.q, float("nan"))
    ops.attention(b.q, b.k, b.v, cache, b.meta, out, backend=backend, scale=spec.softmax_scale,
                  sliding_window=spec.sliding_window, logits_soft_cap=spec.logits_soft_cap,
                  alibi_slopes=attn.alibi_slopes, k_scale=attn.k_scale, v_scale=attn.v_scale)
    return out, cache


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("layer", list(BACKEND_LAYERS))
def test_backend_matches_reference(interpreter, layer, dtype):
    spec = BACKEND_LAYERS[layer]
    scales = (0.5, 2.0) if spec.is_fp8 else (1.0, 1.0)
    b = make_batch("mixed", spec, dtype=dtype, seed=len(layer), k_scale=scales[0], v_scale=scales[1])
    ref_out, ref_cache = run_op("reference", b, spec, *scales)
    out, cache = run_op("triton", b, spec, *scales)
    n = b.num_real_tokens
    assert not out.isnan().any()
    assert rel_error(out[:n], ref_out[:n]) <= TOLERANCE[dtype]
    assert torch.all(out[n:] == 0)
    assert_cache_matches(cache, ref_cache, b.used_blocks, b.kv_cache)


def test_backend_named_batches(interpreter):
    spec = ca.AttentionSpec(num_heads=4, num_kv_heads=1, head_size=64)
    for name in ("small_decode", "prefix_prefill", "chunked_prefill", "spec_decode"):
        b = make_batch(name, spec, dtype=torch.float16, seed=1)
        ref_out, ref_cache = run_op("reference", b, spec, 1.0, 1.0)
        out, cache = run_op("triton", b, spec, 1.0, 1.0)
        n = b.num_real_tokens
        assert rel_error(out[:n], ref_out[:n]) <= TOLERANCE[torch.float16], name
        assert torch.all(out[n:] == 0), name
        assert same_bits(cache, ref_cache), name


# ---- capabilities and errors -----------------------------------------------------------------


def test_supports_reasons(monkeypatch):
    triton_backend = BACKENDS["triton"]
    spec = ca.AttentionSpec(num_heads=8, num_kv_heads=2, head_size=128)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert triton_backend.supports(spec, device="cpu") == "needs CUDA (or TRITON_INTERPRET=1 for testing)"
    assert select_backend(spec, device="cpu").name != "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_backend.supports(spec, device="cpu") is None
    assert select_backend(spec, device="cpu").name != "triton", "never chosen by 'auto' on CPU"
    assert "head_size 72" in triton_backend.supports(ca.AttentionSpec(4, 2, 72), device="cpu")
    assert "block_size 48" in triton_backend.supports(spec, device="cpu", block_size=48)
    assert "block_size 8" in triton_backend.supports(spec, device="cpu", block_size=8)
    assert "bfloat16" in triton_backend.supports(spec, device="cpu", dtype=torch.bfloat16)
    assert "power of two" in triton_backend.call_reason(torch.empty(2, 1, 48, 2, 128), sliding_window=None,
                                                        logits_soft_cap=None, alibi_slopes=None)
    assert PRIORITY["cuda"][:2] == ("trtllm", "triton") and "triton" not in PRIORITY["cpu"]


def test_import_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import compiled_attn as ca\n"
        "from compiled_attn.backends import BACKENDS\n"
        "print(BACKENDS['triton'].supports(ca.AttentionSpec(8, 2, 128), device='cuda'))\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "package 'triton' is not installed"


def test_unsupported_inputs_raise_clear_errors(interpreter, monkeypatch):
    b = make_paged(*BATCHES["decode"], heads=4, kv_heads=1, head_size=64, block_size=16, dtype=torch.float16)
    m = b.meta
    one = torch.tensor(1.0)
    q72 = torch.zeros(b.q.shape[0], 4, 72, dtype=torch.float16)
    cache72 = torch.zeros(2, 4, 16, 1, 72, dtype=torch.float16)
    with pytest.raises(ValueError, match="head_size 72 .*torch_native"):
        pa_mod.paged_attention(q72, cache72, m.query_start_loc, m.seq_lens, m.block_table, q72.clone(),
                               max_query_len=1, scale=1.0, k_scale=one, v_scale=one)
    cache8 = torch.zeros(2, 4, 8, 1, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="block_size 8"):
        pa_mod.paged_attention(b.q, cache8, m.query_start_loc, m.seq_lens, m.block_table, b.q.clone(),
                               max_query_len=1, scale=1.0, k_scale=one, v_scale=one)
    for bad in (0.0, -0.125, float("nan")):
        with pytest.raises(ValueError, match="scale must be positive"):
            pa_mod.paged_attention(b.q, b.kv_cache, m.query_start_loc, m.seq_lens, m.block_table, b.q.clone(),
                                   max_query_len=1, scale=bad, k_scale=one, v_scale=one)
        n = m.seq_lens.shape[0]
        with pytest.raises(ValueError, match="scale must be positive"):
            sd_mod.store_and_decode(b.q[:n], b.k[:n], b.v[:n], b.kv_cache, m.seq_lens, m.block_table,
                                    m.slot_mapping[:n], b.q[:n].clone(), scale=bad, k_scale=one, v_scale=one)
    with pytest.raises(ValueError, match="one token per sequence"):
        sd_mod.store_and_decode(b.q, b.k, b.v, b.kv_cache, m.seq_lens[:2], m.block_table[:2], m.slot_mapping,
                                b.q.clone(), scale=1.0, k_scale=one, v_scale=one)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        BACKENDS["triton"].forward(b.q, b.k, b.v, b.kv_cache, m, b.q.clone(), scale=1.0, sliding_window=None,
                                   logits_soft_cap=None, alibi_slopes=None, k_scale=one, v_scale=one)


# ---- operators: opcheck and torch.compile ---------------------------------------------------


def _op_inputs(seed=0, device="cpu", dtype=torch.float32):
    b = make_paged([1, 1], [9, 20], heads=4, kv_heads=2, head_size=64, block_size=16, dtype=dtype,
                   pad_tokens=0, pad_seqs=0, max_query_len=1, seed=seed, device=device)
    return b


def test_ops_opcheck(interpreter):
    opcheck_all("cpu", torch.float32)


def opcheck_all(device, dtype):
    b = _op_inputs(device=device, dtype=dtype)
    m = b.meta
    one = torch.tensor(1.0, device=device)
    torch.library.opcheck(torch.ops.compiled_attn.triton_store_kv.default,
                          (b.k, b.v, b.kv_cache.clone(), m.slot_mapping, one, one))
    torch.library.opcheck(torch.ops.compiled_attn.triton_paged_attention.default,
                          (b.q, b.kv_cache, m.query_start_loc, m.seq_lens, m.block_table, torch.empty_like(b.q),
                           one, one, None, 0.125, 0, 0.0, 1, 0))
    torch.library.opcheck(torch.ops.compiled_attn.store_and_decode.default,
                          (b.q, b.k, b.v, b.kv_cache.clone(), m.seq_lens, m.block_table, m.slot_mapping,
                           torch.empty_like(b.q), one, one, None, 0.125, 0, 0.0))


def _decode_step(q, k, v, kv_cache, seq_lens, block_table, slot_mapping, k_scale, v_scale):
    out = torch.empty_like(q)
    torch.ops.compiled_attn.store_and_decode(q * 1.0, k, v, kv_cache, seq_lens, block_table, slot_mapping, out,
                                             k_scale, v_scale, None, 0.125, 0, 0.0)
    return out + 0.0


def test_store_and_decode_takes_a_registered_kernel():
    # Another implementation behind the same schema serves eager and torch.compile'd calls.
    code = (
        "import torch\n"
        "from compiled_attn.kernels import store_and_decode  # noqa: F401  (defines the op)\n"
        "@torch.library.register_kernel('compiled_attn::store_and_decode', 'cpu')\n"
        "def _(q, k, v, kv_cache, seq_lens, block_table, slot_mapping, out, k_scale, v_scale, alibi_slopes,\n"
        "      scale, sliding_window, logits_soft_cap):\n"
        "    out.fill_(7.0)\n"
        "    kv_cache.fill_(3.0)\n"
        "def step(q, k, v, cache, lens, table, slots, one):\n"
        "    out = torch.empty_like(q)\n"
        "    torch.ops.compiled_attn.store_and_decode(q, k, v, cache, lens, table, slots, out, one, one, None,\n"
        "                                             0.125, 0, 0.0)\n"
        "    return out * 2\n"
        "args = lambda: (torch.randn(1, 2, 64), torch.randn(1, 1, 64), torch.randn(1, 1, 64),\n"
        "                torch.zeros(2, 2, 16, 1, 64), torch.tensor([5], dtype=torch.int32),\n"
        "                torch.tensor([[1, 0]], dtype=torch.int32), torch.tensor([20]), torch.tensor(1.0))\n"
        "a, b = args(), args()\n"
        "eager = step(*a)\n"
        "compiled = torch.compile(step, fullgraph=True, backend='aot_eager')(*b)\n"
        "print(bool((eager == 14).all()), bool((compiled == 14).all()), bool((b[3] == 3).all()))\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["True", "True", "True"]


def test_ops_compile_fullgraph(interpreter):
    b = _op_inputs()
    m = b.meta
    one = torch.tensor(1.0)
    args = (b.q, b.k, b.v)
    eager_cache, compiled_cache = b.kv_cache.clone(), b.kv_cache.clone()
    expected = _decode_step(*args, eager_cache, m.seq_lens, m.block_table, m.slot_mapping, one, one)
    torch._dynamo.reset()
    step = torch.compile(_decode_step, fullgraph=True, backend="aot_eager")
    got = step(*args, compiled_cache, m.seq_lens, m.block_table, m.slot_mapping, one, one)
    assert torch.equal(got, expected)
    assert same_bits(compiled_cache, eager_cache)


# ---- GPU: the compiled kernels over the full grid --------------------------------------------


def reference_chunked(b: Paged, *, scale, sliding_window, logits_soft_cap, budget_bytes=1 << 29) -> torch.Tensor:
    """The reference backend's attention, one sequence and a few queries at a time (its dense
    per-token gather would not fit at 32k context)."""
    m = b.meta
    starts, lens = m.query_start_loc.tolist(), m.seq_lens.tolist()
    heads, head_size = b.q.shape[1:]
    block_size = b.kv_cache.shape[2]
    out = torch.zeros(b.q.shape, dtype=torch.float32, device=b.q.device)
    for s, n in enumerate(lens):
        q_len = starts[s + 1] - starts[s]
        if q_len == 0:
            continue
        context = n - q_len
        chunk = max(1, budget_bytes // (n * heads * head_size * 4))
        for a in range(0, q_len, chunk):
            c = min(chunk, q_len - a)
            end = context + a + c
            sub = AttentionMetadata(
                query_start_loc=torch.tensor([0, c], dtype=torch.int32, device=b.q.device),
                seq_lens=torch.tensor([end], dtype=torch.int32, device=b.q.device),
                block_table=m.block_table[s: s + 1, : math.ceil(end / block_size)],
                slot_mapping=torch.full((c,), -1, dtype=torch.int64, device=b.q.device), max_query_len=c)
            q = b.q[starts[s] + a: starts[s] + a + c]
            out[starts[s] + a: starts[s] + a + c] = reference_attention(
                q, b.kv_cache, sub, scale=scale, sliding_window=sliding_window, logits_soft_cap=logits_soft_cap,
                alibi_slopes=b.alibi_slopes, k_scale=b.k_scale, v_scale=b.v_scale)
    return out


def _ragged(num_seqs, max_context, query_lens, seed):
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randint(1, max_context + 1, (num_seqs,), generator=g).tolist()
    q_lens = [query_lens[i % len(query_lens)] for i in range(num_seqs)]
    return q_lens, [c + q for c, q in zip(ctx, q_lens)]


def test_chunked_reference_matches_reference():
    # The GPU tests' oracle (the reference backend a sequence and a few queries at a time).
    b = make_paged(*_ragged(5, 40, [1, 7, 3], 0), heads=4, kv_heads=2, head_size=64, block_size=16,
                   dtype=torch.float32, alibi=True)
    sk_mod.store_kv_reference(b.k, b.v, b.kv_cache, b.meta.slot_mapping, b.k_scale, b.v_scale)
    kw = dict(scale=0.125, sliding_window=9, logits_soft_cap=4.0)
    m = b.meta
    whole = pa_mod.paged_attention_reference(b.q, b.kv_cache, m.query_start_loc, m.seq_lens, m.block_table,
                                             max_query_len=m.max_query_len, alibi_slopes=b.alibi_slopes,
                                             k_scale=b.k_scale, v_scale=b.v_scale, **kw)
    chunked = reference_chunked(b, budget_bytes=2 * 48 * 4 * 64 * 4, **kw)
    assert torch.allclose(chunked, whole, atol=1e-6)


GPU_BATCHES: dict[str, tuple[list[int], list[int]]] = {
    "decode_1x4k": ([1], [4096]),
    "decode_16x2k": _ragged(16, 2048, [1], 1),
    "decode_256x4k": _ragged(256, 4096, [1], 2),
    "decode_4x32k": ([1] * 4, [32768, 30000, 1000, 17]),
    "spec_decode_32x4": _ragged(32, 3000, [4], 3),
    "prefill_2x1k": ([1024, 700], [1024, 700]),
    "prefix_prefill_4": ([256, 128, 64, 33], [2048, 300, 5000, 33]),
    "chunked_32k": ([512, 1, 1], [32768, 20000, 129]),
    "mixed_256": _ragged(256, 8192, [1, 1, 1, 1, 1, 1, 3, 64], 4),
}


def _gpu_cases() -> dict[str, tuple[str, Case]]:
    bf16, fp16 = torch.bfloat16, torch.float16
    return {
        # dtypes x head sizes x GQA x block sizes on decode and prefill
        "decode_bf16_d128_g4_bs16": ("decode_16x2k", Case("", 32, 8, 128, 16, bf16, max_query_len=1)),
        "decode_fp16_d64_g1_bs32": ("decode_16x2k", Case("", 16, 16, 64, 32, fp16, max_query_len=1)),
        "decode_bf16_d80_g8_bs64": ("decode_16x2k", Case("", 32, 4, 80, 64, bf16, max_query_len=1)),
        "decode_bf16_d96_g4_bs128": ("decode_16x2k", Case("", 16, 4, 96, 128, bf16, max_query_len=1)),
        "decode_fp16_d112_g1_bs16": ("decode_16x2k", Case("", 8, 8, 112, 16, fp16, max_query_len=1)),
        "decode_bf16_d192_g4_bs32": ("decode_16x2k", Case("", 16, 4, 192, 32, bf16, max_query_len=1)),
        "decode_bf16_d256_g8_bs64": ("decode_16x2k", Case("", 16, 2, 256, 64, bf16, max_query_len=1)),
        "decode_1x4k_split": ("decode_1x4k", Case("", 32, 8, 128, 16, bf16, max_query_len=1)),
        "decode_256x4k_bf16": ("decode_256x4k", Case("", 32, 8, 128, 16, bf16, max_query_len=1)),
        "decode_4x32k_bf16": ("decode_4x32k", Case("", 32, 8, 128, 16, bf16, max_query_len=1)),
        "decode_4x32k_fp8": ("decode_4x32k", Case("", 32, 8, 128, 16, bf16, fp8=True, max_query_len=1)),
        # one KV head: batch-1 fp8 in 64 splits of one 64-key tile; spec decode's splits capped by partials
        "decode_1x4k_mqa_fp8": ("decode_1x4k", Case("", 32, 1, 128, 16, bf16, fp8=True, max_query_len=1)),
        "spec_decode_mqa": ("spec_decode_32x4", Case("", 32, 1, 128, 16, bf16, max_query_len=4)),
        "spec_decode_g4": ("spec_decode_32x4", Case("", 32, 8, 128, 32, bf16, max_query_len=4)),
        "prefill_bf16_d128_g4": ("prefill_2x1k", Case("", 32, 8, 128, 16, bf16)),
        "prefill_fp16_d64_g1_bs128": ("prefill_2x1k", Case("", 8, 8, 64, 128, fp16)),
        "prefill_bf16_d80_g8": ("prefill_2x1k", Case("", 16, 2, 80, 32, bf16)),
        "prefill_bf16_d256_g4": ("prefill_2x1k", Case("", 8, 2, 256, 64, bf16)),
        "prefix_prefill_fp16_d96": ("prefix_prefill_4", Case("", 16, 4, 96, 16, fp16)),
        "prefix_prefill_bf16_d192_g8": ("prefix_prefill_4", Case("", 16, 2, 192, 16, bf16)),
        "chunked_32k_bf16": ("chunked_32k", Case("", 32, 8, 128, 16, bf16)),
        "mixed_256_bf16": ("mixed_256", Case("", 32, 8, 128, 16, bf16, max_query_len=64)),
        "mixed_256_fp8": ("mixed_256", Case("", 32, 8, 128, 64, fp16, fp8=True, max_query_len=64)),
        # features
        "window_decode": ("decode_16x2k", Case("", 32, 8, 128, 16, bf16, window=256, max_query_len=1)),
        "window_prefix_prefill": ("prefix_prefill_4", Case("", 16, 4, 128, 32, fp16, window=100)),
        "window_mixed_fp8": ("mixed_256", Case("", 16, 2, 128, 16, bf16, window=1000, fp8=True, max_query_len=64)),
        "alibi_decode": ("decode_16x2k", Case("", 16, 16, 128, 16, bf16, alibi=True, max_query_len=1)),
        "alibi_prefill": ("prefix_prefill_4", Case("", 16, 4, 64, 16, fp16, alibi=True)),
        "soft_cap_decode": ("decode_16x2k", Case("", 16, 2, 256, 16, bf16, soft_cap=50.0, max_query_len=1)),
        "soft_cap_prefill": ("prefill_2x1k", Case("", 16, 8, 128, 64, bf16, soft_cap=30.0)),
        "everything_mixed": ("mixed_256", Case("", 16, 4, 128, 32, bf16, window=512, alibi=True, soft_cap=30.0,
                                               fp8=True, max_query_len=64)),
        "fp32_mixed": ("prefix_prefill_4", Case("", 8, 2, 64, 16, torch.float32)),
    }


GPU_CASES = _gpu_cases()


@gpu
@needs_cuda
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_gpu_store_and_attention(compiled, monkeypatch, name):
    # The Triton kernel on every case; the Gluon prefill kernel has its own (tests/test_gluon_prefill.py).
    monkeypatch.setattr(gp_mod, "ENABLED", False)
    batch_name, case = GPU_CASES[name]
    case = dataclasses.replace(case, batch=batch_name)
    b = case.make("cuda", seed=len(name), batches=GPU_BATCHES)
    before = b.kv_cache.clone()
    ref_cache = b.kv_cache.clone()
    sk_mod.store_kv_reference(b.k, b.v, ref_cache, b.meta.slot_mapping, b.k_scale, b.v_scale)
    sk_mod.store_kv(b.k, b.v, b.kv_cache, b.meta.slot_mapping, b.k_scale, b.v_scale)
    assert_cache_matches(b.kv_cache, ref_cache, b.used_blocks, before)
    b.kv_cache.copy_(ref_cache)  # attention is measured on the reference cache
    out = torch.full_like(b.q, float("nan"))
    _attention(b, case, pa_mod.paged_attention, out)
    torch.cuda.synchronize()
    ref = reference_chunked(b, **case.features())
    n = b.num_real_tokens
    assert not out.isnan().any()
    assert rel_error(out[:n], ref[:n]) <= TOLERANCE[case.dtype]
    assert torch.all(out[n:] == 0)


@gpu
@needs_cuda
@pytest.mark.parametrize("name", ["mha_d64_fp16", "gqa4_d80_bs32_fp32_split3", "gqa2_window_split2",
                                  "gqa4_alibi_soft_cap", "gqa2_fp8_d96_split2"])
def test_gpu_store_and_decode_small(compiled, name):
    check_store_and_decode(DECODE_CASES[name], device="cuda")


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("heads,kv_heads,head_size,block_size", [(32, 8, 128, 16), (16, 16, 64, 64), (32, 4, 256, 32),
                                                                (32, 1, 128, 16)])
def test_gpu_store_and_decode(compiled, dtype, fp8, heads, kv_heads, head_size, block_size):
    """(32, 1, 128, 16): one KV head, whose splits the partial-traffic cap takes from 32 to 4 (fp8: 12 to 4)."""
    batch = _ragged(32, 3000, [1], heads + head_size)  # the reference gathers [B, context, H, D] in fp32
    case = Case("", heads, kv_heads, head_size, block_size, dtype, fp8=fp8, window=2048 if fp8 else None)
    check_store_and_decode(case, device="cuda", batch=batch)


@gpu
@needs_cuda
@pytest.mark.parametrize("fp8", [False, True])
def test_gpu_store_and_decode_one_kv_head_batch_1(compiled, fp8):
    """Batch 1 on one KV head: 64 splits of 64 keys, fp8 in 64-key tiles (a small grid)."""
    case = Case("", 32, 1, 128, 16, torch.bfloat16, fp8=fp8)
    check_store_and_decode(case, device="cuda", batch=([1], [4096]))


@gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["triton", "trtllm"])
def test_gpu_compiled_layer_launches_programmatically(compiled, monkeypatch, backend):
    """``compiled_attn::attention`` is opaque to torch.compile: the compiled step calls it with real
    tensors, so on sm_90+ every kernel it launches (store, attention, reduction) gets the
    programmatic-launch attribute, as eager calls do."""
    if not pa_mod.programmatic_launch(torch.device("cuda")):
        pytest.skip("programmatic dependent launch needs sm_90+ and a Triton with gdc_wait")
    launches = []
    for module in (pa_mod, sd_mod, sk_mod):
        real = module.launch_constexprs
        monkeypatch.setattr(module, "launch_constexprs", lambda t, real=real: launches.append(real(t)) or launches[-1])
    spec = ca.AttentionSpec(num_heads=32, num_kv_heads=8, head_size=128)
    attn = ca.Attention(spec, backend=backend, device="cuda", dtype=torch.bfloat16)
    step = torch.compile(lambda q, k, v, cache, meta: attn(q * 2.0, k, v, cache, meta) + 1.0, fullgraph=True)
    for name, max_query_len in (("decode_1x4k", 1), ("prefill_2x1k", None)):
        b = make_paged(*GPU_BATCHES[name], heads=32, kv_heads=8, head_size=128, block_size=16, dtype=torch.bfloat16,
                       max_query_len=max_query_len, device="cuda")
        launches.clear()
        step(b.q, b.k, b.v, b.kv_cache, b.meta)
        torch.cuda.synchronize()
        assert launches and all(d == {"USE_GDC": True, "launch_pdl": True} for d in launches), (name, launches)


@gpu
@needs_cuda
def test_gpu_compile_and_cuda_graph(compiled):
    # The triton_op path (wrap_triton) under torch.compile(fullgraph=True), and CUDA-graph replay.
    case = Case("", 32, 8, 128, 16, torch.bfloat16, max_query_len=1)
    b = make_paged(*GPU_BATCHES["decode_16x2k"], heads=32, kv_heads=8, head_size=128, block_size=16,
                   dtype=torch.bfloat16, max_query_len=1, device="cuda")
    m = b.meta

    def step(q, k, v, kv_cache, query_start_loc, seq_lens, block_table, slot_mapping, k_scale, v_scale):
        out = torch.empty_like(q)
        torch.ops.compiled_attn.triton_store_kv(k, v, kv_cache, slot_mapping, k_scale, v_scale)
        torch.ops.compiled_attn.triton_paged_attention(q, kv_cache, query_start_loc, seq_lens, block_table, out,
                                                       k_scale, v_scale, None, case.features()["scale"], 0, 0.0,
                                                       1, 0)
        return out

    args = lambda cache: (b.q, b.k, b.v, cache, m.query_start_loc, m.seq_lens, m.block_table, m.slot_mapping,
                          b.k_scale, b.v_scale)
    eager_cache = b.kv_cache.clone()
    expected = step(*args(eager_cache))
    torch._dynamo.reset()
    compiled_step = torch.compile(step, fullgraph=True)
    cache = b.kv_cache.clone()
    got = compiled_step(*args(cache))
    assert rel_error(got, expected) <= 1e-3
    assert same_bits(cache, eager_cache)

    # Capture the backend's forward (what compiled_attn::attention runs) and replay it.
    graph_cache = b.kv_cache.clone()
    out = torch.empty_like(b.q)
    fwd = lambda: BACKENDS["triton"].forward(b.q, b.k, b.v, graph_cache, m, out, scale=case.features()["scale"],
                                             sliding_window=None, logits_soft_cap=None, alibi_slopes=None,
                                             k_scale=b.k_scale, v_scale=b.v_scale)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fwd()  # warm up (compiles) outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fwd()
    graph_cache.copy_(b.kv_cache)
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert rel_error(out, expected) <= 1e-3
    assert same_bits(graph_cache, eager_cache)


@gpu
@needs_cuda
@pytest.mark.parametrize("merge", ["in_kernel", "reduction_launch"])
@pytest.mark.parametrize("backend", ["triton", "trtllm"])
def test_gpu_programmatic_launch_chain(compiled, monkeypatch, backend, merge):
    """Six calls, each taking the previous call's output as q, replayed from one CUDA graph with
    programmatic dependent launch: every kernel is launched while the one before it drains, so a
    read before its griddepcontrol.wait would see a stale q (or stale partials). The replay must
    give the bits of the same chain launched the ordinary way."""
    if pa_mod.compute_capability(torch.device("cuda")) < (9, 0) or not pa_mod._TRITON_HAS_GDC:
        pytest.skip("programmatic dependent launch needs sm_90+ and a Triton with tl.extra.cuda.gdc_wait")
    if merge == "reduction_launch":
        monkeypatch.setattr(pa_mod, "FUSED_MAX_SPLITS", 1)
    case = Case("", 32, 8, 128, 16, torch.bfloat16, max_query_len=1)
    b = make_paged(*GPU_BATCHES["decode_16x2k"], heads=32, kv_heads=8, head_size=128, block_size=16,
                   dtype=torch.bfloat16, max_query_len=1, pad_tokens=1, pad_seqs=1, device="cuda")
    assert b.meta.is_decode_layout(b.q.shape[0])
    outs = [torch.empty_like(b.q) for _ in range(6)]
    cache = b.kv_cache.clone()

    def chain():
        q = b.q
        for out in outs:
            BACKENDS[backend].forward(q, b.k, b.v, cache, b.meta, out, scale=case.features()["scale"],
                                      sliding_window=None, logits_soft_cap=None, alibi_slopes=None,
                                      k_scale=b.k_scale, v_scale=b.v_scale)
            q = out

    monkeypatch.setattr(pa_mod, "PROGRAMMATIC_LAUNCH", False)
    chain()
    expected = [out.clone() for out in outs]
    monkeypatch.setattr(pa_mod, "PROGRAMMATIC_LAUNCH", True)
    assert pa_mod.launch_constexprs(b.q) == {"USE_GDC": True, "launch_pdl": True}
    graph = bench.capture_graph(chain)
    for _ in range(3):
        for out in outs:
            out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        for i, (got, want) in enumerate(zip(outs, expected)):
            assert same_bits(got, want), f"call {i}"


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_opcheck(compiled, dtype):
    opcheck_all("cuda", dtype)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layer", list(BACKEND_LAYERS))
def test_gpu_backend_matches_reference(compiled, layer, dtype):
    spec = BACKEND_LAYERS[layer]
    scales = (0.5, 2.0) if spec.is_fp8 else (1.0, 1.0)
    for name in BATCH_SPECS:
        b = make_batch(name, spec, dtype=dtype, seed=len(layer), k_scale=scales[0], v_scale=scales[1], device="cuda")
        ref_out, ref_cache = run_op("reference", b, spec, *scales)
        out, cache = run_op("triton", b, spec, *scales)
        n = b.num_real_tokens
        assert not out.isnan().any(), name
        assert rel_error(out[:n], ref_out[:n]) <= TOLERANCE[dtype], name
        assert torch.all(out[n:] == 0), name
        assert_cache_matches(cache, ref_cache, b.used_blocks, b.kv_cache)


@gpu
@needs_cuda
def test_gpu_split_heuristic_fills_the_device():
    sms = pa_mod.num_sms(torch.device("cuda"))
    splits = pa_mod.choose_num_splits(num_query_blocks=1, num_kv_heads=8, max_context=32768, max_query_len=1,
                                      num_sms=sms)
    assert splits * 8 >= min(sms, 8 * pa_mod.MAX_SPLITS)
    assert pa_mod.choose_num_splits(num_query_blocks=256, num_kv_heads=8, max_context=32768, max_query_len=1,
                                    num_sms=sms) == 1


@pytest.mark.parametrize("backend", ["triton", "trtllm"])
def test_head_major_pages_read_through_strides(interpreter, backend):
    """The layout experiment's cache (memory [2, blocks, kv_heads, block_size, D], the usual shape
    through strides): our kernels store and attend through it exactly as through the usual layout."""
    spec = ca.AttentionSpec(num_heads=8, num_kv_heads=2, head_size=64)
    case = bench.Case("decode", "decode", (1,) * 3, (37, 64, 5))
    probe = bench.build_workload(case, spec, block_size=16, dtype=torch.float32, device="cpu", head_major_pages=True)
    assert probe.kv_cache.stride(3) > probe.kv_cache.stride(2), "head-major memory, usual shape"
    workload = bench.build_workload(case, spec, block_size=16, dtype=torch.float32, device="cpu")
    workload.metas, workload.qkv, workload.outs = workload.metas[:1], workload.qkv[:1], workload.outs[:1]
    token_major = workload.kv_cache
    head_major = token_major.transpose(2, 3).contiguous().transpose(2, 3)  # same values, other memory order
    results = []
    for cache in (token_major, head_major):
        workload.kv_cache = cache
        workload.outs[0].fill_(float("nan"))
        bench.backend_contender(backend)(workload)()
        results.append((workload.outs[0].clone(), cache.contiguous()))
    (out, stored), (out_hm, stored_hm) = results
    assert not out.isnan().any()
    torch.testing.assert_close(out_hm, out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stored_hm, stored, rtol=0, atol=0)


def check_head_major_cache(backend: str, case: Case, device="cpu", seed=0, batches=BATCHES):
    """Through the backend (store, prefill, decode): a head-major cache, as PagedKVCache allocates
    fp8 caches for these backends, gives the token-major results and bytes bit for bit."""
    b = case.make(device, seed, batches)
    results = []
    for cache in (b.kv_cache.clone(), b.kv_cache.transpose(2, 3).contiguous().transpose(2, 3)):
        out = torch.full_like(b.q, float("nan"))
        BACKENDS[backend].forward(b.q, b.k, b.v, cache, b.meta, out, alibi_slopes=b.alibi_slopes,
                                  k_scale=b.k_scale, v_scale=b.v_scale, **case.features())
        results.append((out, cache.contiguous()))
    (out, cache), (out_hm, cache_hm) = results
    assert not out.isnan().any()
    assert same_bits(out_hm, out) and same_bits(cache_hm, cache)


@pytest.mark.parametrize("backend", ["triton", "trtllm"])
@pytest.mark.parametrize("name", ["mixed_fp8_fp16", "decode_gqa4_d80_bs32_fp32"])
def test_backend_on_head_major_cache(interpreter, backend, name):
    check_head_major_cache(backend, ATTENTION_CASES[name])


@gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["triton", "trtllm"])
@pytest.mark.parametrize("name", ["mixed_256_fp8", "decode_4x32k_fp8", "decode_1x4k_split", "window_mixed_fp8"])
def test_gpu_backend_on_head_major_cache(compiled, backend, name):
    batch_name, case = GPU_CASES[name]
    if name == "decode_1x4k_split":  # batch 1 in fp8: the split count and in-kernel merge of that shape
        case = dataclasses.replace(case, fp8=True)
    check_head_major_cache(backend, dataclasses.replace(case, batch=batch_name), device="cuda", seed=len(name),
                           batches=GPU_BATCHES)


def test_programmatic_launch_only_for_real_launches(monkeypatch):
    """The launch attribute goes only to launches Triton makes itself, with real tensors, of kernels
    built for it; compiled and exported code launches the same kernels the ordinary way."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    assert not pa_mod.programmatic_launch(torch.device("cpu"))  # a CPU tensor: no griddepcontrol
    t = torch.zeros(2)
    assert pa_mod.launch_constexprs(t) == {"USE_GDC": False}
    assert not pa_mod.programmatic_launch_on((8, 9)) and pa_mod.programmatic_launch_on((9, 0)) == pa_mod._TRITON_HAS_GDC
    monkeypatch.setattr(pa_mod, "programmatic_launch", lambda device: True)  # as on an sm_90 GPU
    assert pa_mod.launch_constexprs(t) == {"USE_GDC": True, "launch_pdl": True}
    with FakeTensorMode() as mode:
        assert pa_mod.launch_constexprs(mode.from_tensor(t)) == {"USE_GDC": True}
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert pa_mod.launch_constexprs(t) == {"USE_GDC": True}


def test_tile_config_by_device_and_bucket():
    config = functools.partial(pa_mod.tile_config, num_queries_per_kv=4, interpret=False)
    # Prefill: 128 rows (32 tokens x 4 heads) on one warpgroup, so two programs share a Hopper SM.
    assert config(head_size=128, max_query_len=2048, hopper=True)[:2] == (128, 32)
    assert config(head_size=128, max_query_len=2048, hopper=True)[3:] == (4, 3)
    assert config(head_size=128, max_query_len=2048, hopper=True, fp8=True)[3:] == (4, 2)  # one K/V buffer
    assert config(head_size=128, max_query_len=2048, hopper=False)[:2] == (128, 32)
    # 256-wide heads (192 padded): on Hopper 128 rows on two warpgroups in 64-key tiles (one
    # warpgroup spills the accumulator); before it 64 rows in 32-key tiles (shared memory).
    for head in (192, 256):
        block_m, _, tile_n, warps, _ = config(head_size=head, max_query_len=2048, hopper=True)
        assert (block_m, tile_n, warps) == (128, 64, 8)
        block_m, _, tile_n, warps, _ = config(head_size=head, max_query_len=2048, hopper=False)
        assert (block_m, tile_n, warps) == (64, 32, 4)
    # Their decode: 64-key tiles at head 192, 32 at 256 (bf16; fp8 the same).
    assert config(head_size=192, max_query_len=1, hopper=True)[2] == 64
    assert config(head_size=192, max_query_len=1, hopper=True, fp8=True)[2] == 64
    assert config(head_size=256, max_query_len=1, hopper=True)[2] == 32
    # Decode buckets: the group's rows, at least 16 (the smallest dot).
    assert config(head_size=128, max_query_len=1, hopper=True)[:2] == (16, 4)


@pytest.mark.parametrize("name", ["prefill_gqa2_fp32", "mixed_gqa4_bs32_window", "mixed_everything_d96"])
def test_paged_attention_with_256_row_tiles(interpreter, monkeypatch, name):
    """256-row prefill tiles (64 tokens x 4 heads, or 128 x 2; the tunable's other measured value)
    under the interpreter: query blocks longer than every sequence here."""
    monkeypatch.setattr(pa_mod, "PREFILL_BLOCK_M", 256)
    check_attention_case(ATTENTION_CASES[name])


def test_split_count_targets_waves_of_resident_programs():
    """Two waves of resident programs: 8 an SM for bf16 (4 resident), 4 for fp8 (2 resident), on an
    H100's 132 SMs, and batch 1 limited by the keys a split holds (one bf16 tile, two fp8 ones);
    the figures benchmarks/tune_h100.json measured for each choice."""
    def splits(batch, context, fp8):
        return pa_mod.choose_num_splits(num_query_blocks=batch, num_kv_heads=8, max_context=context,
                                        max_query_len=1, num_sms=132, fp8=fp8)

    assert [splits(b, c, False) for b, c in ((1, 4096), (32, 4096), (128, 2048), (64, 16384))] == [64, 4, 2, 3]
    assert [splits(b, c, True) for b, c in ((1, 4096), (32, 4096), (128, 2048), (64, 16384))] == [16, 3, 1, 2]
    assert pa_mod.choose_num_splits(num_query_blocks=64, num_kv_heads=8, max_context=16384, max_query_len=16,
                                    num_sms=132, fp8=True) == 1, "prefill-like buckets are not split"


def test_split_count_caps_partial_traffic_of_many_query_heads_a_kv_head():
    """Where a KV head serves many query rows (MQA: 32), each split's fp32 partials cost a large
    share of the K/V bytes: splits are capped at a tenth of them (never below one program an SM),
    except where the capped splits would be short (latency-bound batch-1 grids keep theirs) or
    would take more than one wave of resident programs (the wave target fills waves better); fp8
    grids of a few programs split as finely as bf16. The choices tune_h100.json measured."""
    def splits(batch, context, kv_heads, fp8=False):
        return pa_mod.choose_num_splits(num_query_blocks=batch, num_kv_heads=kv_heads, max_context=context,
                                        max_query_len=1, num_sms=132, fp8=fp8, group=32 // kv_heads)

    shapes = ((1, 4096), (32, 4096), (128, 2048), (64, 16384), (64, 8192))
    assert [splits(b, c, 1) for b, c in shapes] == [64, 6, 3, 16, 16], "12 splits of 8192: two waves"
    assert [splits(b, c, 1, fp8=True) for b, c in shapes] == [64, 5, 2, 8, 8]
    assert splits(32, 4096, 2, fp8=True) == 8, "capped at 6: a part-filled second wave"
    assert [splits(1, 4096, kv) for kv in (2, 4, 8)] == [64, 64, 64], "batch 1 keeps one tile a split"
    assert [splits(1, 4096, kv, fp8=True) for kv in (2, 4, 8)] == [64, 64, 16], "8 KV heads fill half the SMs"
    assert [splits(b, c, 8) for b, c in shapes] == [64, 4, 2, 3, 3], "4 query heads a KV head: no cap"
    assert pa_mod.partial_traffic_cap(max_context=4096, rows=32, fp8=True) == 3


def test_split_cap_only_for_steps_of_many_keys_an_sm():
    """4-token spec decode at 8 KV heads (16 rows a KV head): steps of 496 keys an SM keep the wave
    target's splits (latency-bound: capped, they measured 6-27% slower), steps of 993 are capped
    (batch 8 of 2048: 16 -> 6 splits, 9% faster); MQA likewise."""
    def splits(batch, context, kv_heads, query_len=1):
        return pa_mod.choose_num_splits(num_query_blocks=batch, num_kv_heads=kv_heads, max_context=context,
                                        max_query_len=query_len, num_sms=132, group=32 // kv_heads)

    assert [splits(b, c, 8, 4) for b, c in ((1, 8192), (2, 4096), (4, 2048))] == [64, 64, 32]
    assert [splits(b, c, 8, 4) for b, c in ((8, 2048), (16, 1024))] == [6, 3]
    assert [splits(b, c, 1) for b, c in ((16, 4096), (32, 4096))] == [64, 6]


@pytest.mark.parametrize("one_loop", [True, False])
@pytest.mark.parametrize("name", ["decode_split3_gqa4_d96", "decode_split2_window", "spec_decode_split2_gqa4",
                                  "spec_decode_gqa3_bs32"])
def test_one_key_loop_and_two_loops(interpreter, monkeypatch, name, one_loop):
    """Decode buckets walk short splits in one loop (masks under a branch, key rows past the
    sequence clamped in bounds) and long ones in two; both paths agree with the reference and
    read no poisoned slot (NaN poison: a masked read of one would still show)."""
    monkeypatch.setattr(pa_mod, "ONE_LOOP_MAX_TILES", 10**6 if one_loop else 0)
    check_attention_case(ATTENTION_CASES[name], nan_poison=True)


@pytest.mark.parametrize("one_loop", [True, False])
@pytest.mark.parametrize("name", ["gqa2_window_split2", "gqa4_alibi_soft_cap", "gqa2_fp8_d96_split2"])
def test_store_and_decode_one_key_loop_and_two_loops(interpreter, monkeypatch, name, one_loop):
    monkeypatch.setattr(pa_mod, "ONE_LOOP_MAX_TILES", 10**6 if one_loop else 0)
    check_store_and_decode(DECODE_CASES[name], nan_poison=True)


@pytest.mark.parametrize("heads_first", [True, False])
@pytest.mark.parametrize("name", ["mixed_gqa4_d80_fp32", "mixed_gqa3_d112", "decode_split3_gqa4_d96",
                                  "spec_decode_split2_gqa4"])
def test_paged_attention_in_both_program_orders(interpreter, monkeypatch, name, heads_first):
    """Programs walk the KV heads of a query block first or every block of a head first (the grid
    and the merge counters' indices change with it); both agree with the reference."""
    monkeypatch.setitem(pa_mod.HEADS_FIRST, "paged_attention", heads_first)
    check_attention_case(ATTENTION_CASES[name])


@pytest.mark.parametrize("heads_first", [True, False])
@pytest.mark.parametrize("name", ["gqa4_d80_bs32_fp32_split3", "gqa3_d64_fp32"])
def test_store_and_decode_in_both_program_orders(interpreter, monkeypatch, name, heads_first):
    monkeypatch.setitem(pa_mod.HEADS_FIRST, "store_and_decode", heads_first)
    check_store_and_decode(DECODE_CASES[name])


@pytest.mark.parametrize("name", ["mixed_gqa4_bs32_window", "decode_split3_gqa4_d96", "mixed_fp8_fp16"])
def test_paged_attention_with_64_bit_offsets(interpreter, monkeypatch, name):
    """The 64-bit K/V addressing that caches of 2**31 elements or more take (the interpreter cannot
    hold such a cache: the size rule is forced)."""
    monkeypatch.setattr(pa_mod, "offsets_fit_int32", lambda t: False)
    check_attention_case(ATTENTION_CASES[name], nan_poison=True)


@pytest.mark.parametrize("name", ["gqa4_d80_bs32_fp32_split3", "gqa2_fp8_d96_split2"])
def test_store_and_decode_with_64_bit_offsets(interpreter, monkeypatch, name):
    monkeypatch.setattr(sd_mod, "offsets_fit_int32", lambda t: False)
    check_store_and_decode(DECODE_CASES[name], nan_poison=True)


def test_offsets_fit_int32_counts_the_furthest_element():
    """32-bit offsets up to the cache's furthest element, in whatever order its strides take."""
    fits = pa_mod.offsets_fit_int32
    page = 16 * 8 * 128
    blocks = 2**31 // (2 * page)  # 2**31 elements: the last one at offset 2**31 - 1
    assert fits(torch.empty(2, blocks, 16, 8, 128, device="meta")) is True
    assert fits(torch.empty(2, blocks + 1, 16, 8, 128, device="meta")) is False
    head_major = lambda n: torch.empty(2, n, 8, 16, 128, device="meta").transpose(2, 3)  # noqa: E731
    assert fits(head_major(blocks)) is True and fits(head_major(blocks + 1)) is False
    assert fits(head_major(blocks + 1)[:, :blocks]) is False, "a view reaches as far as its strides"


@gpu
@needs_cuda
@pytest.mark.parametrize("fp8", [False, True])
def test_gpu_cache_past_int32_offsets(compiled, fp8):
    """A cache whose V half lies past 2**31 elements (4 GB of bf16, 2 GB of fp8) takes 64-bit
    offsets: with the batch's pages at the top of the pool, 32-bit ones would wrap. Both kernels
    give what they give on the same pages in a small cache, and store where they should."""
    case = Case("mixed", heads=32, kv_heads=8, head_size=128, dtype=torch.bfloat16, fp8=fp8)
    b = case.make("cuda", seed=5)
    sk_mod.store_kv_reference(b.k, b.v, b.kv_cache, b.meta.slot_mapping, b.k_scale, b.v_scale)
    small = b.kv_cache
    page = math.prod(small.shape[2:])
    top = 2**31 // (2 * page) + 1  # the first block of the batch's pages in the large pool
    large = torch.empty((2, top + small.shape[1], *small.shape[2:]), dtype=small.dtype, device="cuda")
    large[:, top:] = small
    assert pa_mod.offsets_fit_int32(small) and not pa_mod.offsets_fit_int32(large)
    shifted = dataclasses.replace(b.meta, block_table=b.meta.block_table + top)

    outs = []
    for cache, meta in ((small, b.meta), (large, shifted)):
        outs.append(torch.full_like(b.q, float("nan")))
        _attention(dataclasses.replace(b, kv_cache=cache, meta=meta), case, pa_mod.paged_attention, outs[-1])
    ref = _attention(b, case, pa_mod.paged_attention_reference, None)
    n = b.num_real_tokens
    assert rel_error(outs[0][:n], ref[:n]) <= TOLERANCE[case.dtype]
    assert rel_error(outs[1][:n], outs[0][:n]) <= TOLERANCE[case.dtype] and torch.all(outs[1][n:] == 0)

    # One decode token per sequence through store_and_decode, slots shifted with the pages.
    q, k, v = (t[: b.meta.seq_lens.shape[0]] for t in (b.q, b.k, b.v))
    slots = (b.meta.seq_lens.long() - 1).clamp(min=0)  # each sequence's last slot: a position it holds
    rows = torch.arange(slots.shape[0], device="cuda")
    slots = b.meta.block_table[rows, slots // case.block_size].long() * case.block_size + slots % case.block_size
    slots = torch.where(b.meta.seq_lens > 0, slots, -1)  # the padding sequence stores nothing
    kw = dict(scale=case.head_size ** -0.5, k_scale=b.k_scale, v_scale=b.v_scale)
    decode_outs = []
    for cache, meta, shift in ((small.clone(), b.meta, 0), (large, shifted, top * case.block_size)):
        decode_outs.append(sd_mod.store_and_decode(q, k, v, cache, meta.seq_lens, meta.block_table, slots + shift,
                                                   torch.empty_like(q), **kw))
    ref = sd_mod.store_and_decode_reference(q, k, v, small.clone(), b.meta.seq_lens, b.meta.block_table, slots, **kw)
    assert rel_error(decode_outs[0], ref) <= TOLERANCE[case.dtype]
    assert rel_error(decode_outs[1], decode_outs[0]) <= TOLERANCE[case.dtype]
    small_after = small.clone()
    sk_mod.store_kv_reference(k, v, small_after, slots, b.k_scale, b.v_scale)
    assert_cache_matches(large[:, top:], small_after, b.used_blocks, small)


def test_one_key_loop_only_for_short_decode_splits():
    """One loop where a split holds at most ONE_LOOP_MAX_TILES tiles of the block table's reach:
    batch-1 decode on an H100 (64 bf16 splits of 4096 keys, 16 fp8 ones), never long splits or prefill."""
    def one_loop(context, tile_n, splits, max_query_len=1):
        return pa_mod.one_key_loop(max_context=context, tile_n=tile_n, num_splits=splits, max_query_len=max_query_len)

    assert one_loop(4096, 64, 32) and one_loop(4096, 128, 32) and one_loop(8192, 64, 32)
    assert not one_loop(8192 + 16, 64, 32), "129 tiles in 32 splits: 5 a split"
    assert not one_loop(4096, 64, 4) and not one_loop(16384, 64, 2)
    assert not one_loop(256, 64, 1, max_query_len=2048), "prefill keeps its mask-free loop"


def test_short_split_tiles_only_for_splits_of_one_tile():
    """Two 32-key tiles where a bf16 decode split holds one 64-key tile over pages smaller than it
    (batch 1 on an H100: 64 splits of 4096 keys, pages of 16); every other bucket keeps its tile."""
    def tile(context, splits, max_query_len=1, fp8=False, tile_n=64, block_size=16):
        return pa_mod.short_split_tile_n(tile_n, max_context=context, num_splits=splits,
                                         max_query_len=max_query_len, fp8=fp8, block_size=block_size)

    assert tile(4096, 64) == 32 and tile(1024, 16) == 32 and tile(4096, 64, max_query_len=4) == 32
    assert tile(4096, 32) == 64 and tile(4096 + 16, 64) == 64, "65 keys a split: two tiles already"
    assert tile(4096, 64, max_query_len=9) == 64, "prefill buckets keep their tiles"
    assert tile(4096, 16, fp8=True, tile_n=128) == 128 and tile(2048, 64, tile_n=32) == 32
    assert tile(4096, 64, fp8=True, tile_n=128) == 64, "fp8 splits of 64 keys (small grids) take 64-key tiles"
    assert tile(4096, 64, block_size=32) == 32 and tile(4096, 64, block_size=64) == 64, "a page holds the tile"


def test_store_and_decode_fp8_many_splits_in_one_loop(interpreter, monkeypatch):
    """The shape of fp8 batch-1 decode on an H100 (16 splits of a few tiles each, walked in one
    loop, merged in the kernel by the last split), scaled down: 517 keys in 16-key tiles, 16 splits."""
    plans = []
    plan = sd_mod._launch_plan
    monkeypatch.setattr(sd_mod, "_launch_plan", lambda *a, **k: plans.append(plan(*a, **k)) or plans[-1])
    check_store_and_decode(Case("decode", kv_heads=2, fp8=True, num_splits=16, tile_n=16), batch=([1], [517]),
                           nan_poison=True)
    (_, _, constexprs), reduce_launch = plans[0]
    assert constexprs["ONE_KEY_LOOP"] and constexprs["NUM_SPLITS"] == 16
    assert constexprs["FUSED_REDUCE"] and reduce_launch is None


@pytest.mark.parametrize("kernel", ["paged_attention", "store_and_decode"])
def test_sixty_four_splits_of_the_largest_head(interpreter, kernel):
    """MAX_SPLITS (64) partials of a 256-wide head through the reduction launch, some splits empty."""
    case = Case("decode", head_size=256, dtype=torch.float32, max_query_len=1, num_splits=pa_mod.MAX_SPLITS, tile_n=16)
    if kernel == "paged_attention":
        check_attention_case(case)
    else:
        check_store_and_decode(case)
