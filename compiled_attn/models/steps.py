"""Running one scheduled step: pad to a bucket and call the model step, or replay a CUDA graph.

Both executors take the scheduler's plan and return logits ``[>= len(plan), vocab]`` whose first
rows are the plan's sequences' last tokens, so the generation loop does not care which one runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..cache import PagedKVCache
from ..metadata import AttentionMetadata
from .batch import build_step_inputs, flatten_chunks, next_power_of_two
from .scheduler import Scheduled

MIN_TOKEN_BUCKET = 8
"""Smallest padded token count: small decode batches share one graph instead of one each."""

StepFn = Callable[..., torch.Tensor]
"""``(input_ids, positions, kv_caches, meta, logits_index) -> logits``: the model's ``forward``."""


def last_token_rows(meta: AttentionMetadata) -> torch.Tensor:
    """``[B]`` int64 row of each sequence's last new token, from the metadata alone (capture-safe).

    Padding sequences (no tokens) point at the previous real token; their logits are ignored.
    """
    return (meta.query_start_loc[1:].long() - 1).clamp_min(0)


class PaddedStep:
    """Pads each step to power-of-two buckets and calls ``step`` (eager or ``torch.compile``d).

    Per call the sequence count and block-table width are fixed, so only the token bucket (and
    ``max_query_len``: 1 for pure decode, the token bucket otherwise) changes between steps.
    """

    def __init__(self, step: StepFn, cache: PagedKVCache, *, max_num_seqs: int, table_width: int,
                 device: torch.device) -> None:
        self.step, self.cache, self.device = step, cache, device
        self.seq_bucket = next_power_of_two(max_num_seqs)
        self.table_width = next_power_of_two(table_width)

    def __call__(self, plan: Sequence[Scheduled]) -> torch.Tensor:
        total = sum(len(item.chunk.tokens) for item in plan)
        num_tokens = next_power_of_two(total, MIN_TOKEN_BUCKET)
        decode_only = all(len(item.chunk.tokens) == 1 for item in plan)
        inputs = build_step_inputs(
            [item.chunk for item in plan], self.cache.block_size,
            num_tokens=num_tokens, num_seqs=self.seq_bucket, max_blocks=self.table_width,
            max_query_len=1 if decode_only else num_tokens,
            num_blocks=self.cache.num_blocks, device=self.device,
        )
        return self.step(inputs.input_ids, inputs.positions, self.cache.kv, inputs.meta, inputs.logits_index)


class GraphedStep:
    """Captures ``step`` once per bucket with ``compiled_attn.CUDAGraphRunner`` and replays it.

    Decode buckets are sequence counts, prefill buckets powers of two up to ``max_batch_tokens``.
    On a CPU the runner pads without graphs (the same path, for testing).
    """

    def __init__(self, step: StepFn, cache: PagedKVCache, *, max_num_seqs: int, max_batch_tokens: int,
                 table_width: int, device: torch.device, progress: bool = False) -> None:
        from ..graphs import CUDAGraphRunner, default_prefill_buckets

        kv = cache.kv

        def graph_step(input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
            return step(input_ids, positions, kv, meta, last_token_rows(meta))

        self.runner = CUDAGraphRunner(
            graph_step, token_input_specs=[((), torch.int64), ((), torch.int64)], block_size=cache.block_size,
            max_blocks=next_power_of_two(table_width), max_num_seqs=max_num_seqs,
            prefill_buckets=default_prefill_buckets(max(max_batch_tokens, 16)), device=device, progress=progress,
            output_rows="seqs", num_blocks=cache.num_blocks,
        )
        self.runner.capture()
        self.block_size, self.device = cache.block_size, device

    def __call__(self, plan: Sequence[Scheduled]) -> torch.Tensor:
        from ..graphs import BatchLayout

        ids, positions, query_lens, seq_lens, tables = flatten_chunks([item.chunk for item in plan], self.block_size)
        batch = BatchLayout(query_lens, seq_lens, tables)
        token_inputs = [torch.tensor(ids, dtype=torch.int64, device=self.device),
                        torch.tensor(positions, dtype=torch.int64, device=self.device)]
        return self.runner.run(token_inputs, batch)
