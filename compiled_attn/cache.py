"""PagedKVCache: the block pool every backend reads and writes, and its allocator.

One canonical shape for every backend, per layer::

    kv_cache[l] : [2, num_blocks, block_size, num_kv_heads, head_size]   (0 = K, 1 = V)

so switching backends never copies the cache. Its memory order is ``"token_major"`` (contiguous,
a token's heads side by side) or ``"head_major"`` (each head's page of ``block_size`` tokens in
one piece, memory ``[2, num_blocks, num_kv_heads, block_size, head_size]``, seen through strides
as the same shape); a backend names the one it reads fastest (``kv_cache_layout``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .spec import AttentionSpec


LAYOUTS = ("token_major", "head_major")


def cache_layout(kv_cache: torch.Tensor) -> str:
    """``"head_major"`` when a ``[2, num_blocks, block_size, kv_heads, head_size]`` cache keeps each
    head's page in one piece (heads outside tokens in memory), else ``"token_major"``."""
    return "head_major" if kv_cache.shape[3] > 1 and kv_cache.stride(3) > kv_cache.stride(2) else "token_major"


class CacheFullError(RuntimeError):
    """Raised when the pool has fewer free blocks than a request needs; nothing is changed."""


class BlockAllocator:
    """Reference-counted free list over block ids ``0 .. num_blocks-1``.

    ``fork`` shares blocks (a common prefix) by bumping their counts; a block returns to the free
    list when its last owner frees it.
    """

    def __init__(self, num_blocks: int, *, shuffle_seed: int | None = None) -> None:
        order = list(range(num_blocks))
        if shuffle_seed is not None:
            # A shuffled pool exercises non-contiguous block tables (tests, demos).
            g = torch.Generator().manual_seed(shuffle_seed)
            order = [order[i] for i in torch.randperm(num_blocks, generator=g).tolist()]
        self._free = order[::-1]  # pop() from the end hands out `order` front to back
        self._refs = [0] * num_blocks
        self.num_blocks = num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise CacheFullError(f"need {n} blocks but only {len(self._free)} of {self.num_blocks} are free")
        blocks = [self._free.pop() for _ in range(n)]
        for b in blocks:
            self._refs[b] = 1
        return blocks

    def fork(self, blocks: Sequence[int]) -> list[int]:
        for b in blocks:
            self._check_owned(b)
            self._refs[b] += 1
        return list(blocks)

    def free(self, blocks: Sequence[int]) -> None:
        for b in blocks:
            self._check_owned(b)
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free.append(b)

    def refcount(self, block: int) -> int:
        return self._refs[block]

    def _check_owned(self, b: int) -> None:
        if not 0 <= b < self.num_blocks or self._refs[b] == 0:
            raise ValueError(f"block {b} is not allocated")


class PagedKVCache:
    """K/V storage for every layer of a model plus its block allocator.

    >>> spec = AttentionSpec(num_heads=4, num_kv_heads=2, head_size=32)
    >>> cache = PagedKVCache(num_layers=2, num_blocks=8, block_size=16, spec=spec, dtype=torch.float32)
    >>> cache.layer(0).shape
    torch.Size([2, 8, 16, 2, 32])
    >>> blocks = cache.allocator.allocate(2)
    """

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        spec: AttentionSpec,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        *,
        shuffle_seed: int | None = None,
        layout: str = "token_major",
    ) -> None:
        if block_size <= 0 or num_blocks <= 0 or num_layers <= 0:
            raise ValueError("num_layers, num_blocks and block_size must be positive")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        self.spec = spec
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.dtype = spec.cache_dtype(dtype)
        self.layout = layout
        heads, size = spec.num_kv_heads, spec.head_size
        if layout == "head_major":
            memory = torch.zeros(num_layers, 2, num_blocks, heads, block_size, size, dtype=self.dtype, device=device)
            self.kv = memory.transpose(3, 4)
        else:
            self.kv = torch.zeros(num_layers, 2, num_blocks, block_size, heads, size, dtype=self.dtype, device=device)
        self.allocator = BlockAllocator(num_blocks, shuffle_seed=shuffle_seed)

    @property
    def num_layers(self) -> int:
        return self.kv.shape[0]

    def layer(self, i: int) -> torch.Tensor:
        """The layer's cache view, ``[2, num_blocks, block_size, num_kv_heads, head_size]``."""
        return self.kv[i]

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def copy_blocks(self, src_to_dst: Sequence[tuple[int, int]]) -> None:
        """Copy whole blocks (copy-on-write of a forked prefix) in every layer."""
        if not src_to_dst:
            return
        src = torch.tensor([s for s, _ in src_to_dst], device=self.kv.device)
        dst = torch.tensor([d for _, d in src_to_dst], device=self.kv.device)
        self.kv[:, :, dst] = self.kv[:, :, src]
