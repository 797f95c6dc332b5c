"""Sweep the Triton kernels' named tile constants on the GPU, one table per case.

    python scripts/tune_kernels.py --json out/tune.json [--budget-s 300]   (split evenly over the cases)

Each configuration patches the module constants of compiled_attn.kernels.paged_attention (they
are read at launch), then times the backend exactly as ``compiled-attn bench`` does.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time

import torch

from compiled_attn import bench
from compiled_attn.kernels import paged_attention as pa

PREFILL = {"PREFILL_BLOCK_M": (64, 128), "TILE_N_GPU": (32, 64, 128), "PREFILL_NUM_WARPS": (4, 8),
           "NUM_STAGES": (2, 3)}
SPLITS = {"SPLIT_TARGET_PROGRAMS_PER_SM": (1, 2, 4, 8)}
CASES = [  # (case name, kv dtype, backend, sweep)
    ("decode 1x4096", "bf16", "trtllm", {"SPLIT_MIN_KEYS": (64, 128, 256), **SPLITS, "DECODE_TILE_N_GPU": (32, 64)}),
    ("decode 32x4096", "bf16", "trtllm", {"SPLIT_MIN_KEYS": (128, 256), **SPLITS}),
    ("decode 64x16384", "bf16", "trtllm", {**SPLITS, "DECODE_NUM_STAGES": (3, 4)}),
    ("decode 64x16384", "fp8", "trtllm", {**SPLITS, "DECODE_TILE_N_GPU": (64, 128), "DECODE_NUM_STAGES": (3, 4, 5)}),
    ("decode ragged 64x[256,8192]", "bf16", "trtllm", {"SPLIT_MIN_KEYS": (128, 256), **SPLITS}),
    ("prefill 8x2048", "bf16", "triton", PREFILL),
    ("prefill 1x16384", "bf16", "triton", {k: v[-2:] for k, v in PREFILL.items()}),
]
FUSED = {"FUSED_SPLIT_REDUCE": (False, True)}  # --fused: the split reduction in-kernel vs launched
FUSED_CASES = [(name, kv, backend, FUSED) for name, kv, backend in (
    ("decode 1x4096", "bf16", "trtllm"), ("decode 1x4096", "bf16", "triton"), ("decode 32x4096", "bf16", "trtllm"),
    ("decode 128x2048", "bf16", "trtllm"), ("decode 64x16384", "bf16", "trtllm"), ("decode 64x16384", "fp8", "trtllm"),
    ("decode ragged 64x[256,8192]", "bf16", "trtllm"))]
FP8_DOT = {"FP8_DOT_FP16": (False, True)}  # --fp8-dot: fp8 K/V tiles dotted in bf16 (q's dtype) or fp16
FP8_DOT_CASES = [(name, "fp8", backend, FP8_DOT) for name, backend in (
    ("decode 64x16384", "trtllm"), ("decode 64x16384", "triton"), ("decode 32x4096", "trtllm"),
    ("decode 128x2048", "trtllm"), ("decode ragged 64x[256,8192]", "trtllm"))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default="tune.json")
    parser.add_argument("--budget-s", type=float, default=300)
    parser.add_argument("--fused", action="store_true", help="only compare the fused and launched split reduction")
    parser.add_argument("--fp8-dot", action="store_true", help="only compare bf16 and fp16 dots for fp8 K/V")
    args = parser.parse_args()
    sweeps = FUSED_CASES if args.fused else FP8_DOT_CASES if args.fp8_dot else CASES
    cases = {c.name: c for c in bench.CASES}
    results = []
    for name, kv, backend, sweep in sweeps:
        deadline = time.time() + args.budget_s / len(sweeps)  # every case gets its share
        spec = bench.LLAMA3_8B if kv == "bf16" else dataclasses.replace(bench.LLAMA3_8B, kv_cache_dtype="fp8_e4m3")
        workload = bench.build_workload(cases[name], spec, block_size=16, dtype=torch.bfloat16, device="cuda")
        defaults = {k: getattr(pa, k) for k in sweep}
        for values in itertools.product(*sweep.values()):
            if time.time() > deadline:
                break
            config = dict(zip(sweep, values))
            for k, v in config.items():
                setattr(pa, k, v)
            row = {"case": name, "kv": kv, "backend": backend, **config}
            try:
                row["us"] = bench.time_graph(bench.backend_contender(backend)(workload), len(workload.metas))
            except Exception as err:  # a config that does not compile (shared memory) is a result
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
            results.append(row)
            print(json.dumps(row), flush=True)
        for k, v in defaults.items():
            setattr(pa, k, v)
        del workload
        torch.cuda.empty_cache()
        with open(args.json, "w") as f:  # after every case: a cut-short run keeps what it measured
            json.dump({"card": torch.cuda.get_device_name(), "results": results}, f, indent=1)
    for name, kv, backend, _ in sweeps:
        rows = sorted((r for r in results if (r["case"], r["kv"], r["backend"]) == (name, kv, backend) and "us" in r), key=lambda r: r["us"])
        print(f"best for {name} {kv} {backend}:", *rows[:3], sep="\n  ")


if __name__ == "__main__":
    main()
