"""Continuous batching: which sequences run in the next step, and how many tokens each.

Every step is one flattened batch: decodes of the running sequences first (one token each), then
what is left of their prefills, then newly admitted prompts, until the token budget or the
sequence slots run out. A prompt longer than the budget is prefilled in chunks over several steps.

A sequence is admitted only when the allocator can give it every block it may ever need
(prompt + max_new_tokens), so a running sequence never stalls for memory and nothing is ever
evicted or recomputed; a prompt that does not fit waits for running ones to finish.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Collection, Sequence

from ..cache import BlockAllocator, CacheFullError
from .batch import SeqChunk


def blocks_for(prompt_len: int, max_new_tokens: int, block_size: int) -> int:
    """Blocks for every token whose K/V can be stored: the prompt and all but the last new token."""
    return max(1, -(-(prompt_len + max_new_tokens - 1) // block_size))


@dataclasses.dataclass(eq=False)
class GenSequence:
    """One request's state."""

    index: int
    """Position of its prompt in the caller's list."""
    prompt: list[int]
    max_new_tokens: int
    output: list[int] = dataclasses.field(default_factory=list)
    blocks: list[int] = dataclasses.field(default_factory=list)
    num_cached: int = 0
    """Tokens whose K/V are in the cache (the newest sampled token never is until it is fed back)."""

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def pending(self) -> int:
        """Tokens not yet run through the model: the prompt's rest, or 1 (the last sampled token)."""
        return self.num_tokens - self.num_cached

    def token_slice(self, start: int, stop: int) -> list[int]:
        n = len(self.prompt)
        if stop <= n:
            return self.prompt[start:stop]
        if start >= n:
            return self.output[start - n: stop - n]
        return self.prompt[start:] + self.output[: stop - n]

    def blocks_needed(self, block_size: int) -> int:
        return blocks_for(len(self.prompt), self.max_new_tokens, block_size)


@dataclasses.dataclass(frozen=True)
class Scheduled:
    """A sequence's part of one step; ``samples`` when its last token's logits give a new token."""

    seq: GenSequence
    chunk: SeqChunk
    samples: bool


class Scheduler:
    """First come, first served admission with a per-step token budget and sequence limit.

    >>> from compiled_attn import BlockAllocator
    >>> s = Scheduler([[1, 2, 3], [4]], [2, 2], BlockAllocator(4), block_size=4, max_num_seqs=1, max_batch_tokens=8)
    >>> [(x.seq.index, list(x.chunk.tokens)) for x in s.schedule()]
    [(0, [1, 2, 3])]
    """

    def __init__(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: Sequence[int],
        allocator: BlockAllocator,
        *,
        block_size: int,
        max_num_seqs: int,
        max_batch_tokens: int,
        eos_token_id: Collection[int] = (),
    ) -> None:
        if max_num_seqs <= 0 or max_batch_tokens <= 0:
            raise ValueError(f"max_num_seqs ({max_num_seqs}) and max_batch_tokens ({max_batch_tokens}) "
                             "must be positive")
        if max_batch_tokens < max_num_seqs:
            raise ValueError(f"max_batch_tokens ({max_batch_tokens}) must be >= max_num_seqs ({max_num_seqs}) so "
                             "every running sequence can decode in every step")
        self.allocator = allocator
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_batch_tokens = max_batch_tokens
        self.eos = frozenset(eos_token_id)
        self.sequences = [GenSequence(i, list(p), n) for i, (p, n) in enumerate(zip(prompts, max_new_tokens))]
        for seq in self.sequences:
            if not seq.prompt:
                raise ValueError(f"prompt {seq.index} is empty; every prompt needs at least one token")
            need = seq.blocks_needed(block_size)
            if need > allocator.num_blocks:
                raise CacheFullError(
                    f"prompt {seq.index} needs {need} blocks of {block_size} tokens ({len(seq.prompt)} prompt + "
                    f"{seq.max_new_tokens} new tokens) but the cache has only {allocator.num_blocks}; "
                    f"use num_blocks >= {need} or fewer new tokens")
        self.waiting: deque[GenSequence] = deque(s for s in self.sequences if s.max_new_tokens > 0)
        self.running: list[GenSequence] = []

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[Scheduled]:
        """The next step's chunks; admits waiting prompts (allocating their blocks) when they fit."""
        budget = self.max_batch_tokens
        plan: list[Scheduled] = []
        # Decodes first: one token each, so a long prefill never stalls the running sequences.
        for seq in sorted(self.running, key=lambda s: s.pending != 1):
            if budget == 0:
                break
            plan.append(self._chunk(seq, min(seq.pending, budget)))
            budget -= len(plan[-1].chunk.tokens)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            need = seq.blocks_needed(self.block_size)
            if need > self.allocator.num_free:
                if not self.running:
                    # Nothing will free blocks: someone outside this generator holds them.
                    raise CacheFullError(
                        f"prompt {seq.index} needs {need} blocks but only {self.allocator.num_free} of "
                        f"{self.allocator.num_blocks} are free and no running sequence will release any")
                break  # wait for a running sequence to finish
            seq.blocks = self.allocator.allocate(need)
            self.waiting.popleft()
            self.running.append(seq)
            n = min(seq.pending, budget)
            plan.append(self._chunk(seq, n))
            budget -= n
        return plan

    def update(self, plan: Sequence[Scheduled], sampled: Sequence[int | None]) -> list[GenSequence]:
        """Record a step's results (one sampled id per chunk, ``None`` where it did not sample);
        returns the sequences that finished, whose blocks are already freed."""
        finished = []
        for item, token in zip(plan, sampled):
            seq = item.seq
            seq.num_cached += len(item.chunk.tokens)
            if not item.samples:
                continue
            seq.output.append(int(token))
            if len(seq.output) >= seq.max_new_tokens or token in self.eos:
                self._finish(seq)
                finished.append(seq)
        return finished

    def release_all(self) -> None:
        """Free every running sequence's blocks (after an error, so the cache is left as found)."""
        for seq in list(self.running):
            self._finish(seq)

    def _finish(self, seq: GenSequence) -> None:
        self.allocator.free(seq.blocks)
        seq.blocks = []
        self.running.remove(seq)

    def _chunk(self, seq: GenSequence, n: int) -> Scheduled:
        start = seq.num_cached
        chunk = SeqChunk(seq.token_slice(start, start + n), start, seq.blocks)
        return Scheduled(seq, chunk, samples=start + n == seq.num_tokens)
