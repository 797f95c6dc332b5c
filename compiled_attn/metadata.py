"""AttentionMetadata: the per-step description of a flattened mixed batch, tensors only.

A step's new tokens are concatenated across sequences. For sequence ``s``::

    |<------------------ seq_lens[s] ------------------>|
    |<---- context (already cached) ---->|<- query_len ->|
                                          ^ query_start_loc[s] .. query_start_loc[s+1] in q

Padding tokens (beyond ``query_start_loc[-1]``) have ``slot_mapping == -1`` and produce
zeros; padding sequences have ``query_len == seq_len == 0``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
import torch.utils._pytree as pytree

from .checks import contents_key

PAD_SLOT = -1
"""``slot_mapping`` value of a padding token (past ``query_start_loc[-1]``): nothing is stored."""


@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    """Tensors describing one step; shared by every layer of the model.

    >>> m = AttentionMetadata.build(query_lens=[3, 1], seq_lens=[3, 5], block_tables=[[0], [2, 1]], block_size=4)
    >>> m.query_start_loc.tolist(), m.slot_mapping.tolist()
    ([0, 3, 4], [0, 1, 2, 4])
    """

    query_start_loc: torch.Tensor
    """[B+1] int32: cumulative new-token counts (cu_seqlens of the queries)."""
    seq_lens: torch.Tensor
    """[B] int32: whole context of each sequence, new tokens included."""
    block_table: torch.Tensor
    """[B, max_blocks] int32: cache block ids of each sequence, in order."""
    slot_mapping: torch.Tensor
    """[T] int64: flat cache slot (block * block_size + offset) of each new token; -1 for padding tokens."""
    max_query_len: int
    """Static upper bound on any sequence's new tokens (from the bucket, not the batch).

    ``1`` marks a decode layout: token ``i`` belongs to sequence ``i`` (every real sequence has
    exactly one new token; padding sequences come last), which fused decode kernels rely on."""

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.slot_mapping.shape[0]

    def is_decode_layout(self, num_tokens: int) -> bool:
        """Whether a step of ``num_tokens`` queries is in the decode layout (token ``i`` is
        sequence ``i``'s one new token; padding sequences, ``seq_len == 0``, come last). Static
        shapes only: free under ``torch.compile`` and graph capture."""
        return self.max_query_len == 1 and num_tokens == self.seq_lens.shape[0]

    def to(self, device: torch.device | str) -> AttentionMetadata:
        return dataclasses.replace(
            self,
            query_start_loc=self.query_start_loc.to(device),
            seq_lens=self.seq_lens.to(device),
            block_table=self.block_table.to(device),
            slot_mapping=self.slot_mapping.to(device),
        )

    @classmethod
    def build(
        cls,
        query_lens: Sequence[int],
        seq_lens: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        block_size: int,
        device: torch.device | str = "cpu",
        *,
        num_tokens: int | None = None,
        num_seqs: int | None = None,
        max_blocks: int | None = None,
        max_query_len: int | None = None,
        num_blocks: int | None = None,
    ) -> AttentionMetadata:
        """Build metadata on the host from per-sequence lengths and block lists.

        ``num_tokens``/``num_seqs``/``max_blocks`` pad the batch to a fixed shape (a bucket) so a
        compiled or captured step sees the same shapes for every batch composition.
        ``max_query_len`` defaults to the padded token count, which is always safe and never
        changes with the batch. ``num_blocks`` (the cache size) enables the bounds check.
        """
        query_lens = [int(q) for q in query_lens]
        seq_lens = [int(s) for s in seq_lens]
        if not (len(query_lens) == len(seq_lens) == len(block_tables)):
            raise ValueError(
                f"query_lens ({len(query_lens)}), seq_lens ({len(seq_lens)}) and block_tables "
                f"({len(block_tables)}) must have one entry per sequence"
            )
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        for s, (q, n, blocks) in enumerate(zip(query_lens, seq_lens, block_tables)):
            if q < 0 or n < q:
                raise ValueError(
                    f"sequence {s}: seq_len ({n}) must be >= query_len ({q}) >= 0; "
                    "seq_len counts the cached context plus the new tokens"
                )
            if len(blocks) * block_size < n:
                raise ValueError(
                    f"sequence {s}: seq_len {n} needs {-(-n // block_size)} blocks of {block_size} "
                    f"but its block table has {len(blocks)}; allocate more blocks first"
                )

        total = sum(query_lens)
        num_tokens = total if num_tokens is None else num_tokens
        num_seqs = len(seq_lens) if num_seqs is None else num_seqs
        widths = [len(b) for b in block_tables]
        widest = max(widths, default=0)
        max_blocks = max(widest, 1) if max_blocks is None else max_blocks
        if num_tokens < total or num_seqs < len(seq_lens) or max_blocks < widest:
            raise ValueError(
                f"batch ({total} tokens, {len(seq_lens)} sequences, {widest} blocks wide) does not fit "
                f"the padded shape ({num_tokens} tokens, {num_seqs} sequences, {max_blocks} blocks)"
            )
        max_query_len = num_tokens if max_query_len is None else max_query_len
        if max(query_lens, default=0) > max_query_len:
            raise ValueError(f"a sequence has {max(query_lens)} new tokens, over max_query_len={max_query_len}")
        if max_query_len == 1 and any(q != 1 for q in query_lens):
            raise ValueError("a decode layout (max_query_len=1) needs exactly one new token per sequence; "
                             "leave sequences without new tokens out of the step")

        # The block table and the slots in numpy, not Python lists: a serving step builds them on
        # the host every time (256 sequences of 65 blocks: torch.tensor of nested lists alone took
        # 0.76 ms; 32k prefill tokens' slots one by one, 3 ms).
        table = np.zeros((num_seqs, max_blocks), dtype=np.int32)
        for row, blocks in zip(table, block_tables):
            row[: len(blocks)] = blocks
        _check_block_ids(table, widths, num_blocks)
        q = np.asarray(query_lens, dtype=np.int64)
        starts = np.zeros(num_seqs + 1, dtype=np.int32)
        np.cumsum(q, out=starts[1 : len(seq_lens) + 1])
        starts[len(seq_lens) + 1 :] = total
        # Token t of sequence s sits at position seq_len - query_len + (t - start of s).
        seq_of_token = np.repeat(np.arange(len(seq_lens)), q)
        pos = np.arange(total) + (np.asarray(seq_lens, dtype=np.int64) - q - starts[:len(seq_lens)])[seq_of_token]
        slots = np.full(num_tokens, PAD_SLOT, dtype=np.int64)
        slots[:total] = table[seq_of_token, pos // block_size] * np.int64(block_size) + pos % block_size
        if total > 1:
            written = np.sort(slots[:total])
            if (written[1:] == written[:-1]).any():
                raise ValueError("slot_mapping writes the same cache slot twice; "
                                 "two sequences share a block they both write")
        lens = np.zeros(num_seqs, dtype=np.int32)
        lens[: len(seq_lens)] = seq_lens
        return cls(
            query_start_loc=torch.from_numpy(starts).to(device),
            seq_lens=torch.from_numpy(lens).to(device),
            block_table=torch.from_numpy(table).to(device),
            slot_mapping=torch.from_numpy(slots).to(device),
            max_query_len=max_query_len,
        )

    def check_once(self, num_blocks: int, block_size: int) -> None:
        """``check`` the first time this object meets a cache of this size, and again after any of
        its tensors changed in place; every layer of a step shares one metadata object, so a step
        pays for one check, not one per layer."""
        key = (num_blocks, block_size, contents_key(self.query_start_loc, self.seq_lens, self.block_table,
                                                    self.slot_mapping))
        if self.__dict__.get("_checked_against") != key:
            self.check(num_blocks, block_size)
            object.__setattr__(self, "_checked_against", key)  # not a field: invisible to pytree/compile

    def check(self, num_blocks: int, block_size: int) -> None:
        """Validate the tensors against a cache (reads them on the host: not for captured code)."""
        starts = self.query_start_loc.cpu().long()
        lens = self.seq_lens.cpu().long()
        table = self.block_table.cpu().long()
        slots = self.slot_mapping.cpu()
        if starts.shape[0] != lens.shape[0] + 1 or table.shape[0] != lens.shape[0]:
            raise ValueError(
                f"query_start_loc {tuple(starts.shape)}, seq_lens {tuple(lens.shape)} and block_table "
                f"{tuple(table.shape)} disagree on the number of sequences"
            )
        query_lens = starts[1:] - starts[:-1]
        if int(starts[0]) != 0 or bool((query_lens < 0).any()) or int(starts[-1]) > slots.shape[0]:
            raise ValueError("query_start_loc must start at 0, be non-decreasing and end at or before num_tokens, "
                             f"got {starts[:8].tolist()}{' ...' if starts.shape[0] > 8 else ''}")
        if self.max_query_len == 1:
            real = lens > 0
            decode_layout = bool((query_lens[real] == 1).all()) and not bool((real[1:] & ~real[:-1]).any())
            if not decode_layout:
                raise ValueError("max_query_len=1 (a decode layout) needs one new token per sequence, "
                                 "padding sequences (seq_len 0) last")
        if bool((query_lens > self.max_query_len).any()):
            raise ValueError(f"a sequence has more new tokens than max_query_len={self.max_query_len}")
        if bool((lens < query_lens).any()):
            s = int((lens < query_lens).nonzero()[0])
            raise ValueError(f"sequence {s}: seq_len {int(lens[s])} is shorter than its query_len {int(query_lens[s])}")
        if lens.numel() and int(lens.max()) > table.shape[1] * block_size:
            raise ValueError(f"a seq_len exceeds the block table's capacity ({table.shape[1]} x {block_size})")
        used_blocks = (lens + block_size - 1) // block_size
        in_use = torch.arange(table.shape[1]) < used_blocks[:, None]
        if bool(((table < 0) | (table >= num_blocks))[in_use].any()):
            raise ValueError(f"block_table points outside the cache (valid block ids: 0..{num_blocks - 1})")
        real = slots[slots != PAD_SLOT]
        if bool(((real < 0) | (real >= num_blocks * block_size)).any()):
            raise ValueError(f"slot_mapping holds slots outside the cache (valid: 0..{num_blocks * block_size - 1}, or -1)")
        if real.unique().numel() != real.numel():
            raise ValueError("slot_mapping writes the same cache slot twice")
        _check_slots_follow_table(starts, lens, table, slots, block_size)


def _check_slots_follow_table(starts: torch.Tensor, lens: torch.Tensor, table: torch.Tensor, slots: torch.Tensor,
                              block_size: int) -> None:
    """Each new token's slot is where the block table puts its position (attention reads it back
    from there), and padding tokens store nothing; a slot elsewhere leaves stale K/V in the
    context, or overwrites another sequence's."""
    query_lens = starts[1:] - starts[:-1]
    total = int(starts[-1])
    seq = torch.repeat_interleave(torch.arange(lens.shape[0]), query_lens)
    pos = (lens - query_lens)[seq] + torch.arange(total) - starts[:-1][seq]
    expected = table[seq, pos // block_size] * block_size + pos % block_size
    wrong = (slots[:total] != expected).nonzero()
    if wrong.numel():
        i = int(wrong[0])
        s = int(seq[i])
        raise ValueError(f"slot_mapping[{i}] is {int(slots[i])}, but that token (sequence {s}, position {int(pos[i])}) "
                         f"belongs at slot {int(expected[i])} by the block table; build the slots from the block "
                         "table (AttentionMetadata.build does)")
    padding = (slots[total:] != PAD_SLOT).nonzero()
    if padding.numel():
        i = total + int(padding[0])
        raise ValueError(f"slot_mapping[{i}] is {int(slots[i])}, but token {i} is padding (past "
                         f"query_start_loc[-1] = {total}) and must be {PAD_SLOT}")


def _check_block_ids(table: np.ndarray, widths: list[int], num_blocks: int | None) -> None:
    """Every listed block id (row ``s``'s first ``widths[s]`` entries) in ``[0, num_blocks)``."""
    if not table.size or (table.min() >= 0 and (num_blocks is None or table.max() < num_blocks)):
        return  # the fast path: padding entries are 0, which only an empty cache refuses
    listed = np.arange(table.shape[1]) < np.asarray(widths + [0] * (table.shape[0] - len(widths)))[:, None]
    outside = listed & ((table < 0) | (table >= (num_blocks if num_blocks is not None else np.inf)))
    if outside.any():
        s = int(np.flatnonzero(outside.any(axis=1))[0])
        raise ValueError(
            f"sequence {s}: block table entries {table[s][outside[s]][:4].tolist()} are outside the cache "
            f"(valid ids: 0..{'?' if num_blocks is None else num_blocks - 1})"
        )


def _flatten(m: AttentionMetadata):
    return [m.query_start_loc, m.seq_lens, m.block_table, m.slot_mapping], m.max_query_len


def _flatten_with_keys(m: AttentionMetadata):
    names = ("query_start_loc", "seq_lens", "block_table", "slot_mapping")
    children, ctx = _flatten(m)
    return [(pytree.GetAttrKey(n), c) for n, c in zip(names, children)], ctx


def _unflatten(children, max_query_len) -> AttentionMetadata:
    return AttentionMetadata(*children, max_query_len=max_query_len)


# Registered so compile/export see the tensors as graph inputs and max_query_len as a constant.
pytree.register_pytree_node(
    AttentionMetadata,
    _flatten,
    _unflatten,
    serialized_type_name="compiled_attn.AttentionMetadata",
    flatten_with_keys_fn=_flatten_with_keys,
)
