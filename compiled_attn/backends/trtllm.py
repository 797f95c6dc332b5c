"""``trtllm``: TensorRT-LLM-style decode, the cache append fused into the attention kernel.

Decode steps (``meta.max_query_len == 1`` and one token per sequence, both static facts) run as
one op, ``torch.ops.compiled_attn.store_and_decode``: the new token's K/V are written and
attended in the same kernel, saving the separate store launch and the re-read of the new key.
Every other step (prefill, chunked prefill, spec-decode) runs the Triton store + unified kernel.

The op's schema is the slot for another implementation: a fused CUDA kernel (for example a
wrapper over ``tensorrt_llm``'s attention op, where that package is installed) can replace the
Triton one for CUDA tensors without touching any model::

    @torch.library.register_kernel("compiled_attn::store_and_decode", "cuda")
    def _(q, k, v, kv_cache, seq_lens, block_table, slot_mapping, out, k_scale, v_scale,
          alibi_slopes, scale, sliding_window, logits_soft_cap):
        ...  # write k/v at slot_mapping, attention of q over seq_lens tokens into out
"""

from __future__ import annotations

import torch

from .triton import TritonBackend


class TrtllmBackend(TritonBackend):
    """Same capabilities as ``triton`` (it shares its kernels); only decode is fused differently."""

    name = "trtllm"

    @classmethod
    def forward(cls, q, k, v, kv_cache, meta, out, *, scale, sliding_window, logits_soft_cap, alibi_slopes,
                k_scale, v_scale) -> None:
        if not meta.is_decode_layout(q.shape[0]):
            super().forward(q, k, v, kv_cache, meta, out, scale=scale, sliding_window=sliding_window,
                            logits_soft_cap=logits_soft_cap, alibi_slopes=alibi_slopes, k_scale=k_scale,
                            v_scale=v_scale)
            return
        import compiled_attn.kernels.store_and_decode  # noqa: F401  (registers the op)

        # A decode layout (max_query_len == 1) puts token i in sequence i; padding sequences have
        # seq_len 0, so the kernel stores nothing for them and writes zeros.
        torch.ops.compiled_attn.store_and_decode(
            q, k, v, kv_cache, meta.seq_lens, meta.block_table, meta.slot_mapping, out, k_scale, v_scale,
            alibi_slopes, scale, sliding_window or 0, logits_soft_cap or 0.0)

