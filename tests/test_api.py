"""The public names the README promises."""

from __future__ import annotations


def test_public_names():
    import compiled_attn as ca

    for name in ("Attention", "AttentionMetadata", "AttentionSpec", "PagedKVCache", "CUDAGraphRunner",
                 "available_backends", "select_backend"):
        assert hasattr(ca, name), name
    assert ca.models.LlamaForCausalLM.from_hf
