"""The graph runner's host path, before and after, in one process (GPU only; not part of the package).

    python scripts/runner_host_ab.py --json out/runner_host_ab.json

A Llama-3.2-1B-shaped model (random weights, the auto backend) compiled and captured for one
decode bucket per batch size, as ``compiled-attn bench-model`` does; then ``runner.run`` timed
synced (a device sync per step) and pipelined (steps back to back), alternating two ways of
building the step's metadata on the host:

- ``lists``: with Python lists, token by token and block by block (the package before numpy);
- ``numpy``: ``AttentionMetadata.build`` as it is.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from compiled_attn.bench_model import median_ms, pipelined_ms
from compiled_attn.graphs import BatchLayout, CUDAGraphRunner
from compiled_attn.metadata import PAD_SLOT, AttentionMetadata
from compiled_attn.models import LlamaConfig, LlamaForCausalLM


def build_with_lists(query_lens, seq_lens, block_tables, block_size, device="cpu", *, num_tokens, num_seqs,
                     max_blocks, max_query_len, **_):
    """The metadata of one step as the package built it before numpy (checks included)."""
    for q, n, blocks in zip(query_lens, seq_lens, block_tables):  # the per-sequence checks it ran
        assert 0 <= q <= n <= len(blocks) * block_size and min(blocks) >= 0
    starts, slots = [0], []
    for q, n, blocks in zip(query_lens, seq_lens, block_tables):
        starts.append(starts[-1] + q)
        for pos in range(n - q, n):
            slots.append(blocks[pos // block_size] * block_size + pos % block_size)
    assert len(set(slots)) == len(slots)
    total = starts[-1]
    starts += [total] * (num_seqs - len(seq_lens))
    slots += [PAD_SLOT] * (num_tokens - total)
    rows = [list(b) + [0] * (max_blocks - len(b)) for b in block_tables]
    rows += [[0] * max_blocks] * (num_seqs - len(block_tables))
    return AttentionMetadata(
        torch.tensor(starts, dtype=torch.int32), torch.tensor(list(seq_lens) + [0] * (num_seqs - len(seq_lens)),
                                                              dtype=torch.int32),
        torch.tensor(rows, dtype=torch.int32), torch.tensor(slots, dtype=torch.int64), max_query_len)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1,8,64,256")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default="runner_host_ab.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig.preset("1b-shape"), device="cuda", dtype=torch.bfloat16)
    compiled = model.compiled_step()
    numpy_build = AttentionMetadata.__dict__["build"]  # the classmethod itself
    rows = []
    with torch.no_grad():
        for batch in [int(b) for b in args.batches.split(",")]:
            blocks_per_seq = -(-(args.context + 1) // 16)
            cache = model.new_cache(batch * blocks_per_seq + 1, 16, shuffle_seed=0)
            tables = [cache.allocator.allocate(blocks_per_seq) for _ in range(batch)]
            layout = BatchLayout([1] * batch, [args.context + 1] * batch, tables)
            ids = torch.randint(0, model.config.vocab_size, (batch,), device="cuda")
            positions = torch.full((batch,), args.context, device="cuda")

            def step(input_ids, pos, m):
                return compiled(input_ids, pos, cache.kv, m, (m.query_start_loc[1:].long() - 1).clamp_min(0))

            runner = CUDAGraphRunner(step, token_input_specs=[((), torch.int64), ((), torch.int64)], block_size=16,
                                     max_blocks=blocks_per_seq, max_num_seqs=batch, decode_buckets=[batch],
                                     prefill_buckets=[], device="cuda", output_rows="seqs")
            runner.capture()
            paths = {"lists": classmethod(lambda cls, *a, **k: build_with_lists(*a, **k)), "numpy": numpy_build}
            for _ in range(args.rounds):
                for path, build in paths.items():
                    AttentionMetadata.build = build
                    run = lambda: runner.run([ids, positions], layout)  # noqa: E731
                    row = {"batch": batch, "path": path, "synced_ms": median_ms(run), "pipelined_ms": pipelined_ms(run)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            AttentionMetadata.build = numpy_build
            graph = runner._graphs[next(iter(runner._graphs))][0]
            rows.append({"batch": batch, "path": "replay alone", "synced_ms": median_ms(graph.replay)})
            print(json.dumps(rows[-1]), flush=True)
            del runner, cache
            torch.cuda.empty_cache()
    with open(args.json, "w") as f:
        json.dump({"card": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
                   "command": "python scripts/runner_host_ab.py", "context": args.context, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
