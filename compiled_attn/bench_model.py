"""``compiled-attn bench-model``: decode-step latency of a Llama-3.2-1B-shaped model
(random weights) over a paged cache — eager, ``torch.compile``, ``torch.compile`` + our CUDA
graphs — against the same weights in ``transformers`` (static cache and
``torch.compile(mode="reduce-overhead")``, as its docs recommend), at several batch sizes with a
fixed context.

Latency is host wall time per step after warm-up (median), with a device sync per step: what a
serving loop sees. The graph path's figure includes building and copying the step's metadata;
its replay alone is reported too, and so is the step run back to back with no sync between steps
(``pipelined``: a loop that keeps sampled tokens on the GPU, whose host work for the next step
overlaps the replay of this one).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch

from .graphs import BatchLayout, CUDAGraphRunner
from .metadata import AttentionMetadata
from .models import LlamaConfig, LlamaForCausalLM


def median_ms(fn: Callable[[], object], steps: int = 30, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def pipelined_ms(fn: Callable[[], object], steps: int = 30, repeats: int = 3, warmup: int = 5) -> float:
    """Per-step time of ``steps`` calls issued back to back (one sync at the end), median of repeats."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3 / steps)
    return statistics.median(times)


def ours(model: LlamaForCausalLM, batch: int, context: int, block_size: int) -> dict[str, float]:
    """Eager, compiled and compiled+graphs decode steps at ``context`` tokens per sequence."""
    blocks_per_seq = -(-(context + 1) // block_size)
    cache = model.new_cache(batch * blocks_per_seq + 1, block_size, shuffle_seed=0)
    cache.kv.normal_()
    tables = [cache.allocator.allocate(blocks_per_seq) for _ in range(batch)]
    layout = BatchLayout([1] * batch, [context + 1] * batch, tables)
    device = model.device
    ids = torch.randint(0, model.config.vocab_size, (batch,), device=device)
    positions = torch.full((batch,), context, device=device)
    meta = AttentionMetadata.build(layout.query_lens, layout.seq_lens, tables, block_size, device, max_query_len=1)
    rows = torch.arange(batch, device=device)
    results = {"eager_ms": median_ms(lambda: model(ids, positions, cache.kv, meta, rows))}
    compiled = model.compiled_step()
    results["compile_ms"] = median_ms(lambda: compiled(ids, positions, cache.kv, meta, rows))

    def step(input_ids, pos, m):
        return compiled(input_ids, pos, cache.kv, m, (m.query_start_loc[1:].long() - 1).clamp_min(0))

    runner = CUDAGraphRunner(step, token_input_specs=[((), torch.int64), ((), torch.int64)], block_size=block_size,
                             max_blocks=blocks_per_seq, max_num_seqs=batch, decode_buckets=[batch],
                             prefill_buckets=[], device=device, output_rows="seqs", num_blocks=cache.num_blocks)
    runner.capture()
    results["compile_graphs_ms"] = median_ms(lambda: runner.run([ids, positions], layout))
    results["compile_graphs_pipelined_ms"] = pipelined_ms(lambda: runner.run([ids, positions], layout))
    graph = runner._graphs[next(iter(runner._graphs))][0]
    results["graph_replay_ms"] = median_ms(graph.replay)
    results["graph_memory_MiB"] = runner.graph_memory_bytes / 2**20
    return results


def transformers_peer(hf_model, batch: int, context: int) -> tuple[float, str]:
    """One decode step of ``transformers`` with a static cache, compiled with reduce-overhead
    (falling back to the default mode if its graph trees fail); returns (ms, mode used)."""
    from transformers import StaticCache

    device = hf_model.device
    ids = torch.randint(0, hf_model.config.vocab_size, (batch, 1), device=device)
    position = torch.tensor([context], device=device)
    errors = []
    for mode in ("reduce-overhead", "default"):
        cache = StaticCache(config=hf_model.config, max_cache_len=context + 16)
        kwargs = dict(input_ids=ids, position_ids=position.expand(batch, 1), cache_position=position,
                      past_key_values=cache, use_cache=True, logits_to_keep=1)
        hf_model(**kwargs)  # the cache allocates its tensors lazily: do it outside any graph
        forward = torch.compile(hf_model.forward, mode=mode, fullgraph=True)

        def step():
            # Graph trees overwrite a replay's outputs on the next one: mark each step, copy out.
            torch.compiler.cudagraph_mark_step_begin()
            return forward(**kwargs).logits.clone()

        try:
            return median_ms(step, warmup=8), mode
        except Exception as err:  # noqa: BLE001 - try the next mode, report both if neither works
            errors.append(f"{mode}: {type(err).__name__}: {str(err).splitlines()[0][:160]}")
            torch._dynamo.reset()
    raise RuntimeError("; ".join(errors))


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench-model", help="decode-step latency of a 1B-shaped Llama vs transformers (GPU)")
    p.add_argument("--batches", default="1,8,64,256")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--backend", default="auto")
    p.add_argument("--no-peer", action="store_true", help="skip the transformers peer")
    p.add_argument("--json", default="bench_model.json")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        raise SystemExit("bench-model needs a CUDA GPU")
    import transformers

    config = LlamaConfig.preset("1b-shape")
    hf_config = transformers.LlamaConfig(
        hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim, vocab_size=config.vocab_size,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=config.tie_word_embeddings, rope_scaling=config.rope_scaling,
        rope_theta=config.rope_theta, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device("cuda"):
        hf_model = transformers.LlamaForCausalLM(hf_config).to(torch.bfloat16).eval()
    model = LlamaForCausalLM.from_hf(hf_model, backend=args.backend, device="cuda", dtype=torch.bfloat16)
    report = {"card": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
              "transformers": transformers.__version__, "backend": model.backend_name,
              "context": args.context, "command": "compiled-attn " + " ".join(sys.argv[1:]),
              "rows": []}
    with torch.no_grad():
        for batch in [int(b) for b in args.batches.split(",")]:
            row = {"batch": batch, **ours(model, batch, args.context, args.block_size)}
            if not args.no_peer:
                try:
                    row["transformers_ms"], row["transformers_mode"] = transformers_peer(hf_model, batch,
                                                                                         args.context)
                except Exception as err:  # the peer failing is a result, not a crash
                    row["transformers_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            row["tokens_per_s"] = batch / row["compile_graphs_ms"] * 1e3
            if "transformers_ms" in row:
                row["peer_tokens_per_s"] = batch / row["transformers_ms"] * 1e3
            report["rows"].append(row)
            print(json.dumps(row), flush=True)
            torch.cuda.empty_cache()
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    print(format_table(report))
    return 0


def format_table(report: dict) -> str:
    lines = [f"{report['card']}  torch {report['torch']}  transformers {report['transformers']}  "
             f"backend {report['backend']}  context {report['context']}",
             f"{'batch':>5} {'eager':>9} {'compile':>9} {'+graphs':>9} {'pipelined':>9} {'replay':>9} {'HF':>9}  "
             f"{'eager/graphs':>12} {'tok/s':>9} {'vs HF':>6}"]
    for r in report["rows"]:
        hf = r.get("transformers_ms")
        vs_hf = "" if hf is None else f"{hf / r['compile_graphs_ms']:.2f}x"
        pipelined = f"{r['compile_graphs_pipelined_ms']:.2f}m" if "compile_graphs_pipelined_ms" in r else "-"
        lines.append(
            f"{r['batch']:>5} {r['eager_ms']:>8.2f}m {r['compile_ms']:>8.2f}m {r['compile_graphs_ms']:>8.2f}m "
            f"{pipelined:>9} "
            f"{r['graph_replay_ms']:>8.2f}m {hf if hf is None else round(hf, 2)!s:>9}  "
            f"{r['eager_ms'] / r['compile_graphs_ms']:>11.1f}x {r['tokens_per_s']:>9.0f} "
            f"{vs_hf:>6}")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m compiled_attn.bench_model")
    add_parser(parser.add_subparsers())
    parsed = parser.parse_args(["bench-model", *sys.argv[1:]])
    sys.exit(parsed.func(parsed))
