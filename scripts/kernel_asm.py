"""Build one of our kernels for an H100 on this machine (no GPU needed) and print what its machine
code says: registers, stack bytes (spills), shared memory, instructions, and for each key loop its
instructions with the opcodes and source lines behind most of them.

    python scripts/kernel_asm.py decode [--fp8] [--splits 32] [--set DECODE_NUM_WARPS=8 ...] [--sass out.sass]
    python scripts/kernel_asm.py prefill [--set TILE_N_GPU=32 ...]

``decode`` is the fused store + decode kernel (the ``trtllm`` backend's), ``decode-paged`` the
unified kernel in a decode bucket, ``prefill`` the unified kernel in a long prefill bucket, all at
the benchmark's Llama-3-8B attention shape. ``--set`` patches a constant of
``compiled_attn.kernels.paged_attention`` first, as ``scripts/tune_kernels.py`` does. A screen
before spending GPU time, not a timing: fewer instructions are not always faster (BENCHMARKS.md).

The GPU machine builds with Triton 3.6; to screen with that compiler here, for example
``pip install --no-deps --target /tmp/triton36 triton==3.6.0`` and ``PYTHONPATH=/tmp/triton36:.``.
The report names the Triton that built it.
"""

from __future__ import annotations

import argparse
import ast
import json

import triton

from compiled_attn.kernels import _aot
from compiled_attn.kernels import paged_attention as pa


def launch(kind: str, *, fp8: bool, splits: int | None) -> _aot.Launch:
    if kind == "decode":
        return _aot.store_and_decode_launch(fp8=fp8, num_splits=splits or 4)
    return _aot.paged_attention_launch(decode=kind == "decode-paged", fp8=fp8, num_splits=splits)


def patch(assignments: list[str]) -> dict:
    """``NAME=VALUE`` pairs set on the kernels' module (VALUE a Python literal)."""
    patched = {}
    for assignment in assignments:
        name, _, value = assignment.partition("=")
        if not hasattr(pa, name):
            raise SystemExit(f"compiled_attn.kernels.paged_attention has no constant {name}")
        patched[name] = ast.literal_eval(value)
        setattr(pa, name, patched[name])
    return patched


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=("decode", "decode-paged", "prefill"))
    parser.add_argument("--fp8", action="store_true", help="fp8 e4m3 K/V")
    parser.add_argument("--splits", type=int, default=None, help="flash-decoding splits (decode kinds)")
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90, 89, 80")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--sass", default=None, help="also write the SASS here")
    args = parser.parse_args(argv)
    patched = patch(args.set)
    chosen = launch(args.kind, fp8=args.fp8, splits=args.splits)
    compiled = chosen.compile(args.arch)
    if args.sass:
        with open(args.sass, "w") as f:
            f.write(_aot.sass(compiled))
    report = {"kind": args.kind, "fp8": args.fp8, "arch": args.arch, "triton": triton.__version__, **patched,
              "num_warps": chosen.num_warps, "num_stages": chosen.num_stages,
              **{k: v for k, v in chosen.constexprs.items() if k in ("BLOCK_M", "TILE_N", "NUM_SPLITS")},
              **_aot.sass_stats(compiled)}
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
