"""LlamaConfig: the shape of a Llama-family model, and the presets the CLI and examples use."""

from __future__ import annotations

import dataclasses
from typing import Any

ROPE_TYPES = ("default", "llama3")
"""RoPE variants the model implements (``rope_scaling["rope_type"]``)."""

_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters of a Llama-family decoder (RMSNorm, RoPE, GQA, SwiGLU).

    >>> cfg = LlamaConfig.preset("tiny")
    >>> cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
    (2, 16)
    """

    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None
    """Channels per head; ``None`` means ``hidden_size // num_heads``."""
    vocab_size: int = 256
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    """``None`` (plain RoPE) or ``{"rope_type": "llama3", "factor", "low_freq_factor",
    "high_freq_factor", "original_max_position_embeddings"}``."""
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    """Longest sequence the generator accepts (RoPE itself has no table and no limit)."""
    attention_bias: bool = False
    """Bias on the q/k/v projections (Llama: no; some derivatives: yes)."""

    def __post_init__(self) -> None:
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}; "
                                 "pass head_dim explicitly")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type", "default")
            if rope_type not in ROPE_TYPES:
                raise ValueError(f"rope_type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
            missing = [k for k in _LLAMA3_KEYS if rope_type == "llama3" and k not in self.rope_scaling]
            if missing:
                raise ValueError(f"llama3 rope_scaling needs {', '.join(missing)}")

    @property
    def rope_type(self) -> str:
        return (self.rope_scaling or {}).get("rope_type", "default")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> LlamaConfig:
        """A named shape (``tiny``, ``small``, ``1b-shape``) with optional field overrides."""
        try:
            base = PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None
        return dataclasses.replace(base, **overrides)

    @classmethod
    def from_hf(cls, hf_config: Any) -> LlamaConfig:
        """Map a transformers ``LlamaConfig`` (v4 ``rope_scaling``/``rope_theta`` or v5 ``rope_parameters``)."""
        if getattr(hf_config, "mlp_bias", False):
            raise ValueError("mlp_bias=True is not supported by compiled_attn.models.LlamaForCausalLM")
        if getattr(hf_config, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {hf_config.hidden_act!r} is not supported (only 'silu')")
        rope = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
        theta = rope.pop("rope_theta", None) or getattr(hf_config, "rope_theta", None) or 10000.0
        rope_type = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
        scaling = None if rope_type == "default" else {"rope_type": rope_type, **rope}
        if scaling is not None and rope_type == "llama3":
            scaling = {"rope_type": "llama3", **{k: rope[k] for k in _LLAMA3_KEYS if k in rope}}
        num_heads = hf_config.num_attention_heads
        return cls(
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_layers=hf_config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
            head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads,
            vocab_size=hf_config.vocab_size,
            rope_theta=float(theta),
            rope_scaling=scaling,
            rms_norm_eps=hf_config.rms_norm_eps,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            max_position_embeddings=hf_config.max_position_embeddings,
            attention_bias=bool(getattr(hf_config, "attention_bias", False)),
        )


_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

PRESETS: dict[str, LlamaConfig] = {
    # Seconds on a laptop CPU; what tests, examples and the CLI default use.
    "tiny": LlamaConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                        vocab_size=256, max_position_embeddings=1024),
    # Head size 64: the smallest every GPU backend serves.
    "small": LlamaConfig(hidden_size=512, intermediate_size=1376, num_layers=4, num_heads=8, num_kv_heads=2,
                         vocab_size=8192, rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE,
                         max_position_embeddings=4096, tie_word_embeddings=True),
    # Llama-3.2-1B's published shape (random weights): realistic layer sizes for a GPU.
    "1b-shape": LlamaConfig(hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
                            num_kv_heads=8, head_dim=64, vocab_size=128256, rope_theta=500000.0,
                            rope_scaling=_LLAMA3_ROPE, rms_norm_eps=1e-5, tie_word_embeddings=True,
                            max_position_embeddings=131072),
}
