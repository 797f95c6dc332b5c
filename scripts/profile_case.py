"""The kernel timeline of one benchmark case, replayed from a CUDA graph under torch.profiler:
what each call launches, how long each kernel runs and the idle gap before it.

    python scripts/profile_case.py --case "decode 1x4096" [--kv fp8] [--backend trtllm] [--json out/profile.json]

``--eager-calls N`` runs each contender N times without a graph or torch.profiler instead, for an
outside profiler (``scripts/ncu_case.sh`` runs Nsight Compute over it).

Contenders are the ``compiled-attn bench`` ones: ``ours:<backend>`` or a peer name such as
``peer:sdpa-cudnn(dense)``.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from torch.profiler import ProfilerActivity, profile

from compiled_attn import bench


def contender(name: str):
    return bench.default_contenders(flex=False)[name]


def kernel_timeline(fn, replays: int = 5) -> list[dict]:
    """(name, start, duration, gap) of every kernel of ``replays`` graph replays, in order (µs)."""
    graph = bench.capture_graph(fn)
    graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
    rows, previous_end = [], None
    for e in kernels:
        start, end = e.time_range.start, e.time_range.end
        rows.append({"name": e.name[:60], "us": end - start, "gap_us": None if previous_end is None else start - previous_end})
        previous_end = end
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Median duration and gap per kernel name."""
    names = dict.fromkeys(r["name"] for r in rows)
    return [{"name": n, "count": sum(r["name"] == n for r in rows),
             "median_us": statistics.median(r["us"] for r in rows if r["name"] == n),
             "median_gap_us": statistics.median([r["gap_us"] for r in rows if r["name"] == n and r["gap_us"] is not None] or [0.0])}
            for n in names]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", action="append", required=True, help="a bench case name (repeatable)")
    parser.add_argument("--kv", default="bf16", choices=("bf16", "fp8"))
    parser.add_argument("--contender", action="append", default=None, help="default: ours:trtllm")
    parser.add_argument("--json", default=None)
    parser.add_argument("--eager-calls", type=int, default=0, help="only call each contender this many times")
    args = parser.parse_args()
    cases = {c.name: c for c in bench.CASES}
    spec = bench.bench_spec(args.kv)
    report = []
    for case in args.case:
        workload = bench.build_workload(cases[case], spec, block_size=16, dtype=torch.bfloat16, device="cuda")
        for name in args.contender or ["ours:trtllm"]:
            if args.eager_calls:
                fn = contender(name)(workload)
                for _ in range(args.eager_calls):
                    fn()
                torch.cuda.synchronize()
                continue
            try:
                rows = kernel_timeline(contender(name)(workload))
            except Exception as err:  # a contender that cannot take the case is a result
                report.append({"case": case, "kv": args.kv, "contender": name, "error": f"{type(err).__name__}: {err}"[:200]})
                continue
            entry = {"case": case, "kv": args.kv, "contender": name, "replicas": len(workload.metas),
                     "kernels": summarise(rows)}
            report.append(entry)
            print(json.dumps(entry), flush=True)
        del workload
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"card": torch.cuda.get_device_name(), "profiles": report}, f, indent=1)


if __name__ == "__main__":
    main()
