"""The benchmark's own pieces on CPU: workloads and the FlexAttention (paged) peer's correctness."""

from __future__ import annotations

import pytest
import torch

from compiled_attn import bench
from compiled_attn.bench_flex import flex_paged_contender, page_lists
from compiled_attn.spec import AttentionSpec

SPEC = AttentionSpec(num_heads=8, num_kv_heads=2, head_size=64)


def test_page_lists_split_full_and_partial_pages():
    # 40 new tokens over 60 cached, pages of 16, query blocks of 32: positions 60..91 then 92..99.
    pages = list(range(100, 107))
    (full0, part0), (full1, part1) = page_lists(100, 40, pages, 16, 32)
    assert full0 == pages[:3] and part0 == pages[3:6]  # keys 0..47 seen by all; 48..95 by some
    assert full1 == pages[:5] and part1 == pages[5:7]
    # Decode: every page but a partial last one is full.
    assert page_lists(37, 1, pages[:3], 16, 128) == [(pages[:2], pages[2:3])]
    assert page_lists(32, 1, pages[:2], 16, 128) == [(pages[:2], [])]


@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("case", [
    bench.Case("decode", "decode", (1,) * 3, (37, 64, 5)),
    bench.Case("prefill over a prefix", "prefill", (40,) * 2, (40, 100)),
])
def test_flex_peer_matches_reference(case, compile):
    workload = bench.build_workload(case, SPEC, block_size=16, dtype=torch.float32, device="cpu")
    workload.metas, workload.qkv, workload.outs = workload.metas[:2], workload.qkv[:2], workload.outs[:2]
    bench.backend_contender("reference")(workload)()  # stores the new K/V (peers do not), then attends
    expected = [o.clone() for o in workload.outs]
    for o in workload.outs:
        o.fill_(float("nan"))
    flex_paged_contender(compile=compile)(workload)  # runs once while building
    for got, want in zip(workload.outs, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_flex_peer_refuses_ragged_queries_and_fp8():
    case = bench.Case("mixed", "prefill", (3, 1), (3, 9))
    workload = bench.build_workload(case, SPEC, block_size=16, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="equal query lengths"):
        flex_paged_contender(compile=False)(workload)
    fp8 = AttentionSpec(num_heads=8, num_kv_heads=2, head_size=64, kv_cache_dtype="fp8_e4m3")
    case = bench.Case("decode", "decode", (1, 1), (3, 9))
    workload = bench.build_workload(case, fp8, block_size=16, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="no fp8"):
        flex_paged_contender(compile=False)(workload)


def test_bench_shape_at_another_head_size():
    spec = bench.bench_spec("fp8", head_size=80)
    assert (spec.num_heads, spec.num_kv_heads, spec.head_size) == (32, 8, 80)
    assert bench.bench_spec("bf16", num_kv_heads=32).num_kv_heads == 32
    assert spec.kv_cache_dtype == "fp8_e4m3"
    assert bench.bench_spec("bf16") == bench.LLAMA3_8B


def test_bench_cli_takes_shape_and_case_filter():
    import argparse

    parser = argparse.ArgumentParser()
    bench.add_parser(parser.add_subparsers())
    args = parser.parse_args(["bench", "--head-size", "192", "--kv-heads", "1", "--cases", "prefill",
                              "--rounds", "3", "--json", "b.json"])
    assert (args.head_size, args.kv_heads, args.cases, args.rounds) == (192, 1, "prefill", 3)
    assert bench.command_line(args) == \
        "compiled-attn bench --block-size 16 --head-size 192 --kv-heads 1 --cases prefill --rounds 3 --json b.json"
    default = parser.parse_args(["bench"])
    assert (default.head_size, default.kv_heads, default.cases, default.rounds) == (128, 8, "", 1)
    with pytest.raises(SystemExit, match="no benchmark case"):
        bench.main(parser.parse_args(["bench", "--cases", "no such case"]))


def test_bench_row_is_the_median_of_its_rounds():
    ceilings = {"copy_GBps": 2000.0, "matmul_TFLOPs": 800.0}
    prefill = next(c for c in bench.CASES if c.kind == "prefill")
    row = {}
    bench._add_rates(row, [610.0, 590.0, 600.0], prefill, bench.LLAMA3_8B, torch.bfloat16, ceilings)
    assert row["us"] == 600.0 and row["us_rounds"] == [610.0, 590.0, 600.0]
    assert row["TFLOPs"] == pytest.approx(bench.prefill_flops(prefill, bench.LLAMA3_8B) / 600.0 / 1e6)
    decode = next(c for c in bench.CASES if c.kind == "decode")
    one = {}
    bench._add_rates(one, [20.0], decode, bench.LLAMA3_8B, torch.bfloat16, ceilings)
    assert "us_rounds" not in one and one["pct_copy"] == pytest.approx(100 * one["GBps"] / 2000.0)
