"""Sweep the Triton kernels' named tile constants on the GPU, one table per case.

    python scripts/tune_kernels.py --json out/tune.json [--budget-s 300]

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
DECODE = {"DECODE_TILE_N_GPU": (32, 64, 128), "DECODE_NUM_WARPS": (4, 8), "DECODE_NUM_STAGES": (2, 3, 4)}
CASES = [  # (case name, kv dtype, backend, sweep)
    ("decode 1x4096", "bf16", "trtllm", DECODE),
    ("decode 32x4096", "bf16", "triton", DECODE),
    ("decode 64x16384", "fp8", "triton", DECODE),
    ("prefill 8x2048", "bf16", "triton", PREFILL),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default="tune.json")
    parser.add_argument("--budget-s", type=float, default=300)
    args = parser.parse_args()
    deadline = time.time() + args.budget_s
    cases = {c.name: c for c in bench.CASES}
    results = []
    for name, kv, backend, sweep in CASES:
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
    with open(args.json, "w") as f:
        json.dump({"card": torch.cuda.get_device_name(), "results": results}, f, indent=1)
    for name, kv, _, _ in CASES:
        rows = sorted((r for r in results if r["case"] == name and r["kv"] == kv and "us" in r), key=lambda r: r["us"])
        print(f"best for {name} {kv}:", *rows[:3], sep="\n  ")


if __name__ == "__main__":
    main()
