"""``xformers``: xFormers' Triton split-K kernel (``xformers.ops.fmha.triton_splitk``) over the paged cache.

xFormers reads a paged cache as ``[1, num_blocks * page_size, G, H, D]`` (its 5-D BMGHK layout:
G groups = our KV heads, H = query heads per KV head, stride 0 on H), which is a free view of
``kv_cache[0]`` / ``kv_cache[1]``. One step is:

1. **Store** the new K/V through ``slot_mapping`` with ``store.store_kv`` (one Triton launch on CUDA).
2. **Attend** with one call ``fmha.memory_efficient_attention_forward(q, k, v,
   attn_bias=PagedBlockDiagonalGappyKeysMask(...), scale=scale, op=fmha.triton_splitk.FwOp)``
   in which **every new token is its own row** (one query per row): row t attends to the keys
   ``[start_t, end_t)`` of its sequence's block-table row, with ``end_t = pos_t + 1`` (causal) and
   ``start_t = max(0, end_t - sliding_window)`` (or 0). The mask is a non-causal *gappy* paged
   mask, so xFormers needs neither equal query lengths nor a bottom-right causal alignment.

Why this shape:

- The only xFormers op that reads paged K/V at 64- or 128-token pages is the split-K kernel, and
  for causal masks it needs every sequence to have the same number of queries (at most 16). One
  query per row serves any mixed batch (prefill, chunked prefill, decode, speculative decode).
  The price is prefill speed: each prefill token reads its whole context (a decode kernel doing
  prefill work); use ``flash_attn`` or ``triton`` for long prefills.
- xFormers' mask constructors (``from_seqlens``...) take Python lists, which would need a host
  sync per step. The mask dataclasses are built directly from device tensors instead: the kernel
  reads only the tensors (``seqstart``, ``seqlen``, ``block_tables``); the host-side mirrors it
  validates (``q_seqinfo.seqstart_py``, ``max_seqlen``/``min_seqlen``) depend only on the token
  count, a static shape. So the call is capturable in a CUDA graph and has no host sync.
- ``op=`` is forced: xFormers' dispatcher may pick its FlashAttention op for paged masks, which
  fails at run time for pages that are not a multiple of 256.

Limits (refused by ``supports`` with a reason): CUDA only, sm80+, fp16/bf16, head sizes
16/32/64/128/256, pages a multiple of 64 (the kernel's BLOCK_N), no ALiBi, no soft-cap (the
split-K kernel has neither for paged masks), no fp8 cache (xFormers' fp8 is row-wise scale/shift,
not our per-layer scale). xFormers must have CUDA enabled (``xformers.ops.fmha.common._built_with_cuda``):
a wheel whose compiled extension does not match the installed torch disables every CUDA op.
"""

from __future__ import annotations

import importlib
from typing import ClassVar

import torch

from ..metadata import AttentionMetadata
from ..spec import AttentionSpec
from .base import AttentionBackend
from .paged_torch import token_layout
from .store import store_kv


def key_range(pos: torch.Tensor, valid: torch.Tensor, sliding_window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 ``[start, end)`` of the keys each token sees (causal, optional window); empty for padding.

    >>> pos, valid = torch.tensor([0, 5, 9, -1]), torch.tensor([True, True, True, False])
    >>> [t.tolist() for t in key_range(pos, valid, 4)]
    [[0, 2, 6, 0], [1, 6, 10, 0]]
    """
    end = torch.where(valid, pos + 1, 0)
    start = torch.zeros_like(end) if sliding_window is None else (end - sliding_window).clamp(min=0)
    return start.to(torch.int32), end.to(torch.int32)


def _xformers_fmha():
    return importlib.import_module("xformers.ops.fmha")


def build_paged_rows_mask(block_table: torch.Tensor, key_start: torch.Tensor, key_end: torch.Tensor, page_size: int):
    """``PagedBlockDiagonalGappyKeysMask``: row r (one query) sees keys ``[key_start[r], key_end[r])``
    of block-table row r. Built from device tensors without reading them on the host."""
    from xformers.ops.fmha.attn_bias import PagedBlockDiagonalGappyKeysMask, _GappySeqInfo, _SeqLenInfo

    rows = block_table.shape[0]
    bound = block_table.shape[1] * page_size
    q_info = _SeqLenInfo(
        seqstart=torch.arange(rows + 1, dtype=torch.int32, device=block_table.device),
        max_seqlen=1, min_seqlen=1, seqstart_py=list(range(rows + 1)),  # one query per row
    )
    # For paged gappy masks xFormers stores each row's start and *end* (not its length); the
    # extra last start is unused. The *_py host mirrors are only read by materialize(), so they
    # hold the static bound rather than the values (reading those would be a host sync).
    k_info = _GappySeqInfo(
        seqstart=torch.cat([key_start, key_start.new_full((1,), -1)]),
        max_seqlen=bound, min_seqlen=0, seqstart_py=[0] * rows + [-1],
        seqlen=key_end.contiguous(), seqlen_py=[bound] * rows,
    )
    return PagedBlockDiagonalGappyKeysMask(q_seqinfo=q_info, k_seqinfo=k_info, block_tables=block_table,
                                           page_size=page_size)


@torch.library.custom_op("compiled_attn::xformers_paged_rows", mutates_args=())
def xformers_paged_rows(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    key_start: torch.Tensor,
    key_end: torch.Tensor,
    softmax_scale: float,
) -> torch.Tensor:
    """Each row's one query over a key range of its paged context, via xFormers' split-K kernel.

    q ``[R, H, D]`` fp16/bf16; k_cache/v_cache ``[num_blocks, page, KVH, D]`` (page a multiple of 64);
    block_table ``[R, max_blocks]`` int32 (one block-table row per query row); key_start/key_end
    ``[R]`` int32 logical key positions. Returns ``[R, H, D]``; an empty range gives zeros.

    Equivalent PyTorch, per row r and head h (``g = H // KVH``)::

        keys = k_cache[block_table[r]].flatten(0, 1)[key_start[r]:key_end[r], h // g]   # same for values
        out[r, h] = softmax(softmax_scale * keys @ q[r, h]) @ values
    """
    fmha = _xformers_fmha()
    rows, num_heads, head_size = q.shape
    num_blocks, page_size, kv_heads, _ = k_cache.shape
    group = num_heads // kv_heads
    mask = build_paged_rows_mask(block_table, key_start, key_end, page_size)
    flat = (1, num_blocks * page_size, kv_heads, 1, head_size)
    expanded = (1, num_blocks * page_size, kv_heads, group, head_size)
    result = fmha.memory_efficient_attention_forward(
        q.reshape(1, rows, kv_heads, group, head_size),
        k_cache.view(flat).expand(expanded),
        v_cache.view(flat).expand(expanded),
        attn_bias=mask, scale=softmax_scale, op=fmha.triton_splitk.FwOp,
    )
    return result.reshape(rows, num_heads, head_size)


@xformers_paged_rows.register_fake
def _(q, k_cache, v_cache, block_table, key_start, key_end, softmax_scale):
    return torch.empty_like(q)


class XFormersBackend(AttentionBackend):
    """xFormers' Triton split-K paged kernel, one query per row: CUDA, fp16/bf16, pages of 64*k."""

    name = "xformers"
    reads_head_major = False  # the package's paged kernels take token-major pages
    device_types = ("cuda",)
    dtypes = (torch.float16, torch.bfloat16)
    head_sizes = (16, 32, 64, 128, 256)  # triton_splitk: "Embed dim {K} not supported" otherwise
    block_size_multiple = 64  # triton_splitk.FwOp.BLOCK_N: "page size should be divisible by the block size"
    max_block_size = 256
    features = frozenset({"sliding_window"})
    required_packages = ("xformers",)
    min_compute_capability = (8, 0)  # triton_splitk.FwOp.CUDA_MINIMUM_COMPUTE_CAPABILITY
    max_launch_rows: ClassVar[int] = 65535
    """CUDA's grid-y limit: triton_splitk launches one grid row per (token, KV head) here, and a
    larger step fails inside the kernel launch ("invalid argument", seen at 16k tokens x 8 heads)."""

    block_size_message = (
        "block_size {block_size} is not supported: xFormers' paged split-K kernel needs pages that "
        "are a multiple of its BLOCK_N ({multiple}), at most {largest} here; "
        "use block_size=64 or 128, or another backend")

    @classmethod
    def extra_reason(
        cls, spec: AttentionSpec, *, device: torch.device, dtype: torch.dtype | None, block_size: int | None
    ) -> str | None:
        if device.type == "cuda":
            return cls.import_reason()
        return None

    @classmethod
    def import_reason(cls) -> str | None:
        """Why the installed package cannot run our kernel (fails to import, CUDA disabled), or None."""
        try:
            fmha = _xformers_fmha()
            importlib.import_module("xformers.ops.fmha.attn_bias")
            splitk = importlib.import_module("xformers.ops.fmha.triton_splitk")
            common = importlib.import_module("xformers.ops.fmha.common")
        except Exception as err:
            return f"package 'xformers' is installed but failed to import ({type(err).__name__}: {err})"
        if not hasattr(fmha, "memory_efficient_attention_forward"):
            return "package 'xformers' has no fmha.memory_efficient_attention_forward"
        if not getattr(splitk.FwOp, "OPERATOR", None):
            return "xformers' Triton split-K op is unavailable (is triton installed?)"
        if not getattr(common, "_built_with_cuda", True) and torch.version.hip is None:
            return ("xformers was not built for this torch/CUDA (its compiled extension did not load), so it "
                    "refuses CUDA inputs; install the xformers wheel matching this torch")
        return None

    @classmethod
    def forward(cls, q, k, v, kv_cache, meta: AttentionMetadata, out, *, scale, sliding_window, logits_soft_cap,
                alibi_slopes, k_scale, v_scale) -> None:
        num_tokens, kv_heads = q.shape[0], kv_cache.shape[3]
        if num_tokens * kv_heads > cls.max_launch_rows:  # static shapes: free under compile and capture
            raise ValueError(
                f"xformers: a step of {num_tokens} tokens x {kv_heads} KV heads needs more launch rows than "
                f"CUDA allows ({cls.max_launch_rows}); keep steps to {cls.max_launch_rows // kv_heads} tokens "
                "(chunked prefill) or use another backend")
        store_kv(k, v, kv_cache, meta.slot_mapping, k_scale, v_scale)
        if num_tokens == 0:
            return
        if meta.is_decode_layout(num_tokens):  # token i is sequence i's newest position
            valid = meta.seq_lens > 0
            pos, rows = meta.seq_lens.long() - 1, meta.block_table
        else:
            seq, pos, valid = token_layout(meta, num_tokens)
            rows = meta.block_table[seq]  # [T, max_blocks]: each token reads its sequence's blocks
        key_start, key_end = key_range(pos, valid, sliding_window)
        result = xformers_paged_rows(q, kv_cache[0], kv_cache[1], rows, key_start, key_end, scale)
        out.copy_(torch.where(valid[:, None, None], result, 0))
