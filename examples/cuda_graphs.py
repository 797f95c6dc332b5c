"""Capture a compiled model step per batch-size bucket, then serve steps of any composition.

    python examples/cuda_graphs.py            # CUDA graphs on a GPU; padded eager steps on a CPU

Prints the largest difference between the runner's outputs and plain eager steps.
"""

from __future__ import annotations

import argparse

import torch

import compiled_attn as ca


class Block(torch.nn.Module):
    """A user's own model piece holding an Attention layer."""

    def __init__(self, spec: ca.AttentionSpec, hidden: int, device: str):
        super().__init__()
        self.spec = spec
        self.qkv = torch.nn.Linear(hidden, (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_size, device=device)
        self.proj = torch.nn.Linear(spec.num_heads * spec.head_size, hidden, device=device)
        self.attn = ca.Attention(spec, device=device)

    def forward(self, x: torch.Tensor, kv_cache: torch.Tensor, meta: ca.AttentionMetadata) -> torch.Tensor:
        s = self.spec
        q, k, v = self.qkv(x).split([s.num_heads * s.head_size, s.num_kv_heads * s.head_size,
                                     s.num_kv_heads * s.head_size], dim=-1)
        out = self.attn(q.view(-1, s.num_heads, s.head_size), k.view(-1, s.num_kv_heads, s.head_size),
                        v.view(-1, s.num_kv_heads, s.head_size), kv_cache, meta)
        return x + self.proj(out.flatten(1))


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="torch.compile the step before capture")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    spec = ca.AttentionSpec(num_heads=4, num_kv_heads=2, head_size=32)
    cache = ca.PagedKVCache(num_layers=2, num_blocks=64, block_size=16, spec=spec, dtype=torch.float32,
                            device=args.device, shuffle_seed=0)
    blocks = torch.nn.ModuleList(Block(spec, 64, args.device) for _ in range(2))

    def step(x: torch.Tensor, meta: ca.AttentionMetadata) -> torch.Tensor:
        for i, block in enumerate(blocks):
            x = block(x, cache.layer(i), meta)
        return x

    compiled = torch.compile(step, fullgraph=True) if args.compile else step
    runner = ca.CUDAGraphRunner(compiled, token_input_specs=[((64,), torch.float32)], block_size=16, max_blocks=4,
                                max_num_seqs=8, decode_buckets=[1, 2, 4, 8], prefill_buckets=[32, 64],
                                device=args.device, progress=True, num_blocks=cache.num_blocks)
    runner.capture()

    # Three sequences: prefill them, then decode a few steps, checking each against an eager step
    # on a copy of the cache.
    tables = [cache.allocator.allocate(4) for _ in range(3)]
    seq_lens = [20, 7, 12]
    query_lens = seq_lens
    worst = 0.0
    for _ in range(4):
        batch = ca.BatchLayout(query_lens, seq_lens, tables)
        x = torch.randn(batch.num_tokens, 64, device=args.device)
        saved = cache.kv.clone()
        got = runner.run([x], batch).clone()
        replayed_cache = cache.kv.clone()
        cache.kv.copy_(saved)
        meta = ca.AttentionMetadata.build(query_lens, seq_lens, tables, 16, args.device, num_blocks=cache.num_blocks)
        want = step(x, meta)
        worst = max(worst, (got - want).abs().max().item(), (cache.kv - replayed_cache).abs().max().item())
        query_lens = [1, 1, 1]
        seq_lens = [n + 1 for n in seq_lens]
    print(f"max |runner - eager| over 4 steps: {worst:.2e}")
    return worst


if __name__ == "__main__":
    assert main() < 1e-4
