"""The Llama model against Hugging Face transformers: prefill logits and greedy generation."""

from __future__ import annotations

import copy

import pytest
import torch

from compiled_attn import CacheFullError
from compiled_attn.models import LlamaConfig, LlamaForCausalLM, build_step_inputs, SeqChunk

transformers = pytest.importorskip("transformers")

BACKENDS = ("reference", "torch_native")
PROMPT_LENS = (5, 17, 33, 9)  # under, over and across 16-token blocks
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
HF_CASES = {
    "plain": {},
    "llama3_rope_tied": {"rope_scaling": LLAMA3_ROPE, "tie_word_embeddings": True},
}


def tiny_hf_model(case: str) -> torch.nn.Module:
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=256, bos_token_id=None, eos_token_id=None, pad_token_id=None,
        **copy.deepcopy(HF_CASES[case]),  # transformers edits the rope dict in place
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # the default init (std 0.02) gives near-uniform logits: sharpen them
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.15)
    return model


def prompts(seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (n,), generator=g).tolist() for n in PROMPT_LENS]


@pytest.fixture(scope="module", params=list(HF_CASES))
def hf_model(request):
    return tiny_hf_model(request.param)


def test_config_mapping():
    hf = tiny_hf_model("llama3_rope_tied")
    cfg = LlamaConfig.from_hf(hf.config)
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (2, 4, 2, 16)
    assert cfg.tie_word_embeddings and cfg.rope_scaling == LLAMA3_ROPE


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefill_logits_match_hf(hf_model, backend):
    ours = LlamaForCausalLM.from_hf(hf_model, backend=backend, device="cpu")
    batch = prompts()
    cache = ours.new_cache(num_blocks=16, shuffle_seed=3)
    chunks = [SeqChunk(p, 0, cache.allocator.allocate(cache.blocks_needed(len(p)))) for p in batch]
    inputs = build_step_inputs(chunks, cache.block_size, num_tokens=80, num_seqs=8, max_blocks=4)
    with torch.no_grad():
        logits = ours(inputs.input_ids, inputs.positions, cache, inputs.meta)
        expected = torch.cat([hf_model(torch.tensor([p])).logits[0] for p in batch])
    got = logits[: expected.shape[0]]
    assert (got - expected).abs().max() / expected.abs().max() <= 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_generation_matches_hf(hf_model, backend):
    ours = LlamaForCausalLM.from_hf(hf_model, backend=backend, device="cpu")
    batch = prompts()
    with torch.no_grad():
        expected = [hf_model.generate(torch.tensor([p]), max_new_tokens=32, do_sample=False)[0, len(p):].tolist()
                    for p in batch]
    # Two slots: the later prompts join mid-way as the first ones finish; 24-token steps chunk
    # the 33-token prompt; a shuffled pool gives non-contiguous block tables.
    got = ours.generate(batch, max_new_tokens=32, block_size=16, max_num_seqs=2, max_batch_tokens=24,
                        shuffle_seed=7)
    assert got == expected
    # Different lengths: sequences finish at different steps and free their blocks for others.
    lens = [32, 7, 20, 3]
    got = ours.generate(batch, max_new_tokens=lens, max_num_seqs=3, num_blocks=8, shuffle_seed=11)
    assert got == [e[:n] for e, n in zip(expected, lens)]
    # Through CUDAGraphRunner's buckets (on a CPU it pads and runs eagerly: the same path).
    got = ours.generate(batch, max_new_tokens=32, max_num_seqs=2, max_batch_tokens=24, cuda_graphs=True)
    assert got == expected


def test_eos_stops_early_and_frees_blocks():
    model = LlamaForCausalLM.from_hf(tiny_hf_model("plain"), backend="reference", device="cpu")
    batch = prompts()
    full = model.generate(batch, max_new_tokens=12)
    eos = full[0][4]
    cache = model.new_cache(num_blocks=12)
    got = model.generate(batch, max_new_tokens=12, eos_token_id=eos, cache=cache)
    for seq, ref in zip(got, full):
        cut = ref.index(eos) + 1 if eos in ref else len(ref)
        assert seq == ref[:cut]
    assert cache.allocator.num_free == cache.num_blocks


def test_cache_too_small_raises_and_keeps_others_blocks():
    model = LlamaForCausalLM.random(LlamaConfig.preset("tiny"), seed=0, backend="reference", device="cpu")
    cache = model.new_cache(num_blocks=4, block_size=16)
    with pytest.raises(CacheFullError, match="needs 5 blocks"):
        model.generate([[1] * 70], max_new_tokens=8, cache=cache)
    held = cache.allocator.allocate(2)  # someone else's sequence
    cache.kv[:, :, held] = 1.0
    with pytest.raises(CacheFullError, match="needs 3 blocks but only 2"):
        model.generate([[1] * 40], max_new_tokens=4, cache=cache)
    assert cache.allocator.num_free == 2 and bool((cache.kv[:, :, held] == 1.0).all())


def test_bad_requests_are_refused_with_the_reason():
    model = LlamaForCausalLM.random(LlamaConfig.preset("tiny"), seed=0, backend="reference", device="cpu")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.generate([[1, 2], [3, 999]], max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        model.generate([[1, 2], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_batch_tokens"):
        model.generate([[1, 2]], max_new_tokens=2, max_num_seqs=8, max_batch_tokens=4)
    assert model.generate([[1, 2], [3]], max_new_tokens=[0, 2])[0] == []


def test_sampling_is_seeded():
    model = LlamaForCausalLM.random(LlamaConfig.preset("tiny"), seed=0, backend="torch_native", device="cpu")
    batch = [[1, 2, 3], [4, 5, 6, 7, 8]]
    a = model.generate(batch, max_new_tokens=8, temperature=1.0, top_k=20, seed=5)
    b = model.generate(batch, max_new_tokens=8, temperature=1.0, top_k=20, seed=5)
    assert a == b and all(len(t) == 8 for t in a)
