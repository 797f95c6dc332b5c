"""``reference``: plain PyTorch, any device, fp32 accumulation, every feature. The oracle."""

from __future__ import annotations

import torch

from ..metadata import AttentionMetadata
from .base import AttentionBackend
from .paged_torch import gather_context, score_bias_and_mask, store_kv, token_layout


def reference_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    *,
    scale: float,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    k_scale: torch.Tensor,
    v_scale: torch.Tensor,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Attention of each new token over its sequence's cached context (after the store).

    Equivalent per real token t of sequence s at position p (keys j of that sequence)::

        scores[h, j] = scale * q[t, h] . K[j, h // group] + slope[h] * (j - p)
        scores = cap * tanh(scores / cap);  masked where j > p or j <= p - window
        out[t, h] = softmax(scores[h]) @ V[:, h // group]

    Returns ``[T, H, D]`` in ``compute_dtype``; padding tokens are zero.
    """
    num_tokens, num_heads, head_size = q.shape
    group = num_heads // kv_cache.shape[3]
    seq, pos, valid = token_layout(meta, num_tokens)
    keys = gather_context(kv_cache, meta.block_table, meta.seq_lens, k_scale, 0, compute_dtype)[seq]  # [T, L, KVH, D]
    values = gather_context(kv_cache, meta.block_table, meta.seq_lens, v_scale, 1, compute_dtype)[seq]
    keys = keys.repeat_interleave(group, dim=2)
    values = values.repeat_interleave(group, dim=2)
    scores = torch.einsum("thd,tlhd->thl", q.to(compute_dtype), keys) * scale
    visible, bias = score_bias_and_mask(pos, keys.shape[1], sliding_window=sliding_window, alibi_slopes=alibi_slopes)
    if bias is not None:
        scores = scores + bias.to(compute_dtype)
    if logits_soft_cap is not None:
        scores = logits_soft_cap * torch.tanh(scores / logits_soft_cap)
    visible = visible & valid[:, None]
    scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # padding rows see no key at all
    return torch.einsum("thl,tlhd->thd", probs, values)


class ReferenceBackend(AttentionBackend):
    """Readable, not fast: gathers each token's whole context densely."""

    name = "reference"
    dtypes = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
    max_block_size = 1 << 16  # any page size: the gather does not care

    @classmethod
    def forward(cls, q, k, v, kv_cache, meta, out, *, scale, sliding_window, logits_soft_cap, alibi_slopes,
                k_scale, v_scale) -> None:
        store_kv(k, v, kv_cache, meta.slot_mapping, k_scale, v_scale)
        compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        result = reference_attention(
            q, kv_cache, meta, scale=scale, sliding_window=sliding_window, logits_soft_cap=logits_soft_cap,
            alibi_slopes=alibi_slopes, k_scale=k_scale, v_scale=v_scale, compute_dtype=compute,
        )
        out.copy_(result)
