"""Sweep the Triton kernels' named tile constants on the GPU, one table per case.

    python scripts/tune_kernels.py --json out/tune.json [--budget-s 300] [--sweep NAME]

The budget is split evenly over the cases. ``--sweep``: ``tiles`` (the default), ``fused``,
``fp8-dot``, ``schedule``, ``defaults``, ``splits``, ``prefill``, ``stages``, ``warps``,
``small-grid``, ``fp8-splits``, ``small-grid-stages``, ``one-loop``, ``small-grid-merge``,
``prefill-lengths``, ``pdl``, ``order-pdl``, ``pdl-small-grid``, ``launch-next``, ``pdl-check``,
``fp8-decode``, ``heads-first``, ``both-kernels``, ``short-split-tiles``, ``fp8-64-key-tiles``,
``small-grid-tiles``, ``prefill-two-programs``, ``prefill-one-warpgroup``,
``decode-32-key-tiles``, ``prefill-order``, ``large-head-prefill``, ``large-head-prefill-fp8``,
``large-head-decode``, ``padded-head-decode``, ``large-head-decode-warps``, ``mqa-splits``,
``split-partial-cap``, ``fp8-min-keys``, ``fused-merge-splits``, ``split-cap-reach``,
``split-cap-steps`` (see ``SWEEPS``).
A sweep maps a constant to the values to try (every combination), or is a list of whole
configurations; each configuration starts from the defaults.
``--cases TEXT`` keeps the cases whose name holds TEXT; ``--block-size N`` pages of N tokens (16);
``--head-size N`` another head size than the benchmark's 128; ``--kv-heads N`` another KV head
count than its 8.
``--contiguous-pages`` lays each sequence's pages out in order (not the random pool order);
the cache is in the memory order the package allocates for it (``bench.default_layout``: fp8
head-major), or as ``--head-major-pages`` / ``--token-major-pages`` say (see ``bench.build_workload``).

Each configuration patches the module constants of compiled_attn.kernels.paged_attention (they
are read at launch), then times the backend exactly as ``compiled-attn bench`` does.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch

from compiled_attn import bench
from compiled_attn.cache import cache_layout
from compiled_attn.kernels import paged_attention as pa

PREFILL = {"PREFILL_BLOCK_M": (64, 128), "TILE_N_GPU": (32, 64, 128), "PREFILL_NUM_WARPS": (4, 8),
           "NUM_STAGES": (2, 3)}
SPLITS = {"SPLIT_TARGET_WAVES": (0.25, 0.5, 1, 2)}  # x 4 resident bf16 programs = 1, 2, 4, 8 an SM
DECODE_CASE_NAMES = ("decode 1x4096", "decode 32x4096", "decode 128x2048", "decode 64x16384",
                     "decode ragged 64x[256,8192]")
PREFILL_CASE_NAMES = ("prefill 8x2048", "prefill 1x16384", "prefill 4x2048 over 8192 cached")
CASES = [  # (case name, kv dtype, backend, sweep)
    ("decode 1x4096", "bf16", "trtllm", {"SPLIT_MIN_KEYS": (64, 128, 256), **SPLITS, "DECODE_TILE_N_GPU": (32, 64)}),
    ("decode 32x4096", "bf16", "trtllm", {"SPLIT_MIN_KEYS": (128, 256), **SPLITS}),
    ("decode 64x16384", "bf16", "trtllm", {**SPLITS, "DECODE_NUM_STAGES": (3, 4)}),
    ("decode 64x16384", "fp8", "trtllm", {**SPLITS, "DECODE_TILE_N_GPU_FP8": (64, 128),
                                          "DECODE_NUM_STAGES_FP8": (3, 4, 5)}),
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

# --sweep schedule: the in-kernel merge of up to 32 splits, longest-first query blocks, warps per
# decode program, and the prefill configurations the tiles sweep did not reach.
PREFILL_CONFIGS = [dict(PREFILL_BLOCK_M=128, TILE_N_GPU=n, PREFILL_NUM_WARPS=w, NUM_STAGES=st, LONGEST_FIRST=first)
                   for first in (False, True) for n, w, st in ((64, 4, 3), (128, 8, 3), (64, 8, 3))]
SCHEDULE_CASES = [
    ("decode 1x4096", "bf16", "trtllm", {"FUSED_MAX_SPLITS": (8, 32), "SPLIT_TARGET_WAVES": (1, 2),
                                         "SPLIT_MIN_KEYS": (64, 128)}),
    ("decode 1x4096", "bf16", "triton", {"FUSED_MAX_SPLITS": (8, 32)}),
    ("decode 32x4096", "bf16", "trtllm", {"DECODE_NUM_WARPS": (4, 8), "DECODE_TILE_N_GPU": (64, 128),
                                          "SPLIT_MIN_KEYS": (128, 256)}),
    ("decode 128x2048", "bf16", "trtllm", {"DECODE_NUM_WARPS": (4, 8), "DECODE_TILE_N_GPU": (64, 128)}),
    ("decode 64x16384", "bf16", "trtllm", {"DECODE_NUM_WARPS": (4, 8), "DECODE_TILE_N_GPU": (64, 128)}),
    ("decode 64x16384", "fp8", "trtllm", {"DECODE_NUM_WARPS_FP8": (4, 8), "DECODE_TILE_N_GPU_FP8": (128, 256),
                                          "DECODE_NUM_STAGES_FP8": (3, 5)}),
    ("decode ragged 64x[256,8192]", "bf16", "trtllm", {"DECODE_NUM_WARPS": (4, 8)}),
    ("prefill 8x2048", "bf16", "triton", PREFILL_CONFIGS),
    ("prefill 1x16384", "bf16", "triton", PREFILL_CONFIGS),
    ("prefill 4x2048 over 8192 cached", "bf16", "triton", {"LONGEST_FIRST": (False, True)}),
]
# --sweep defaults: every case once as the package is (an A/B of two checkouts: PYTHONPATH=<tree>).
DEFAULT_CASES = [(name, kv, "triton" if name.startswith("prefill") else "trtllm", [{}])
                 for name in (*DECODE_CASE_NAMES, *PREFILL_CASE_NAMES)
                 for kv in (("bf16", "fp8") if name == "decode 64x16384" else ("bf16",))]
# --sweep splits: the decode cases at each split count (MAX_SPLITS caps the heuristic's).
SPLITS_CASES = [
    ("decode 32x4096", "bf16", "trtllm", {"MAX_SPLITS": (1, 2, 3, 4, 5, 6)}),
    ("decode 128x2048", "bf16", "trtllm", {"MAX_SPLITS": (1, 2, 3)}),
    ("decode 64x16384", "bf16", "trtllm", {"MAX_SPLITS": (1, 2, 3, 4)}),
    ("decode 64x16384", "fp8", "trtllm", {"MAX_SPLITS": (1, 2, 3, 4)}),
    ("decode ragged 64x[256,8192]", "bf16", "trtllm", {"MAX_SPLITS": (2, 3, 4, 6, 8)}),
]
WIDE_PREFILL = dict(PREFILL_BLOCK_M=256, PREFILL_NUM_WARPS=8)  # two warpgroups, one program an SM
# --sweep prefill: the prefill tiles (128 rows, 4 warps) against 256 rows with 8 warps and 128 rows
# with 8 warps.
PREFILL_ROWS = [{}, WIDE_PREFILL, dict(PREFILL_NUM_WARPS=8), dict(WIDE_PREFILL, NUM_STAGES=2)]
PREFILL_ROWS_CASES = [(name, "bf16", "triton", PREFILL_ROWS) for name in (
    "prefill 8x2048", "prefill 4x2048 over 8192 cached", "prefill 1x16384")]
# --sweep stages: deeper K/V pipelines. The block-table load that feeds each K/V tile takes part
# of num_stages, so K/V get fewer shared-memory buffers than stages (sm_90, Triton 3.7's compiler):
# decode 4 -> 1, 5 -> 2, 7 -> 3 buffers (39, 72, 105 KB: 5, 3, 2 programs an SM); prefill
# 3 -> 2, 5 -> 3 (131, 164 KB).
DECODE_STAGES = [{}, dict(DECODE_NUM_STAGES=5, DECODE_RESIDENT_PER_SM=3),
                 dict(DECODE_NUM_STAGES=7, DECODE_RESIDENT_PER_SM=2)]
STAGES_CASES = [
    *[(name, "bf16", "trtllm", DECODE_STAGES) for name in DECODE_CASE_NAMES],
    ("decode 64x16384", "fp8", "trtllm", {"DECODE_NUM_STAGES_FP8": (5, 7)}),
    ("decode 32x4096", "fp8", "trtllm", {"DECODE_NUM_STAGES_FP8": (5, 7)}),
    *[(name, "bf16", "triton", {"NUM_STAGES": (3, 4, 5)}) for name in PREFILL_CASE_NAMES],
]
# --sweep warps: fewer registers a thread. Prefill (256-row tiles on 8 warps, the default when it
# ran): 16 warps give each warpgroup 64 of the 256 rows (128 registers, no spills with 32-key tiles,
# against 255 and spills at 8 warps / 64 keys); 32-key tiles at 8 warps: 248, no spills. Decode: 2
# warps a program (fewer cross-warp softmax reductions), 146 registers at 32 keys (7 programs an
# SM), 217 at 64 (4).
PREFILL_WARPS = [dict(WIDE_PREFILL, **config) for config in (
    {}, dict(TILE_N_GPU=32), dict(TILE_N_GPU=32, NUM_STAGES=4), dict(PREFILL_NUM_WARPS=16),
    dict(PREFILL_NUM_WARPS=16, NUM_STAGES=4), dict(PREFILL_NUM_WARPS=16, TILE_N_GPU=32),
    dict(PREFILL_NUM_WARPS=16, TILE_N_GPU=32, NUM_STAGES=4))]
DECODE_WARPS = [{}, dict(DECODE_NUM_WARPS=2, DECODE_TILE_N_GPU=32, DECODE_RESIDENT_PER_SM=7),
                dict(DECODE_NUM_WARPS=2, DECODE_TILE_N_GPU=64, DECODE_RESIDENT_PER_SM=4)]
WARPS_CASES = [
    *[(name, "bf16", "triton", PREFILL_WARPS) for name in PREFILL_CASE_NAMES],
    *[(name, "bf16", "trtllm", DECODE_WARPS) for name in DECODE_CASE_NAMES],
]
# --sweep small-grid: batch-1 decode is a chain of dependent instructions in each program (256
# programs, under one wave): 8 warps split each program's tile work, at half the resident programs.
SMALL_GRID_CASES = [(name, "bf16", backend, {"DECODE_NUM_WARPS": (4, 8), "DECODE_TILE_N_GPU": (64, 128)})
                    for name, backend in (("decode 1x4096", "trtllm"), ("decode 1x4096", "triton"))]
# --sweep fp8-splits: 2 fp8 decode programs fit an SM (4 bf16 ones), so 8 programs an SM are 4
# waves for fp8 (the target before) and 2 for bf16; the target is now 2 waves for both.
FP8_SPLITS_CASES = [(name, "fp8", "trtllm", {"SPLIT_TARGET_WAVES": (4, 2)}) for name in DECODE_CASE_NAMES]
# --sweep small-grid-stages: at batch 1 (32 splits) a program walks 2 bf16 tiles (1 fp8 tile), so
# the K/V pipeline's prologue buys nothing: on sm_90 (Triton 3.6) 2 stages take the bf16 kernel from
# 2160 to 1712 instructions and 123 to 94 registers (3 and 4 stages build the same kernel); fp8 at
# 4 stages has 4152 against 5280 at 5, and measured 14.0 vs 15.5 us ("fp8_decode_tiles").
SMALL_GRID_STAGES_CASES = [
    *[(name, "bf16", backend, {"DECODE_NUM_STAGES": (4, 2)}) for name, backend in (
        ("decode 1x4096", "trtllm"), ("decode 1x4096", "triton"), ("decode 32x4096", "trtllm"))],
    *[(name, "fp8", "trtllm", {"DECODE_NUM_STAGES_FP8": (5, 4, 2)}) for name in ("decode 1x4096", "decode 32x4096")],
]
# --sweep one-loop: decode splits walked in one pipelined loop (the last, masked tile prefetched with
# the rest; on sm_90, Triton 3.6: batch-1 decode 2160 -> 1320 instructions, 123 -> 96 registers)
# never, always, or as the package does (splits of at most ONE_LOOP_MAX_TILES tiles).
ONE_LOOP = {"ONE_LOOP_MAX_TILES": (0, 10**6, 4)}
ONE_LOOP_CASES = [
    *[(name, kv, "trtllm", ONE_LOOP) for kv in ("bf16", "fp8") for name in DECODE_CASE_NAMES],
    *[(name, "bf16", "triton", ONE_LOOP) for name in ("decode 1x4096", "decode ragged 64x[256,8192]")],
]
# --sweep small-grid-merge: batch-1 decode with one-loop splits, whose programs are shorter: the
# in-kernel merge of all 32 splits (it lost to the reduction launch with two-loop splits), 16
# splits (merged either way), 64 splits, 32-key tiles. Run when the defaults were 32 splits
# (SPLIT_MIN_KEYS 128 for both dtypes, MAX_SPLITS 32); they are now 64 bf16 and 16 fp8 splits,
# so the first row here is the adopted choice and the others are measured against it.
SMALL_GRID_MERGE = [{}, dict(FUSED_MAX_SPLITS=32), dict(SPLIT_MIN_KEYS=256, SPLIT_MIN_KEYS_FP8=256),
                    dict(SPLIT_MIN_KEYS=256, SPLIT_MIN_KEYS_FP8=256, FUSED_MAX_SPLITS=16),
                    dict(SPLIT_MIN_KEYS=128, SPLIT_MIN_KEYS_FP8=128, MAX_SPLITS=32), dict(DECODE_TILE_N_GPU=32)]
SMALL_GRID_MERGE_CASES = [("decode 1x4096", kv, "trtllm", SMALL_GRID_MERGE) for kv in ("bf16", "fp8")]
# --sweep prefill-lengths: 16,384 causal prefill tokens as 16, 8, 4, 2 or 1 sequences (the same
# query blocks, 2,056-2,176 of them, walking 8 to 128 key tiles on average), to split prefill
# time into a cost per query block and a cost per key tile (8x2048 runs at 72% of 1x16384's rate).
PREFILL_SPLITS = (16, 8, 4, 2, 1)
EXTRA_CASES = [bench.Case(f"prefill {n}x{16384 // n}", "prefill", (16384 // n,) * n, (16384 // n,) * n)
               for n in PREFILL_SPLITS if f"prefill {n}x{16384 // n}" not in {c.name for c in bench.CASES}]
PREFILL_LENGTHS_CASES = [(f"prefill {n}x{16384 // n}", "bf16", "triton", [{}, dict(LONGEST_FIRST=False)])
                         for n in PREFILL_SPLITS]
# --sweep pdl: programmatic dependent launch off and on, twice, for every benchmark case (a graph
# replays many calls back to back: each kernel launches while the one before it drains).
PDL = [dict(PROGRAMMATIC_LAUNCH=False), dict(PROGRAMMATIC_LAUNCH=True)] * 2
PDL_CASES = [(name, kv, backend, PDL) for name, kv, backend, _ in DEFAULT_CASES] + [
    (name, "bf16", "triton", PDL) for name in ("decode 1x4096", "decode 32x4096")]
# --sweep order-pdl: query blocks longest-first or in order (chosen with 128-row prefill tiles and
# ordinary launches), twice, every benchmark case; and batch-1 decode's split counts and in-kernel
# merges again, now that the reduction launch starts early.
ORDER = [dict(LONGEST_FIRST=True), dict(LONGEST_FIRST=False)] * 2
SMALL_GRID_PDL = [{}, dict(FUSED_MAX_SPLITS=64), dict(SPLIT_MIN_KEYS=128, SPLIT_MIN_KEYS_FP8=128, MAX_SPLITS=32),
                  dict(SPLIT_MIN_KEYS=128, SPLIT_MIN_KEYS_FP8=128, MAX_SPLITS=32, FUSED_MAX_SPLITS=32),
                  dict(SPLIT_MIN_KEYS=256, FUSED_MAX_SPLITS=16)] * 2
ORDER_PDL_CASES = [(name, kv, backend, ORDER) for name, kv, backend, _ in DEFAULT_CASES] + [
    ("decode 1x4096", kv, "trtllm", SMALL_GRID_PDL) for kv in ("bf16", "fp8")]
# --sweep pdl-small-grid: batch-1 decode with ordinary and programmatic launches, each with the
# in-kernel merge up to 8 or 16 splits (fp8 takes 16 splits); and the query-block order again on
# the prefill cases, three times (the prefix case's times are bimodal).
PDL_SMALL_GRID = [dict(PROGRAMMATIC_LAUNCH=p, FUSED_MAX_SPLITS=f) for p in (False, True) for f in (8, 16)] * 2
PDL_SMALL_GRID_CASES = [("decode 1x4096", kv, backend, PDL_SMALL_GRID) for kv, backend in (
    ("bf16", "trtllm"), ("fp8", "trtllm"), ("bf16", "triton"), ("fp8", "triton"))] + [
    (name, "bf16", "triton", [dict(LONGEST_FIRST=True), dict(LONGEST_FIRST=False)] * 3) for name in PREFILL_CASE_NAMES]
def both_kernels(constant: str, value) -> dict:
    """A per-kernel constant (a dict by kernel) set to ``value`` for both attention kernels."""
    return {constant: {"store_and_decode": value, "paged_attention": value}}


# --sweep launch-next: the next kernel allowed to launch when every program has started, or only
# after the key loops (both kernels alike); batch 1 with the in-kernel merge up to 8 or 16 splits
# too (fp8 takes 16).
def launch_next(early: bool) -> dict:
    return both_kernels("EARLY_LAUNCH_NEXT", early)


LAUNCH_NEXT = [launch_next(e) for e in (True, False)] * 2
LAUNCH_NEXT_CASES = [("decode 1x4096", kv, "trtllm", [dict(launch_next(e), FUSED_MAX_SPLITS=f) for e in (True, False)
                                                      for f in (8, 16)] * 2) for kv in ("bf16", "fp8")] + [
    (name, kv, backend, LAUNCH_NEXT) for name, kv, backend, _ in DEFAULT_CASES if name != "decode 1x4096"] + [
    ("decode 1x4096", kv, "triton", LAUNCH_NEXT) for kv in ("bf16", "fp8")]
# --sweep pdl-check: the adopted launch choices (store_and_decode lets the next kernel launch early
# and merges up to 16 splits in-kernel; the unified kernel after its key loop, up to 8) against
# ordinary launches, twice, where the full benchmark moved: the unified kernel's fp8 decode.
PDL_CHECK = [dict(PROGRAMMATIC_LAUNCH=False), {}] * 2
PDL_CHECK_CASES = [(name, "fp8", "triton", PDL_CHECK) for name in DECODE_CASE_NAMES] + [
    ("decode 1x4096", kv, backend, PDL_CHECK) for kv, backend in (("bf16", "triton"), ("fp8", "trtllm"))]
# --sweep fp8-decode: every decode case with an fp8 cache, as the package runs it (an A/B of cache memory
# orders: run it with --token-major-pages and without, alternately).
FP8_DECODE_CASES = [(name, "fp8", "trtllm", [{}]) for name in DECODE_CASE_NAMES]
# --sweep heads-first: programs in head-fastest order or every block of a head first, both kernels
# alike, twice, for every benchmark case and the unified kernel's decode.
HEADS_FIRST_CONFIGS = [both_kernels("HEADS_FIRST", first) for first in (False, True)] * 2
HEADS_FIRST_CASES = [(name, kv, backend, HEADS_FIRST_CONFIGS) for name, kv, backend, _ in DEFAULT_CASES] + [
    (name, "bf16", "triton", HEADS_FIRST_CONFIGS) for name in DECODE_CASE_NAMES]
# --sweep both-kernels: every benchmark case once as the package is, and the unified kernel's decode
# too (an A/B of checkouts that change both kernels).
BOTH_KERNELS_CASES = [(name, kv, backend, [{}]) for name, kv, backend, _ in HEADS_FIRST_CASES]
# --sweep short-split-tiles: batch-1 decode (splits of one 64-key tile) with 64-key tiles or two of
# SHORT_SPLIT_TILE_N keys, both kernels, three times.
SHORT_SPLIT_TILES_CASES = [("decode 1x4096", "bf16", backend, [dict(SHORT_SPLIT_TILE_N=64), {}] * 3)
                           for backend in ("trtllm", "triton")]
# --sweep small-grid-tiles: batch-1 bf16 decode with two-tile splits against deeper pipelines,
# 16-key tiles (one page a tile on pages of 16) and 32 splits of four 32-key tiles, three times.
SMALL_GRID_TILES = [{}, dict(DECODE_NUM_STAGES=5), dict(DECODE_NUM_STAGES=6), dict(SHORT_SPLIT_TILE_N=16),
                    dict(SPLIT_MIN_KEYS=128, DECODE_TILE_N_GPU=32),
                    dict(SPLIT_MIN_KEYS=128, DECODE_TILE_N_GPU=32, DECODE_NUM_STAGES=6)] * 3
SMALL_GRID_TILES_CASES = [("decode 1x4096", "bf16", backend, SMALL_GRID_TILES) for backend in ("trtllm", "triton")]
# --sweep fp8-64-key-tiles: fp8 decode in 64-key tiles, which 32-bit offsets bring to 168 registers
# (three programs an SM; 128-key tiles take 227-243, two), with the split count assuming two or
# three resident programs, against the defaults, twice.
FP8_64_KEY_TILES = [{}, dict(DECODE_TILE_N_GPU_FP8=64, DECODE_RESIDENT_PER_SM_FP8=3),
                    dict(DECODE_TILE_N_GPU_FP8=64), dict(DECODE_TILE_N_GPU_FP8=64, DECODE_RESIDENT_PER_SM_FP8=3,
                                                         DECODE_NUM_STAGES_FP8=4)] * 2
FP8_64_KEY_TILES_CASES = [(name, "fp8", "trtllm", FP8_64_KEY_TILES) for name in DECODE_CASE_NAMES]
# --sweep prefill-two-programs: 128-row prefill tiles of one warpgroup (the default: 255 registers,
# 98.5 KB of shared memory on sm_90, two programs an SM, each overlapping the other's prologue,
# diagonal tile and epilogue) against 256 rows on two warpgroups (131 KB: one an SM) and 128 rows
# with 2 stages, twice.
# The same for fp8 K/V, whose prefill takes its own stage count (NUM_STAGES_FP8, 2 since this sweep).
PREFILL_TWO_PROGRAMS = [WIDE_PREFILL, {}, dict(NUM_STAGES=2)] * 2
PREFILL_TWO_PROGRAMS_FP8 = [dict(WIDE_PREFILL, NUM_STAGES_FP8=3), dict(NUM_STAGES_FP8=3), {}] * 2
PREFILL_TWO_PROGRAMS_CASES = [(name, "bf16", "triton", PREFILL_TWO_PROGRAMS)
                              for name in (*PREFILL_CASE_NAMES, "prefill 16x1024")] + [
    (name, "fp8", "triton", PREFILL_TWO_PROGRAMS_FP8) for name in PREFILL_CASE_NAMES]
# --sweep prefill-one-warpgroup: around the 128-row default, twice: the 256-row tile again, query
# blocks in order, 32-key tiles (254 registers, no spills, 66 KB), and 64-row tiles (168 registers,
# 83 KB: two an SM; with 32-key tiles and 4 stages 152 registers and 49 KB: three an SM).
PREFILL_ONE_WARPGROUP = [{}, WIDE_PREFILL, dict(LONGEST_FIRST=False), dict(TILE_N_GPU=32, NUM_STAGES=4),
                         dict(PREFILL_BLOCK_M=64), dict(PREFILL_BLOCK_M=64, TILE_N_GPU=32, NUM_STAGES=4)] * 2
PREFILL_ONE_WARPGROUP_CASES = [(name, "bf16", "triton", PREFILL_ONE_WARPGROUP)
                               for name in (*PREFILL_CASE_NAMES, "prefill 16x1024")]
# --sweep decode-32-key-tiles: bf16 decode walking 32-key tiles with two or three K/V buffers (on
# sm_90, Triton 3.6: 5 stages 94 registers and 38 KB, five programs an SM; 4 stages 80 and 22 KB,
# six; 7 stages 96 and 55 KB, four) against 64-key tiles with one buffer (102, 39 KB), twice.
DECODE_32_KEY_TILES = [{}, dict(DECODE_TILE_N_GPU=32, DECODE_NUM_STAGES=5, DECODE_RESIDENT_PER_SM=5),
                       dict(DECODE_TILE_N_GPU=32, DECODE_RESIDENT_PER_SM=6),
                       dict(DECODE_TILE_N_GPU=32, DECODE_NUM_STAGES=7)] * 2
DECODE_32_KEY_TILES_CASES = [(name, "bf16", "trtllm", DECODE_32_KEY_TILES) for name in DECODE_CASE_NAMES]
# --sweep prefill-order: with two prefill programs an SM, the unified kernel's program order again
# (a query block's KV heads on consecutive programs or every block of a head first; longest
# blocks first or in order), three times.
PREFILL_ORDER = [{}, dict(HEADS_FIRST={"store_and_decode": True, "paged_attention": False}),
                 dict(LONGEST_FIRST=False)] * 3
PREFILL_ORDER_CASES = [(name, "bf16", "triton", PREFILL_ORDER) for name in (*PREFILL_CASE_NAMES, "prefill 16x1024")]
# --sweep large-head-prefill (with --head-size 192 or 256): prefill of 256-wide heads (192 padded)
# in 128 rows on 4 warps and 32-key tiles, as before the large-head rule (1,240 bytes of stack on
# sm_90, Triton 3.6); on 8 warps (221-224 registers, 131 KB, one program an SM), with 64-key tiles
# (the rule: 197 KB), or in 64 rows on 4 warps (246 registers, 98 KB, two an SM), twice. (Run before
# the rule's constants existed, as PREFILL_NUM_WARPS / TILE_N_GPU_LARGE_HEAD; the same configurations.)
OLD_LARGE_HEAD_PREFILL = dict(PREFILL_NUM_WARPS_LARGE_HEAD=4, PREFILL_TILE_N_LARGE_HEAD=32)
LARGE_HEAD_PREFILL = [OLD_LARGE_HEAD_PREFILL, dict(PREFILL_TILE_N_LARGE_HEAD=32), {},
                      dict(OLD_LARGE_HEAD_PREFILL, PREFILL_BLOCK_M=64)] * 2
LARGE_HEAD_PREFILL_CASES = [(name, "bf16", "triton", LARGE_HEAD_PREFILL) for name in PREFILL_CASE_NAMES]
# --sweep large-head-prefill-fp8 (with --head-size 192): the same for fp8 K/V: one warpgroup in 32-key
# tiles (1,584 bytes of stack), two in 64-key tiles and 2 stages (264), in 32-key tiles and 2 or 3
# stages (56, 32), twice.
LARGE_HEAD_PREFILL_FP8 = [OLD_LARGE_HEAD_PREFILL, {},
                          dict(PREFILL_TILE_N_LARGE_HEAD=32), dict(PREFILL_TILE_N_LARGE_HEAD=32, NUM_STAGES_FP8=3)] * 2
LARGE_HEAD_PREFILL_FP8_CASES = [(name, "fp8", "triton", LARGE_HEAD_PREFILL_FP8) for name in PREFILL_CASE_NAMES]
# --sweep large-head-decode (with --head-size 192 or 256): decode of 256-wide heads in 32-key tiles
# (bf16 156 registers and 42 KB on sm_90, fp8 188 and 42 KB) against 64-key ones (168 and 76 KB,
# 255 and 76 KB), both kernels, twice. (Run when both head sizes took 32 keys, as {} against
# TILE_N_GPU_LARGE_HEAD=64; the same configurations.)
LARGE_HEAD_DECODE = [dict(DECODE_TILE_N_HEAD_192=32, TILE_N_GPU_LARGE_HEAD=32),
                     dict(DECODE_TILE_N_HEAD_192=64, TILE_N_GPU_LARGE_HEAD=64)] * 2
LARGE_HEAD_DECODE_CASES = [(name, kv, "trtllm", LARGE_HEAD_DECODE) for kv in ("bf16", "fp8")
                           for name in DECODE_CASE_NAMES] + [("decode 32x4096", "bf16", "triton", LARGE_HEAD_DECODE)]
# --sweep padded-head-decode (with --head-size 80, 96 or 112): bf16 decode of heads padded to 128-wide
# tiles, whose time hardly falls with their bytes, in 128-key tiles (128 registers, 74 KB on sm_90:
# three programs an SM) with the split count assuming three or four resident, against 64-key ones,
# twice.
PADDED_HEAD_DECODE = [{}, dict(DECODE_TILE_N_GPU=128, DECODE_RESIDENT_PER_SM=3), dict(DECODE_TILE_N_GPU=128)] * 2
PADDED_HEAD_DECODE_CASES = [(name, "bf16", "trtllm", PADDED_HEAD_DECODE) for name in DECODE_CASE_NAMES]
# --sweep large-head-decode-warps (with --head-size 256 or 192): decode of 256-wide heads on 8 warps
# (head 256: bf16 128 registers, two programs an SM, against 156 and three; fp8 128 against 187), in
# 32- and 64-key tiles, twice.
EIGHT_DECODE_WARPS = dict(DECODE_NUM_WARPS=8, DECODE_NUM_WARPS_FP8=8)
LARGE_HEAD_DECODE_WARPS = [{}, EIGHT_DECODE_WARPS, dict(EIGHT_DECODE_WARPS, TILE_N_GPU_LARGE_HEAD=64)] * 2
LARGE_HEAD_DECODE_WARPS_CASES = [(name, kv, "trtllm", LARGE_HEAD_DECODE_WARPS) for kv in ("bf16", "fp8")
                                 for name in DECODE_CASE_NAMES]
# --sweep mqa-splits (with --kv-heads 1): decode where 32 query heads share one KV head, whose split
# partials (32 rows of fp32 a split) cost as much traffic as a quarter of the K/V at the default
# split counts: fewer splits (SPLIT_TARGET_WAVES 2 -> 0.5, 0.25, 0.125), both cache dtypes, twice.
MQA_SPLITS = [{}, dict(SPLIT_TARGET_WAVES=0.5), dict(SPLIT_TARGET_WAVES=0.25), dict(SPLIT_TARGET_WAVES=0.125)] * 2
MQA_SPLITS_CASES = [(name, kv, "trtllm", MQA_SPLITS) for kv in ("bf16", "fp8") for name in DECODE_CASE_NAMES]
# --sweep split-partial-cap (with --kv-heads 1, 2 or 4): the split cap by partial traffic
# (SPLIT_MAX_PARTIAL_SHARE, the default 0.1) against no cap and the share 0.15, three times; as
# taken it moves MQA's 32x4096 and 128x2048 (bf16 33 -> 6 and 8 -> 3 splits, fp8 16 -> 5 and 4 -> 2).
# (Its second round ran before the one-wave condition, when 0.1 also moved MQA's ragged batch,
# 16 -> 12, and 32x4096 with 16 query heads a KV head, bf16 16 -> 12, fp8 8 -> 6.) "old" also turns
# off the fine fp8 splits of small grids (SMALL_GRID_FILL), which take batch-1 fp8 with 1, 2 or 4 KV
# heads from 16 to 64 splits of one 64-key tile.
OLD_SPLITS = dict(SPLIT_MAX_PARTIAL_SHARE=0, SMALL_GRID_FILL=0)
SPLIT_PARTIAL_CAP = [OLD_SPLITS, {}, dict(SPLIT_MAX_PARTIAL_SHARE=0.15)] * 3
SPLIT_PARTIAL_CAP_CASES = [(name, kv, "trtllm", SPLIT_PARTIAL_CAP) for kv in ("bf16", "fp8")
                           for name in DECODE_CASE_NAMES] + [
    (name, "bf16", "triton", SPLIT_PARTIAL_CAP) for name in DECODE_CASE_NAMES] + [
    ("decode 1x4096", "fp8", "triton", SPLIT_PARTIAL_CAP)]
# --sweep fp8-min-keys (with --kv-heads 1, 2, 4 or 8; run before SMALL_GRID_FILL existed): batch-1
# fp8 decode, whose splits held at least two 128-key tiles (SPLIT_MIN_KEYS_FP8 256: 16 splits of
# 4096 keys, 16 programs on one KV head), against one tile (128), half a tile (64) and 64-key tiles
# of 64 keys, twice.
FP8_MIN_KEYS = [dict(SMALL_GRID_FILL=0), dict(SMALL_GRID_FILL=0, SPLIT_MIN_KEYS_FP8=128),
                dict(SMALL_GRID_FILL=0, SPLIT_MIN_KEYS_FP8=64, SHORT_SPLIT_TILE_N_FP8=128),
                dict(SMALL_GRID_FILL=0, SPLIT_MIN_KEYS_FP8=64)] * 2
FP8_MIN_KEYS_CASES = [("decode 1x4096", "fp8", backend, FP8_MIN_KEYS) for backend in ("trtllm", "triton")]
# --sweep fused-merge-splits (with --kv-heads 1 or 2): with many query rows a KV head the last split's
# in-kernel merge reads splits x rows partials alone (MQA 64x16384: 16 splits of 32 rows, 256 KB);
# the merge in the kernel up to 16/8 splits, 4, or never (the reduction launch), three times. (Run
# before FUSED_MERGE_MAX_ROWS existed, when {} merged up to 16/8 splits whatever their rows.)
FUSED_MERGE_SPLITS = [{}, both_kernels("FUSED_MAX_SPLITS", 4), both_kernels("FUSED_MAX_SPLITS", 1)] * 3
FUSED_MERGE_SPLITS_CASES = [(name, kv, "trtllm", FUSED_MERGE_SPLITS) for kv in ("bf16", "fp8")
                            for name in DECODE_CASE_NAMES] + [
    (name, "bf16", "triton", FUSED_MERGE_SPLITS) for name in DECODE_CASE_NAMES[1:3]]


def uniform_decode_cases(shapes, query_len: int = 1) -> list:
    """Decode-shaped cases of ``batch`` sequences of ``context`` keys each, ``query_len`` new tokens a
    sequence, for every (batch, context) of ``shapes``: "decode BxN", or "spec BxN qQ" for several."""
    name = "decode {}x{}" if query_len == 1 else f"spec {{}}x{{}} q{query_len}"
    return [bench.Case(name.format(b, n), "decode", (query_len,) * b, (n,) * b) for b, n in shapes]


# --sweep split-cap-reach: shapes the split rules of the MQA round move at the benchmark's 8 KV heads
# without having been timed there (both rules against neither, three times): spec-decode buckets of
# 4 tokens a sequence, whose 16 rows a KV head bring the partial cap in (bf16 b2x4096 64 -> 12
# splits, b4x2048 32 -> 6, b8x2048 16 -> 6, b16x1024 8 -> 3), and short fp8 decode at small batch,
# which small-grid fill splits finely (b1x2048 8 -> 32, b2x1024 4 -> 16, b1x512 2 -> 8). (Run before
# SPLIT_CAP_MIN_KEYS_PER_SM existed, which it led to: {} now leaves b1-b4 of the spec cases uncapped.)
SPEC_CASES = uniform_decode_cases(((1, 8192), (2, 4096), (4, 2048), (8, 2048), (16, 1024)), query_len=4)
SHORT_FP8_CASES = uniform_decode_cases(((1, 2048), (2, 1024), (1, 512)))
EXTRA_CASES += SPEC_CASES + SHORT_FP8_CASES
SPLIT_CAP_REACH = [OLD_SPLITS, {}] * 3
# (Spec-decode steps take the unified kernel on both backends.)
SPLIT_CAP_REACH_CASES = [(c.name, "bf16", "triton", SPLIT_CAP_REACH) for c in SPEC_CASES] + [
    (c.name, "fp8", backend, SPLIT_CAP_REACH) for c in SHORT_FP8_CASES for backend in ("trtllm", "triton")]
# --sweep split-cap-steps (--cases spec at 8 KV heads, then --kv-heads 1 --cases decode):
# the partial cap only for steps of at least SPLIT_CAP_MIN_KEYS_PER_SM keys an SM ({}) against the
# cap wherever it applied before (0), three times: spec decode at 496 keys an SM uncapped again
# (b2x4096 12 -> 64 splits, b4x2048 6 -> 32, b1x8192 25 -> 64), b8x2048 (993) capped either way;
# MQA at 496 keys an SM uncapped too (bf16 16x4096 9 -> 64, 8x8192 17 -> 64; fp8 16x4096 9 -> 16),
# 32x4096 (993) capped either way.
SPLIT_CAP_STEPS = [{}, dict(SPLIT_CAP_MIN_KEYS_PER_SM=0)] * 3
MQA_STEP_CASES = uniform_decode_cases(((16, 4096), (8, 8192)))
EXTRA_CASES += MQA_STEP_CASES
SPLIT_CAP_STEPS_CASES = [(c.name, "bf16", "triton", SPLIT_CAP_STEPS) for c in SPEC_CASES[:4]] + [
    (c.name, kv, "trtllm", SPLIT_CAP_STEPS) for c in MQA_STEP_CASES for kv in ("bf16", "fp8")] + [
    ("decode 32x4096", kv, "trtllm", SPLIT_CAP_STEPS) for kv in ("bf16", "fp8")]
SWEEPS = {"tiles": CASES, "fused": FUSED_CASES, "fp8-dot": FP8_DOT_CASES, "schedule": SCHEDULE_CASES,
          "defaults": DEFAULT_CASES, "splits": SPLITS_CASES, "prefill": PREFILL_ROWS_CASES,
          "stages": STAGES_CASES, "warps": WARPS_CASES,
          "small-grid": SMALL_GRID_CASES, "fp8-splits": FP8_SPLITS_CASES,
          "small-grid-stages": SMALL_GRID_STAGES_CASES, "one-loop": ONE_LOOP_CASES,
          "small-grid-merge": SMALL_GRID_MERGE_CASES, "prefill-lengths": PREFILL_LENGTHS_CASES, "pdl": PDL_CASES,
          "order-pdl": ORDER_PDL_CASES, "pdl-small-grid": PDL_SMALL_GRID_CASES,
          "launch-next": LAUNCH_NEXT_CASES, "pdl-check": PDL_CHECK_CASES,
          "fp8-decode": FP8_DECODE_CASES, "heads-first": HEADS_FIRST_CASES,
          "both-kernels": BOTH_KERNELS_CASES, "short-split-tiles": SHORT_SPLIT_TILES_CASES,
          "fp8-64-key-tiles": FP8_64_KEY_TILES_CASES, "small-grid-tiles": SMALL_GRID_TILES_CASES,
          "prefill-two-programs": PREFILL_TWO_PROGRAMS_CASES,
          "prefill-one-warpgroup": PREFILL_ONE_WARPGROUP_CASES,
          "decode-32-key-tiles": DECODE_32_KEY_TILES_CASES, "prefill-order": PREFILL_ORDER_CASES,
          "large-head-prefill": LARGE_HEAD_PREFILL_CASES, "large-head-prefill-fp8": LARGE_HEAD_PREFILL_FP8_CASES,
          "large-head-decode": LARGE_HEAD_DECODE_CASES, "padded-head-decode": PADDED_HEAD_DECODE_CASES,
          "large-head-decode-warps": LARGE_HEAD_DECODE_WARPS_CASES, "mqa-splits": MQA_SPLITS_CASES,
          "split-partial-cap": SPLIT_PARTIAL_CAP_CASES, "fp8-min-keys": FP8_MIN_KEYS_CASES,
          "fused-merge-splits": FUSED_MERGE_SPLITS_CASES,
          "split-cap-reach": SPLIT_CAP_REACH_CASES, "split-cap-steps": SPLIT_CAP_STEPS_CASES}


def all_cases() -> dict:
    """The benchmark's cases and this script's diagnostic ones, by name."""
    return {c.name: c for c in (*bench.CASES, *EXTRA_CASES)}


def configurations(sweep) -> list[dict]:
    """Every combination of a ``{constant: values}`` sweep, or a list of configurations as is."""
    if isinstance(sweep, list):
        return sweep
    return [dict(zip(sweep, values)) for values in itertools.product(*sweep.values())]


def apply(config: dict, defaults: dict) -> None:
    """Set ``config`` on the kernels' module and every other swept constant back to its default
    (a configuration never inherits the previous one's constants)."""
    for k, v in {**defaults, **config}.items():
        setattr(pa, k, v)


def kernel_resources() -> list[dict]:
    """Registers, spills and shared memory of every kernel variant compiled so far (what limits
    occupancy), from Triton's in-memory cache; empty where this Triton keeps it elsewhere."""
    from compiled_attn.kernels import store_and_decode as sd

    shown = ("BLOCK_M", "TILE_N", "NUM_SPLITS", "FUSED_REDUCE", "MERGE_CHUNK", "IS_FP8", "LONGEST_FIRST")
    rows = []
    for kernel in (pa._paged_attention_kernel, sd._store_and_decode_kernel):
        names = kernel.arg_names
        try:
            compiled = [k for caches in kernel.device_caches.values() for k in caches[0].values()]
        except (AttributeError, IndexError, TypeError):
            return rows
        for k in compiled:
            try:
                k._init_handles()
                constants = {names[i[0]]: v for i, v in k.src.constants.items() if names[i[0]] in shown}
                rows.append({"kernel": kernel.fn.__name__, **constants, "num_warps": k.metadata.num_warps,
                             "num_stages": k.metadata.num_stages, "shared": k.metadata.shared,
                             "regs": k.n_regs, "spills": k.n_spills})
            except Exception as err:  # a diagnostic: never fail the sweep over it
                rows.append({"kernel": kernel.fn.__name__, "error": f"{type(err).__name__}: {err}"[:160]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default="tune.json")
    parser.add_argument("--budget-s", type=float, default=300)
    parser.add_argument("--sweep", choices=sorted(SWEEPS), default="tiles")
    parser.add_argument("--contiguous-pages", action="store_true", help="pages in order (see bench.build_workload)")
    pages = parser.add_mutually_exclusive_group()
    pages.add_argument("--head-major-pages", action="store_true",
                       help="cache memory [2, blocks, kv_heads, block_size, D] (see bench.build_workload)")
    pages.add_argument("--token-major-pages", action="store_true", help="cache memory [2, blocks, block_size, kv_heads, D]")
    parser.add_argument("--cases", default="", help="only the cases whose name contains this")
    parser.add_argument("--block-size", type=int, default=16, help="tokens a page (the benchmark's: 16)")
    parser.add_argument("--head-size", type=int, default=bench.LLAMA3_8B.head_size,
                        help="another head size than the benchmark's 128")
    parser.add_argument("--kv-heads", type=int, default=bench.LLAMA3_8B.num_kv_heads,
                        help="another KV head count than the benchmark's 8")
    parser.add_argument("--fused", action="store_true", help="the same as --sweep fused")
    parser.add_argument("--fp8-dot", action="store_true", help="the same as --sweep fp8-dot")
    args = parser.parse_args()
    sweeps = [c for c in SWEEPS["fused" if args.fused else "fp8-dot" if args.fp8_dot else args.sweep]
              if args.cases in c[0]]
    cases = all_cases()
    results = []
    for name, kv, backend, sweep in sweeps:
        deadline = time.time() + args.budget_s / len(sweeps)  # every case gets its share
        spec = bench.bench_spec(kv, args.head_size, args.kv_heads)
        pages = True if args.head_major_pages else False if args.token_major_pages else None  # None: as allocated
        workload = bench.build_workload(cases[name], spec, block_size=args.block_size, dtype=torch.bfloat16,
                                        device="cuda", contiguous_pages=args.contiguous_pages,
                                        head_major_pages=pages)
        head_major = cache_layout(workload.kv_cache) == "head_major"
        configs = configurations(sweep)
        defaults = {k: getattr(pa, k) for config in configs for k in config}
        for config in configs:
            if time.time() > deadline:
                break
            apply(config, defaults)
            row = {"case": name, "kv": kv, "backend": backend, **config}
            if args.contiguous_pages:
                row["pages"] = "contiguous"
            if args.block_size != 16:
                row["block_size"] = args.block_size
            if args.head_size != bench.LLAMA3_8B.head_size:
                row["head_size"] = args.head_size
            if args.kv_heads != bench.LLAMA3_8B.num_kv_heads:
                row["kv_heads"] = args.kv_heads
            if head_major:
                row["layout"] = "head-major"
            try:
                row["us"] = bench.time_graph(bench.backend_contender(backend)(workload), len(workload.metas))
            except Exception as err:  # a config that does not compile (shared memory) is a result
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
            results.append(row)
            print(json.dumps(row), flush=True)
        apply({}, defaults)
        del workload
        torch.cuda.empty_cache()
        with open(args.json, "w") as f:  # after every case: a cut-short run keeps what it measured
            json.dump({"card": torch.cuda.get_device_name(), "results": results}, f, indent=1)
    resources = kernel_resources()
    for row in resources:
        print(json.dumps(row))
    with open(args.json, "w") as f:
        json.dump({"card": torch.cuda.get_device_name(), "results": results, "kernels": resources}, f, indent=1)
    for name, kv, backend, _ in sweeps:
        rows = sorted((r for r in results if (r["case"], r["kv"], r["backend"]) == (name, kv, backend) and "us" in r), key=lambda r: r["us"])
        print(f"best for {name} {kv} {backend}:", *rows[:3], sep="\n  ")


if __name__ == "__main__":
    main()
