"""``torch_native``: PyTorch's scaled_dot_product_attention over the gathered paged context.

Queries are regrouped per sequence into ``[B, H, max_query_len, D]`` (``max_query_len`` is
static, from the metadata), keys/values gathered densely per sequence, and one SDPA call with a
boolean causal/window mask (or an additive ALiBi bias) does the rest. Works on CPU and any GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import AttentionBackend
from .paged_torch import gather_context, score_bias_and_mask, store_kv, token_layout


class TorchNativeBackend(AttentionBackend):
    name = "torch_native"
    # SDPA has no logit soft-capping hook (FlexAttention's score_mod would; not wired here yet).
    features = frozenset({"sliding_window", "alibi", "fp8_kv_cache"})
    max_block_size = 1 << 16  # any page size: the gather does not care

    @classmethod
    def forward(cls, q, k, v, kv_cache, meta, out, *, scale, sliding_window, logits_soft_cap, alibi_slopes,
                k_scale, v_scale) -> None:
        store_kv(k, v, kv_cache, meta.slot_mapping, k_scale, v_scale)
        num_tokens, num_heads, head_size = q.shape
        num_seqs = meta.seq_lens.shape[0]
        q_len = meta.max_query_len
        seq, pos, valid = token_layout(meta, num_tokens)
        starts = meta.query_start_loc.long()
        # Row of each token in the [B * q_len] padded query grid; padding tokens go to a spare row.
        row = torch.where(valid, seq * q_len + torch.arange(num_tokens, device=q.device) - starts[seq], num_seqs * q_len)
        padded = q.new_zeros(num_seqs * q_len + 1, num_heads, head_size)
        padded.index_copy_(0, row, q)
        queries = padded[:-1].view(num_seqs, q_len, num_heads, head_size).transpose(1, 2)

        keys = gather_context(kv_cache, meta.block_table, meta.seq_lens, k_scale, 0, q.dtype).transpose(1, 2)
        values = gather_context(kv_cache, meta.block_table, meta.seq_lens, v_scale, 1, q.dtype).transpose(1, 2)
        query_lens = starts[1:] - starts[:-1]
        grid_pos = (meta.seq_lens.long() - query_lens)[:, None] + torch.arange(q_len, device=q.device)
        visible, bias = score_bias_and_mask(grid_pos, keys.shape[2], sliding_window=sliding_window,
                                            alibi_slopes=alibi_slopes)
        # Padding rows would see no key (NaN softmax): let them see key 0; they are dropped below.
        visible[..., 0] |= ~visible.any(-1)
        if bias is None:
            mask = visible[:, None]
        else:
            mask = bias.transpose(1, 2).masked_fill(~visible[:, None], float("-inf")).to(q.dtype)
        result = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scale,
                                                enable_gqa=num_heads != keys.shape[1])
        flat = result.transpose(1, 2).reshape(num_seqs * q_len, num_heads, head_size)
        flat = torch.cat([flat, flat.new_zeros(1, num_heads, head_size)])
        out.copy_(flat[row])
