"""A Llama-family decoder whose attention layers are ``compiled_attn.Attention``.

One call of ``forward`` is one inference step over a flattened mixed batch (prefills, chunked
prefills and decodes together) reading and writing a ``PagedKVCache``. It has no ``.item()``,
no data-dependent shapes and no Python branches on tensor values, so it runs whole under
``torch.compile(fullgraph=True)`` and, padded to a bucket, never recompiles inside that bucket.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import PagedKVCache
from ..layer import Attention
from ..metadata import AttentionMetadata
from ..spec import AttentionSpec
from .config import LlamaConfig
from .rope import apply_rope, inverse_frequencies, rope_cos_sin

KVCaches = PagedKVCache | torch.Tensor | Sequence[torch.Tensor]
"""A whole cache, its stacked tensor ``[L, 2, num_blocks, block_size, KVH, D]``, or one tensor per layer."""

# Standard deviation of random weights (the usual Llama initializer range).
_INIT_STD = 0.02


class RMSNorm(nn.Module):
    """``x / rms(x) * weight``, normalised in fp32 and cast back before the weight (as Llama does)."""

    def __init__(self, size: int, eps: float, *, device=None, dtype=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, device=device, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))`` with gate and up fused into one matmul."""

    def __init__(self, config: LlamaConfig, *, device=None, dtype=None) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False,
                                      device=device, dtype=dtype)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class SelfAttention(nn.Module):
    """Fused q/k/v projection, RoPE, paged attention through ``compiled_attn.Attention``, output projection."""

    def __init__(self, config: LlamaConfig, spec: AttentionSpec, *, backend: str, device, dtype) -> None:
        super().__init__()
        self.spec = spec
        q_size = spec.num_heads * spec.head_size
        kv_size = spec.num_kv_heads * spec.head_size
        self.split_sizes = [q_size, kv_size, kv_size]
        self.qkv_proj = nn.Linear(config.hidden_size, q_size + 2 * kv_size, bias=config.attention_bias,
                                  device=device, dtype=dtype)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=False, device=device, dtype=dtype)
        self.attn = Attention(spec, backend, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """x ``[T, hidden]`` → ``[T, hidden]``; stores this step's K/V into ``kv_cache``."""
        s = self.spec
        q, k, v = self.qkv_proj(x).split(self.split_sizes, dim=-1)
        q = apply_rope(q.view(-1, s.num_heads, s.head_size), cos, sin)
        k = apply_rope(k.view(-1, s.num_kv_heads, s.head_size), cos, sin)
        out = self.attn(q, k, v.view(-1, s.num_kv_heads, s.head_size), kv_cache, meta)
        return self.o_proj(out.flatten(1))


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, spec: AttentionSpec, *, backend: str, device, dtype) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, device=device, dtype=dtype)
        self.self_attn = SelfAttention(config, spec, backend=backend, device=device, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, device=device, dtype=dtype)
        self.mlp = MLP(config, device=device, dtype=dtype)

    def forward(self, x, cos, sin, kv_cache, meta):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    """Llama-family causal LM over a paged KV cache.

    >>> model = LlamaForCausalLM.random(LlamaConfig.preset("tiny"), seed=0, backend="reference", device="cpu")
    >>> [len(t) for t in model.generate([[1, 2, 3], [4, 5]], max_new_tokens=4)]
    [4, 4]

    ``backend``/``device``/``dtype`` are handed to every ``Attention`` layer (``"auto"`` picks the
    first backend by priority that serves the layer on ``device``). ``device=None`` is CUDA when
    available, else CPU; ``dtype=None`` is torch's default dtype.
    """

    def __init__(
        self,
        config: LlamaConfig,
        *,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or torch.get_default_dtype()
        self.attention_spec = AttentionSpec(num_heads=config.num_heads, num_kv_heads=config.num_kv_heads,
                                            head_size=config.head_dim)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, device=device, dtype=dtype)
        self.layers = nn.ModuleList(
            DecoderLayer(config, self.attention_spec, backend=backend, device=device, dtype=dtype)
            for _ in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, device=device, dtype=dtype)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, device=device, dtype=dtype)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        inv_freq = inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def backend_name(self) -> str:
        return self.layers[0].self_attn.attn.backend.name

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: KVCaches,
        meta: AttentionMetadata,
        logits_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One step over a flattened batch.

        input_ids ``[T]`` int64 and positions ``[T]`` int64 (each token's absolute position in its
        sequence; padding tokens: any id, position 0), ``meta`` describing the same ``T`` tokens.
        Returns logits ``[T, vocab]``, or ``[S, vocab]`` for the rows ``logits_index`` ``[S]`` int64
        picks (typically each sequence's last new token: the LM head then runs on S rows only).
        """
        caches = kv_caches.kv if isinstance(kv_caches, PagedKVCache) else kv_caches
        if len(caches) != len(self.layers):
            raise ValueError(f"kv_caches holds {len(caches)} layers but the model has {len(self.layers)}")
        h = self.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(positions, self.inv_freq, h.dtype)
        for layer, kv_cache in zip(self.layers, caches):
            h = layer(h, cos, sin, kv_cache, meta)
        if logits_index is not None:
            h = h.index_select(0, logits_index)  # norm and LM head on the sampled rows only
        return self.lm_head(self.norm(h))

    def compiled_step(self) -> nn.Module:
        """This model under ``torch.compile(fullgraph=True, dynamic=False)``, created once and reused.

        ``dynamic=False``: the generator pads every step to a bucket, so each bucket is one static
        graph and batches inside a bucket never recompile.
        """
        compiled = self.__dict__.get("_compiled_step")
        if compiled is None:
            compiled = torch.compile(self, fullgraph=True, dynamic=False)
            # A plain attribute, not a submodule: registered, the model would contain itself.
            self.__dict__["_compiled_step"] = compiled
        return compiled

    def new_cache(self, num_blocks: int, block_size: int = 16, *, shuffle_seed: int | None = None) -> PagedKVCache:
        """A ``PagedKVCache`` shaped for this model, on its device, in its dtype, in the memory order its
        attention backend reads fastest."""
        backend = self.layers[0].self_attn.attn.backend
        return PagedKVCache(self.config.num_layers, num_blocks, block_size, self.attention_spec, dtype=self.dtype,
                            device=self.device, shuffle_seed=shuffle_seed,
                            layout=backend.kv_cache_layout(self.attention_spec))

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int], **kwargs: Any
                 ) -> list[list[int]]:
        """New token ids for each prompt, in prompt order; continuous batching over a paged cache.

        Keyword arguments are those of :func:`compiled_attn.models.generate.generate` (cache or
        num_blocks, block_size, max_num_seqs, max_batch_tokens, temperature, top_k, seed,
        eos_token_id, shuffle_seed, progress, compile).
        """
        from .generate import generate

        return generate(self, prompts, max_new_tokens, **kwargs).tokens

    @classmethod
    def random(
        cls,
        config: LlamaConfig,
        seed: int = 0,
        *,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> LlamaForCausalLM:
        """A model with seeded random weights (normal, std 0.02; norms 1), identical on every device."""
        model = cls(config, backend=backend, device=device, dtype=dtype)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("layernorm.weight") or name == "norm.weight":
                    continue
                # Drawn on the CPU in fp32 so the weights do not depend on device or dtype.
                param.copy_(torch.randn(param.shape, generator=g) * _INIT_STD)
        return model

    @classmethod
    def from_hf(
        cls,
        hf_model: nn.Module,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> LlamaForCausalLM:
        """Build from a transformers ``LlamaForCausalLM``: config mapped, weights copied.

        ``device``/``dtype`` default to the Hugging Face model's.
        """
        from .hf import load_hf_weights

        config = LlamaConfig.from_hf(hf_model.config)
        reference = next(hf_model.parameters())
        model = cls(config, backend=backend, device=device or reference.device, dtype=dtype or reference.dtype)
        load_hf_weights(model, hf_model.state_dict())
        return model
