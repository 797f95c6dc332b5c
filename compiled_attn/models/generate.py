"""Generation loop: scheduler → padded step inputs → model step → sampling, with a progress bar.

The step itself is ``LlamaForCausalLM.forward`` (or its ``compiled_step()``): tensors in, logits
out. Everything host-side — admission, block allocation, metadata, positions — happens here,
between steps, so the step can be compiled once per bucket and later captured as a CUDA graph.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Collection, Sequence

import torch
from tqdm.auto import tqdm

from ..cache import PagedKVCache
from .llama import LlamaForCausalLM
from .sampling import sample
from .scheduler import Scheduler, blocks_for
from .steps import GraphedStep, PaddedStep

# Each (token bucket, max_query_len) pair is one compiled graph; Dynamo's default limit of 8 per
# function is too tight for a long run of varied batches. Raised only while generate() runs.
_RECOMPILE_LIMIT = 64


@dataclasses.dataclass
class GenerationStats:
    """What a ``generate`` call did and how fast."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0
    seconds: float = 0.0
    """From the first step to the last."""
    first_step_seconds: float = 0.0
    """Included in ``seconds``; holds the compile time when compiling without CUDA graphs."""
    num_blocks: int = 0
    """Size of the cache used."""
    capture_seconds: float = 0.0
    """CUDA-graph capture (and the compiles it triggers) before the first step; not in ``seconds``."""

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second over the whole call."""
        return self.generated_tokens / self.seconds if self.seconds else 0.0

    @property
    def steady_tokens_per_s(self) -> float:
        """Generated tokens per second after the first step (which may include compilation)."""
        rest = self.seconds - self.first_step_seconds
        return self.generated_tokens / rest if rest > 0 else 0.0

    def summary(self) -> str:
        capture = f"; CUDA-graph capture before: {self.capture_seconds:.2f} s" if self.capture_seconds else ""
        return (f"{self.generated_tokens} tokens generated ({self.prompt_tokens} prompt) in {self.steps} steps, "
                f"{self.seconds:.2f} s: {self.tokens_per_s:.1f} tokens/s "
                f"({self.steady_tokens_per_s:.1f} tokens/s after the first step, which took "
                f"{self.first_step_seconds:.2f} s{capture})")


@dataclasses.dataclass
class GenerationResult:
    tokens: list[list[int]]
    """New token ids of each prompt, in prompt order."""
    stats: GenerationStats


def generate(
    model: LlamaForCausalLM,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int | Sequence[int],
    *,
    cache: PagedKVCache | None = None,
    num_blocks: int | None = None,
    block_size: int | None = None,
    max_num_seqs: int = 8,
    max_batch_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 0,
    eos_token_id: int | Collection[int] | None = None,
    shuffle_seed: int | None = None,
    progress: bool = False,
    compile: bool = False,
    cuda_graphs: bool | None = None,
) -> GenerationResult:
    """Continuous batching over a paged KV cache.

    prompts: token id lists (any lengths); max_new_tokens: one int or one per prompt.
    cache: reuse a ``PagedKVCache`` (its free blocks are used; blocks held by others are left
    alone); otherwise one of ``num_blocks`` blocks of ``block_size`` (16) tokens is created,
    by default just big enough for ``max_num_seqs`` of the longest requests at once, its block
    pool shuffled by ``shuffle_seed``. Up to ``max_num_seqs`` sequences run together and a step
    holds at most ``max_batch_tokens`` new tokens (longer prompts are prefilled in chunks).
    ``temperature`` 0 is greedy; otherwise sampled (``top_k``, ``seed``). A sequence stops at
    ``eos_token_id`` (included in its output) or its max tokens, freeing its blocks at once.
    ``compile`` runs the step under ``torch.compile(fullgraph=True)``; ``cuda_graphs`` captures
    it per bucket at start-up (``CUDAGraphRunner``) and replays it; ``None`` (default) means on
    for a CUDA model, off elsewhere. Raises ``CacheFullError``
    before any work when a request can never fit the cache.
    """
    limits = _per_prompt(max_new_tokens, len(prompts))
    if cuda_graphs is None:
        cuda_graphs = model.device.type == "cuda"
    vocab = model.config.vocab_size
    for i, prompt in enumerate(prompts):
        if any(not 0 <= t < vocab for t in prompt):  # on a GPU this would be a device-side assert
            raise ValueError(f"prompt {i} has token ids outside the vocabulary (0..{vocab - 1})")
    eos = () if eos_token_id is None else ({eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id))
    if cache is None:
        block_size = block_size or 16
        needs = sorted((blocks_for(len(p), n, block_size) for p, n in zip(prompts, limits) if n > 0), reverse=True)
        num_blocks = num_blocks or max(1, sum(needs[:max_num_seqs]))
        cache = model.new_cache(num_blocks, block_size, shuffle_seed=shuffle_seed)
    else:
        _check_cache(model, cache, block_size, num_blocks, shuffle_seed)
    scheduler = Scheduler(prompts, limits, cache.allocator, block_size=cache.block_size, max_num_seqs=max_num_seqs,
                          max_batch_tokens=max_batch_tokens, eos_token_id=eos)
    # One block-table width for the whole call: the longest request's.
    table_width = max((s.blocks_needed(cache.block_size) for s in scheduler.sequences), default=1)
    step = model.compiled_step() if compile else model
    generator = None
    if temperature > 0:
        generator = torch.Generator(device=model.device).manual_seed(seed)

    stats = GenerationStats(prompt_tokens=sum(len(p) for p in prompts), num_blocks=cache.num_blocks)
    limit = (torch._dynamo.config.patch(recompile_limit=max(torch._dynamo.config.recompile_limit, _RECOMPILE_LIMIT))
             if compile else contextlib.nullcontext())
    try:
        with limit, torch.no_grad():
            if cuda_graphs:
                began = time.perf_counter()
                run_step = GraphedStep(step, cache, max_num_seqs=max_num_seqs, max_batch_tokens=max_batch_tokens,
                                       table_width=table_width, device=model.device, progress=progress)
                stats.capture_seconds = time.perf_counter() - began
            else:
                run_step = PaddedStep(step, cache, max_num_seqs=max_num_seqs, table_width=table_width,
                                      device=model.device)
            bar = tqdm(total=sum(limits), unit="tok", desc="generate", disable=not progress, dynamic_ncols=True)
            start = time.perf_counter()
            with bar:
                while scheduler.has_work:
                    plan = scheduler.schedule()
                    logits = run_step(plan)
                    chosen = sample(logits[: len(plan)], temperature=temperature, top_k=top_k, generator=generator)
                    chosen = chosen.tolist()  # the one host sync per step
                    finished = scheduler.update(plan, [t if item.samples else None for item, t in zip(plan, chosen)])
                    stats.steps += 1
                    if stats.steps == 1:
                        stats.first_step_seconds = time.perf_counter() - start
                    new = sum(item.samples for item in plan)
                    stats.generated_tokens += new
                    # A sequence that stopped early at eos will never produce the rest of its budget.
                    bar.total -= sum(s.max_new_tokens - len(s.output) for s in finished)
                    bar.set_postfix(running=len(scheduler.running), waiting=len(scheduler.waiting), refresh=False)
                    bar.update(new)
            stats.seconds = time.perf_counter() - start
    except BaseException:
        scheduler.release_all()  # leave a caller's cache as it was found
        raise
    return GenerationResult([seq.output for seq in scheduler.sequences], stats)


def _per_prompt(max_new_tokens: int | Sequence[int], num_prompts: int) -> list[int]:
    limits = [max_new_tokens] * num_prompts if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(limits) != num_prompts:
        raise ValueError(f"max_new_tokens has {len(limits)} entries for {num_prompts} prompts")
    if any(n < 0 for n in limits):
        raise ValueError("max_new_tokens must be >= 0")
    return limits


def _check_cache(model: LlamaForCausalLM, cache: PagedKVCache, block_size: int | None, num_blocks: int | None,
                 shuffle_seed: int | None) -> None:
    if block_size is not None and block_size != cache.block_size:
        raise ValueError(f"block_size={block_size} but the cache's blocks hold {cache.block_size} tokens")
    if num_blocks is not None or shuffle_seed is not None:
        raise ValueError("num_blocks and shuffle_seed size a cache generate() creates; "
                         "pass them to PagedKVCache instead when passing cache=")
    spec, want = cache.spec, model.attention_spec
    expected_dtype = want.cache_dtype(model.dtype)
    if (cache.num_layers, spec.num_kv_heads, spec.head_size) != (model.config.num_layers, want.num_kv_heads,
                                                                 want.head_size):
        raise ValueError(f"cache is for {cache.num_layers} layers x {spec.num_kv_heads} kv heads x {spec.head_size}; "
                         f"the model needs {model.config.num_layers} x {want.num_kv_heads} x {want.head_size} "
                         "(use model.new_cache(...))")
    if cache.dtype != expected_dtype or cache.kv.device != model.device:
        raise ValueError(f"cache is {cache.dtype} on {cache.kv.device}; the model needs {expected_dtype} on "
                         f"{model.device} (use model.new_cache(...))")
