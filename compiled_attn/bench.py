"""``compiled-attn bench``: our backends and their peers side by side on one GPU, as ratios.

Every contender is captured in a CUDA graph that runs it ``R`` times over ``R`` disjoint
copies of the workload (so the bytes touched exceed L2), replayed, and timed with CUDA events;
the figure is the median per call. Ceilings (device-to-device copy bandwidth, bf16 matmul rate)
are measured in the same run, and every figure is reported against them.

Decode bytes = K and V of every context token read once (+ q, out); prefill FLOPs = 4·H·D per
(query, visible key) pair.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .backends import BACKENDS, get_backend, select_backend
from .cache import cache_layout
from .metadata import AttentionMetadata
from .spec import AttentionSpec

# Llama-3-8B attention.
LLAMA3_8B = AttentionSpec(num_heads=32, num_kv_heads=8, head_size=128)
L2_ROTATION_BYTES = 256 << 20  # well over the H100's 50 MB L2


def bench_spec(kv: str, head_size: int = LLAMA3_8B.head_size,
               num_kv_heads: int = LLAMA3_8B.num_kv_heads) -> AttentionSpec:
    """The benchmark's attention shape with a ``"bf16"`` (the queries' dtype) or ``"fp8"`` KV cache:
    Llama-3-8B's 32 query heads, or another model's head size and KV head count."""
    spec = dataclasses.replace(LLAMA3_8B, head_size=head_size, num_kv_heads=num_kv_heads)
    return spec if kv == "bf16" else dataclasses.replace(spec, kv_cache_dtype="fp8_e4m3")


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    kind: str  # "decode" | "prefill"
    query_lens: tuple[int, ...]
    seq_lens: tuple[int, ...]


def _ragged(n: int, low: int, high: int, seed: int = 0) -> tuple[int, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randint(low, high + 1, (n,), generator=g).tolist())


CASES = [
    Case("decode 1x4096", "decode", (1,), (4096,)),
    Case("decode 32x4096", "decode", (1,) * 32, (4096,) * 32),
    Case("decode 128x2048", "decode", (1,) * 128, (2048,) * 128),
    Case("decode 64x16384", "decode", (1,) * 64, (16384,) * 64),
    Case("decode ragged 64x[256,8192]", "decode", (1,) * 64, _ragged(64, 256, 8192)),
    Case("prefill 8x2048", "prefill", (2048,) * 8, (2048,) * 8),
    Case("prefill 1x16384", "prefill", (16384,), (16384,)),
    Case("prefill 4x2048 over 8192 cached", "prefill", (2048,) * 4, (10240,) * 4),
]


def decode_bytes(case: Case, spec: AttentionSpec, kv_itemsize: int, itemsize: int) -> int:
    kv = 2 * sum(case.seq_lens) * spec.num_kv_heads * spec.head_size * kv_itemsize
    return kv + 2 * sum(case.query_lens) * spec.num_heads * spec.head_size * itemsize


def prefill_flops(case: Case, spec: AttentionSpec) -> float:
    pairs = sum(q * (n - q) + q * (q + 1) / 2 for q, n in zip(case.query_lens, case.seq_lens))
    return 4.0 * spec.num_heads * spec.head_size * pairs


@dataclasses.dataclass
class Workload:
    """``replicas`` disjoint copies of one case over a shared paged pool."""

    case: Case
    spec: AttentionSpec
    block_size: int
    kv_cache: torch.Tensor
    metas: list[AttentionMetadata]
    qkv: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    outs: list[torch.Tensor]
    scales: tuple[torch.Tensor, torch.Tensor]


def default_layout(spec: AttentionSpec, *, device: str, dtype: torch.dtype, block_size: int) -> str:
    """The cache memory order (``cache.LAYOUTS``) that the backend ``"auto"`` picks on ``device``
    allocates: the benchmark's workloads are built in it (fp8: head-major for our kernels)."""
    return select_backend(spec, name="auto", device=device, dtype=dtype, block_size=block_size).kv_cache_layout(spec)


def build_workload(case: Case, spec: AttentionSpec, *, block_size: int, dtype: torch.dtype, device: str,
                   seed: int = 0, contiguous_pages: bool = False, head_major_pages: bool | None = None) -> Workload:
    """``head_major_pages``: the cache's memory order; None: the one :func:`default_layout` names."""
    if head_major_pages is None:
        head_major_pages = default_layout(spec, device=device, dtype=dtype, block_size=block_size) == "head_major"
    g = torch.Generator(device=device).manual_seed(seed)
    kv_bytes = 2 * sum(case.seq_lens) * spec.num_kv_heads * spec.head_size * spec.cache_dtype(dtype).itemsize
    replicas = max(1, min(16, math.ceil(L2_ROTATION_BYTES / kv_bytes)))
    per_replica = [math.ceil(n / block_size) for n in case.seq_lens]
    num_blocks = replicas * sum(per_replica) + 1
    cache_dtype = spec.cache_dtype(dtype)
    if head_major_pages:  # memory [2, blocks, kv_heads, block_size, D], seen as the usual shape
        kv_cache = torch.randn(2, num_blocks, spec.num_kv_heads, block_size, spec.head_size, device=device,
                               dtype=dtype, generator=g).to(cache_dtype).transpose(2, 3)
    else:
        kv_cache = torch.randn(2, num_blocks, block_size, spec.num_kv_heads, spec.head_size, device=device,
                               dtype=dtype, generator=g).to(cache_dtype)
    # Random page order (a long-running server's pool); contiguous_pages: each sequence's pages
    # in order, one after another (to tell the paging's cost from the kernel's).
    order = (list(range(num_blocks)) if contiguous_pages
             else torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist())
    metas, qkv, outs = [], [], []
    tokens = sum(case.query_lens)
    for _ in range(replicas):
        tables = []
        for n in per_replica:
            tables.append(order[:n])
            order = order[n:]
        metas.append(AttentionMetadata.build(case.query_lens, case.seq_lens, tables, block_size, device,
                                             max_query_len=max(case.query_lens)))
        qkv.append(tuple(torch.randn(tokens, h, spec.head_size, device=device, dtype=dtype, generator=g)
                         for h in (spec.num_heads, spec.num_kv_heads, spec.num_kv_heads)))
        outs.append(torch.empty(tokens, spec.num_heads, spec.head_size, device=device, dtype=dtype))
    one = torch.ones((), device=device)
    return Workload(case, spec, block_size, kv_cache, metas, qkv, outs, (one, one))


def backend_contender(name: str) -> Callable[[Workload], Callable[[], None]]:
    backend = get_backend(name)

    def make(w: Workload) -> Callable[[], None]:
        planned = [backend.plan(m) for m in w.metas]

        def run() -> None:
            for meta, (q, k, v), out in zip(planned, w.qkv, w.outs):
                backend.forward(q, k, v, w.kv_cache, meta, out, scale=w.spec.softmax_scale, sliding_window=None,
                                logits_soft_cap=None, alibi_slopes=None, k_scale=w.scales[0], v_scale=w.scales[1])
        return run
    return make


def sdpa_dense_contender(sdpa_backend) -> Callable[[Workload], Callable[[], None]]:
    """PyTorch SDPA on a dense, padded cache ``[B, KVH, max_len, D]`` (no paging)."""
    from torch.nn.attention import sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    def make(w: Workload) -> Callable[[], None]:
        case, spec = w.case, w.spec
        b, q_len, kv_len = len(case.seq_lens), max(case.query_lens), max(case.seq_lens)
        if len(set(case.query_lens)) > 1:
            raise ValueError("dense SDPA needs equal query lengths")
        dense = []
        for (q, _, _) in w.qkv:
            queries = q.view(b, q_len, spec.num_heads, spec.head_size).transpose(1, 2)
            k = torch.randn(b, spec.num_kv_heads, kv_len, spec.head_size, device=q.device, dtype=q.dtype)
            dense.append((queries, k, torch.randn_like(k)))
        mask = None if q_len == 1 else (causal_lower_right(q_len, kv_len) if kv_len > q_len else None)
        causal = q_len > 1 and kv_len == q_len

        def run() -> None:
            with sdpa_kernel([sdpa_backend]):
                for q, k, v in dense:
                    F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
        run()  # raises here, outside capture, if this kernel cannot take the shape
        return run
    return make


def capture_graph(fn: Callable[[], None]) -> torch.cuda.CUDAGraph:
    """``fn`` captured in a CUDA graph, after two warm-up calls on a side stream (compiles,
    workspaces and lazily grown buffers happen there, outside capture)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


WARMUP_S = 0.05  # replay for at least this long before timing (see time_graph)
CARD_HEAT_S = 15.0  # matmuls before the first case (see heat_card)


def time_graph(fn: Callable[[], None], replicas: int, *, replays: int = 20) -> float:
    """Median microseconds per call of ``fn``'s ``replicas`` calls, captured in one CUDA graph.

    Before timing, the graph replays for ``WARMUP_S`` (at least 3 times): right after another
    contender's run a graph can be slow for its first tens of milliseconds, whichever contender it is
    (on an H100, right after the ``torch_native`` fp8 decode at 64x16384: 889-907 us for 20 timed
    replays that followed 3 warm-up ones, against 782-787 later; sleeping, emptying the allocator's
    cache or a fresh capture did not help, a round of replays did; not explained, BENCHMARKS.md).
    """
    graph = capture_graph(fn)
    start_s, warm = time.perf_counter(), 0
    while warm < 3 or time.perf_counter() - start_s < WARMUP_S:
        graph.replay()
        torch.cuda.synchronize()
        warm += 1
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / replicas)
    del graph
    return statistics.median(times)


def heat_card(device: str, seconds: float = CARD_HEAT_S) -> None:
    """bf16 matmuls for ``seconds``. A card's clocks fall as it warms, over tens of seconds: on an
    H100 our 8x2048 prefill took 531 us in a run's first round and 588-608 in the next two, where
    the peers timed after it moved by 1-2%. Heated first, every contender meets a warm card."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(8):
            a @ a
        torch.cuda.synchronize(device)


def measure_ceilings(device: str) -> dict[str, float]:
    """Device-to-device copy and pure-read bandwidth (GB/s) and 8192^3 bf16 matmul (TFLOP/s).

    The copy counts bytes read + written; the best of a few sizes is kept (the copy kernel's
    rate varies with size). Medians of graph replays.
    """
    copy, read = 0.0, 0.0
    for size in (1 << 28, 1 << 29, 1 << 30):  # bf16 elements: 512 MiB .. 2 GiB
        src = torch.randn(size, device=device, dtype=torch.bfloat16)
        dst = torch.empty_like(src)
        copy = max(copy, 2 * src.nbytes / time_graph(lambda: dst.copy_(src), 1) / 1e3)
        total = torch.empty((), device=device, dtype=torch.float32)
        read = max(read, src.nbytes / time_graph(lambda: torch.sum(src, dim=0, dtype=torch.float32, out=total), 1) / 1e3)
        del src, dst
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    mm_us = time_graph(lambda: a @ b, 1, replays=10)
    del a, b
    torch.cuda.empty_cache()
    return {"copy_GBps": copy, "read_GBps": read, "matmul_TFLOPs": 2 * 8192**3 / mm_us / 1e6}


def default_contenders(*, flex: bool = True) -> dict[str, Callable[[Workload], Callable[[], None]]]:
    from torch.nn.attention import SDPBackend

    from .bench_flex import flex_paged_contender

    contenders = {f"ours:{name}": backend_contender(name) for name in BACKENDS if name != "reference"}
    contenders["peer:sdpa-cudnn(dense)"] = sdpa_dense_contender(SDPBackend.CUDNN_ATTENTION)
    contenders["peer:sdpa-flash2(dense)"] = sdpa_dense_contender(SDPBackend.FLASH_ATTENTION)
    if flex:
        contenders["peer:flex(paged)"] = flex_paged_contender()
    return contenders


def run_bench(*, block_size: int = 16, dtype: torch.dtype = torch.bfloat16, cases: list[Case] | None = None,
              fp8: bool = True, flex: bool = True, device: str = "cuda", head_size: int = LLAMA3_8B.head_size,
              num_kv_heads: int = LLAMA3_8B.num_kv_heads, checkpoint: Callable[[dict], None] | None = None,
              rounds: int = 1) -> dict:
    """Measure every case for every contender that can run it; return the results as a dict.

    ``rounds``: each case's contenders are timed this many times, in turn, each round starting one
    contender later (the row: the median).
    ``checkpoint`` receives the report so far after every case (a run cut short keeps them).
    """
    if not torch.cuda.is_available():
        raise RuntimeError("compiled-attn bench needs a CUDA GPU")
    ceilings = measure_ceilings(device)
    heat_card(device)
    shape = bench_spec("bf16", head_size, num_kv_heads)
    results = []
    report = {
        "card": torch.cuda.get_device_name(device),
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "host": platform.node(),
        "shape": dataclasses.asdict(shape) | {"dtype": str(dtype), "block_size": block_size},
        "ceilings": ceilings,
        "rounds": rounds,
        "card_heat_s": CARD_HEAT_S,
        "results": results,
    }
    spec_variants = [("bf16", shape)] + ([("fp8", bench_spec("fp8", head_size, num_kv_heads))] if fp8 else [])
    for case in cases or CASES:
        for kv_label, spec in spec_variants:
            if kv_label == "fp8" and case.kind != "decode":
                continue
            try:
                workload = build_workload(case, spec, block_size=block_size, dtype=dtype, device=device)
            except torch.OutOfMemoryError as err:
                results.append({"case": case.name, "kv": kv_label, "error": f"workload: {err}"})
                continue
            layout = cache_layout(workload.kv_cache)
            runs = []  # (row, the contender's captured-step function)
            for name, make in default_contenders(flex=flex).items():
                if name.startswith("ours:"):
                    reason = BACKENDS[name[5:]].supports(spec, device=device, dtype=dtype, block_size=block_size)
                    if reason:
                        results.append({"case": case.name, "kv": kv_label, "contender": name, "skipped": reason})
                        continue
                elif kv_label == "fp8":
                    continue
                row = {"case": case.name, "kind": case.kind, "kv": kv_label, "layout": layout, "contender": name}
                try:
                    runs.append((row, make(workload)))
                except Exception as err:  # a peer that cannot take the shape is reported, not fatal
                    runs.append((_failed(row, err), None))
            # Rounds alternate over the contenders, so a drift in the card's clocks over the case
            # falls on all of them alike; each row is the median of its rounds. Each round starts one
            # contender later, so no contender is always the first timed in a round.
            timings = {id(row): [] for row, _ in runs}
            for r in range(rounds):
                shift = r % max(len(runs), 1)
                for row, run in runs[shift:] + runs[:shift]:
                    if "error" not in row:
                        try:
                            timings[id(row)].append(time_graph(run, len(workload.metas)))
                        except Exception as err:
                            _failed(row, err)
            for row, _ in runs:
                if "error" not in row:
                    _add_rates(row, timings[id(row)], case, spec, dtype, ceilings)
                results.append(row)
                print(_format_row(row), flush=True)
            del runs
            del workload
            torch.cuda.empty_cache()
            if checkpoint:
                checkpoint(report)
    return report


def _failed(row: dict, err: Exception) -> dict:
    row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
    torch.cuda.empty_cache()
    return row


def _add_rates(row: dict, times_us: list[float], case: Case, spec: AttentionSpec, dtype: torch.dtype,
               ceilings: dict) -> None:
    """``row``'s time (the median of its rounds, each listed where there were several) and what it
    achieved: GB/s of the decode's bytes or TFLOP/s of the prefill's, and their share of the ceiling."""
    us = row["us"] = statistics.median(times_us)
    if len(times_us) > 1:
        row["us_rounds"] = [round(t, 2) for t in times_us]
    if case.kind == "decode":
        gbps = decode_bytes(case, spec, spec.cache_dtype(dtype).itemsize, dtype.itemsize) / us / 1e3
        row.update(GBps=gbps, pct_copy=100 * gbps / ceilings["copy_GBps"])
    else:
        tflops = prefill_flops(case, spec) / us / 1e6
        row.update(TFLOPs=tflops, pct_matmul=100 * tflops / ceilings["matmul_TFLOPs"])


def _format_row(row: dict) -> str:
    if "us" not in row:
        return f"{row['case']:<34} {row.get('kv', ''):<5} {row.get('contender', ''):<26} {row.get('skipped') or row.get('error')}"
    rate = f"{row['GBps']:7.0f} GB/s {row['pct_copy']:5.1f}% copy" if "GBps" in row else \
        f"{row['TFLOPs']:7.1f} TFLOP/s {row['pct_matmul']:5.1f}% mm"
    return f"{row['case']:<34} {row['kv']:<5} {row['contender']:<26} {row['us']:10.1f} us  {rate}"


def format_table(report: dict) -> str:
    lines = [f"{report['card']}  torch {report['torch']}  {report['date']}",
             f"ceilings: copy {report['ceilings']['copy_GBps']:.0f} GB/s (read+write), "
             f"read-only {report['ceilings'].get('read_GBps', 0):.0f} GB/s, bf16 matmul {report['ceilings']['matmul_TFLOPs']:.0f} TFLOP/s"]
    best: dict[tuple[str, str], float] = {}
    for row in report["results"]:
        if "us" in row and row["contender"].startswith("peer:"):
            key = (row["case"], row["kv"])
            best[key] = min(best.get(key, math.inf), row["us"])
    for row in report["results"]:
        line = _format_row(row)
        peer = best.get((row["case"], "bf16"))
        if "us" in row and peer and row["contender"].startswith("ours:"):
            line += f"  {peer / row['us']:.2f}x best peer"
        lines.append(line)
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    """Bar chart of every contender's % of its ceiling per case (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["results"] if "us" in r]
    cases = list(dict.fromkeys(f"{r['case']} {r['kv']}" for r in rows))
    names = list(dict.fromkeys(r["contender"] for r in rows))
    fig, ax = plt.subplots(figsize=(12, 5))
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        xs, ys = [], []
        for j, case in enumerate(cases):
            for r in rows:
                if f"{r['case']} {r['kv']}" == case and r["contender"] == name:
                    xs.append(j + i * width)
                    ys.append(r.get("pct_copy", r.get("pct_matmul")))
        ax.bar(xs, ys, width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))], cases, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("% of ceiling (decode: copy GB/s, prefill: bf16 matmul)")
    ax.set_title(f"{report['card']} — {report['date']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def command_line(args) -> str:
    """The ``compiled-attn bench`` command that reproduces a run (also when called from Python).

    >>> import argparse
    >>> command_line(argparse.Namespace(block_size=256, no_fp8=True, no_flex=False, json="b.json"))
    'compiled-attn bench --block-size 256 --no-fp8 --json b.json'
    >>> command_line(argparse.Namespace(block_size=16, no_fp8=False, no_flex=True, json="b.json",
    ...                                 head_size=80, kv_heads=32, cases="prefill", rounds=3))
    'compiled-attn bench --block-size 16 --head-size 80 --kv-heads 32 --cases prefill --rounds 3 --no-flex --json b.json'
    """
    flags = [f"--block-size {args.block_size}"]
    if getattr(args, "head_size", LLAMA3_8B.head_size) != LLAMA3_8B.head_size:
        flags.append(f"--head-size {args.head_size}")
    if getattr(args, "kv_heads", LLAMA3_8B.num_kv_heads) != LLAMA3_8B.num_kv_heads:
        flags.append(f"--kv-heads {args.kv_heads}")
    if getattr(args, "cases", ""):
        flags.append(f"--cases {args.cases}")
    if getattr(args, "rounds", 1) != 1:
        flags.append(f"--rounds {args.rounds}")
    flags += [f for f, on in (("--no-fp8", args.no_fp8), ("--no-flex", args.no_flex)) if on]
    return " ".join(["compiled-attn bench", *flags, f"--json {args.json}"])


def main(args) -> int:
    """Entry of the CLI subcommand (``compiled-attn bench``)."""
    if args.plot_from:
        with open(args.plot_from) as f:
            report = json.load(f)
    else:
        command = command_line(args)

        def save(report: dict) -> None:
            with open(args.json, "w") as f:
                json.dump(report | {"command": command}, f, indent=1)

        cases = [case for case in CASES if args.cases in case.name]
        if not cases:
            raise SystemExit(f"no benchmark case's name contains {args.cases!r}: "
                             + ", ".join(case.name for case in CASES))
        report = run_bench(block_size=args.block_size, fp8=not args.no_fp8, flex=not args.no_flex,
                           head_size=args.head_size, num_kv_heads=args.kv_heads, cases=cases, checkpoint=save,
                           rounds=getattr(args, "rounds", 1))
        save(report)
    print(format_table(report))
    if args.png:
        try:
            plot(report, args.png)
        except ImportError:
            print("matplotlib is not installed: no plot (re-run with --plot-from JSON where it is)")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmark backends and peers on the GPU")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--head-size", type=int, default=LLAMA3_8B.head_size,
                   help="Llama-3-8B's 32 query heads at another head size (default 128)")
    p.add_argument("--kv-heads", type=int, default=LLAMA3_8B.num_kv_heads,
                   help="KV heads for the 32 query heads (default 8; 32: MHA, 1: MQA)")
    p.add_argument("--cases", default="", help="only the cases whose name contains this (e.g. prefill)")
    p.add_argument("--rounds", type=int, default=1,
                   help="time each case's contenders this many times, in turn, and report the medians")
    p.add_argument("--no-fp8", action="store_true", help="skip the fp8 KV decode variants")
    p.add_argument("--no-flex", action="store_true", help="skip the FlexAttention peer (it compiles per case)")
    p.add_argument("--json", default="bench_results.json")
    p.add_argument("--png", default=None, help="write a plot here (needs matplotlib)")
    p.add_argument("--plot-from", default=None, help="only format/plot an existing JSON report")
    p.set_defaults(func=main)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m compiled_attn.bench")
    add_parser(parser.add_subparsers())
    parsed = parser.parse_args(["bench", *sys.argv[1:]])
    sys.exit(parsed.func(parsed))
