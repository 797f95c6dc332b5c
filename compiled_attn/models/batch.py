"""Host-side step inputs: token ids, positions, metadata and logit rows, padded to a bucket.

``AttentionMetadata`` does not carry positions (RoPE is the model's business), so they are
built here, from the same per-sequence chunks, in the same pass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from ..metadata import AttentionMetadata


def next_power_of_two(n: int, minimum: int = 1) -> int:
    """Smallest power of two ``>= max(n, minimum)``: the bucket a padded size rounds up to."""
    n = max(n, minimum, 1)
    return 1 << (n - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class SeqChunk:
    """New tokens of one sequence in one step."""

    tokens: Sequence[int]
    """Token ids to run, in order."""
    start: int
    """Position of the first of them (= tokens of this sequence already in the cache)."""
    blocks: Sequence[int]
    """The sequence's cache blocks, in order (at least enough for ``start + len(tokens)``)."""


@dataclasses.dataclass(frozen=True)
class StepInputs:
    """Everything ``LlamaForCausalLM.forward`` takes besides the cache, at a padded shape."""

    input_ids: torch.Tensor
    """[T] int64; padding tokens are 0."""
    positions: torch.Tensor
    """[T] int64; padding tokens are at position 0."""
    meta: AttentionMetadata
    """Describes the same T tokens; padding slots are -1, padding sequences have length 0."""
    logits_index: torch.Tensor
    """[S] int64: row of each sequence's last new token (padding sequences: row 0)."""

    def to(self, device: torch.device | str) -> StepInputs:
        return StepInputs(self.input_ids.to(device), self.positions.to(device), self.meta.to(device),
                          self.logits_index.to(device))


def flatten_chunks(
    chunks: Sequence[SeqChunk], block_size: int
) -> tuple[list[int], list[int], list[int], list[int], list[list[int]]]:
    """(token ids, positions, query_lens, seq_lens, block tables) of the step, unpadded."""
    ids: list[int] = []
    positions: list[int] = []
    for chunk in chunks:
        ids.extend(chunk.tokens)
        positions.extend(range(chunk.start, chunk.start + len(chunk.tokens)))
    query_lens = [len(c.tokens) for c in chunks]
    seq_lens = [c.start + len(c.tokens) for c in chunks]
    # Only the blocks a sequence has reached go in the table: its width tracks the context, not the reservation.
    tables = [list(c.blocks[: -(-n // block_size)]) for c, n in zip(chunks, seq_lens)]
    return ids, positions, query_lens, seq_lens, tables


def build_step_inputs(
    chunks: Sequence[SeqChunk],
    block_size: int,
    *,
    num_tokens: int | None = None,
    num_seqs: int | None = None,
    max_blocks: int | None = None,
    max_query_len: int | None = None,
    num_blocks: int | None = None,
    device: torch.device | str = "cpu",
) -> StepInputs:
    """Flatten ``chunks`` into one batch padded to (``num_tokens``, ``num_seqs``, ``max_blocks``).

    >>> s = build_step_inputs([SeqChunk([5, 6, 7], 0, [3]), SeqChunk([9], 4, [1, 0])], block_size=4, num_tokens=8)
    >>> s.positions.tolist(), s.logits_index.tolist(), s.meta.slot_mapping.tolist()
    ([0, 1, 2, 4, 0, 0, 0, 0], [2, 3], [12, 13, 14, 0, -1, -1, -1, -1])
    """
    ids, positions, query_lens, seq_lens, tables = flatten_chunks(chunks, block_size)
    meta = AttentionMetadata.build(query_lens, seq_lens, tables, block_size, device, num_tokens=num_tokens,
                                   num_seqs=num_seqs, max_blocks=max_blocks, max_query_len=max_query_len,
                                   num_blocks=num_blocks)
    pad_tokens = meta.num_tokens - len(ids)
    last_rows, end = [], 0
    for q in query_lens:
        end += q
        last_rows.append(max(end - 1, 0))
    last_rows += [0] * (meta.num_seqs - len(chunks))
    return StepInputs(
        input_ids=torch.tensor(ids + [0] * pad_tokens, dtype=torch.int64, device=device),
        positions=torch.tensor(positions + [0] * pad_tokens, dtype=torch.int64, device=device),
        meta=meta,
        logits_index=torch.tensor(last_rows, dtype=torch.int64, device=device),
    )
