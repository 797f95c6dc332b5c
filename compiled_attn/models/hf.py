"""Weight mapping from a transformers ``LlamaForCausalLM`` state dict to ``compiled_attn.models``.

Ours fuses q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj`` (one matmul each instead of
three and two), so those weights are concatenated; everything else keeps its name minus ``model.``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

# Buffers of compiled_attn.Attention (fp8 scales) that a Hugging Face checkpoint does not have.
_OWN_BUFFERS = ("k_scale", "v_scale")


def convert_hf_state_dict(hf_state: Mapping[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Hugging Face Llama names and layout → ours (see the module docstring)."""
    state = {k.removeprefix("model."): v for k, v in hf_state.items() if "rotary_emb" not in k}
    for i in range(num_layers):
        attn, mlp = f"layers.{i}.self_attn.", f"layers.{i}.mlp."
        for suffix in ("weight", "bias"):
            parts = [state.pop(f"{attn}{p}_proj.{suffix}", None) for p in "qkv"]
            if all(p is not None for p in parts):
                state[f"{attn}qkv_proj.{suffix}"] = torch.cat(parts, dim=0)
        state[f"{mlp}gate_up_proj.weight"] = torch.cat(
            [state.pop(f"{mlp}gate_proj.weight"), state.pop(f"{mlp}up_proj.weight")], dim=0)
    return state


def load_hf_weights(model: nn.Module, hf_state: Mapping[str, torch.Tensor]) -> None:
    """Copy a Hugging Face Llama state dict into ``model`` (cast to its dtype, moved to its device).

    Raises ``ValueError`` listing any weight that is missing or left over, so a mismatched
    architecture fails loudly instead of running with random weights.
    """
    state = convert_hf_state_dict(hf_state, len(model.layers))
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # the same tensor as embed_tokens.weight
        state["lm_head.weight"] = state["embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith(_OWN_BUFFERS)]
    if missing or unexpected:
        raise ValueError(f"Hugging Face weights do not match the model: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
