"""A Llama-family model built on ``compiled_attn.Attention``, and continuous-batching generation.

>>> from compiled_attn.models import LlamaConfig, LlamaForCausalLM
>>> model = LlamaForCausalLM.random(LlamaConfig.preset("tiny"), seed=0, device="cpu")
>>> out = model.generate([[1, 2, 3], [7] * 20], max_new_tokens=[5, 2], block_size=16)
>>> [len(t) for t in out]
[5, 2]
"""

from .batch import SeqChunk, StepInputs, build_step_inputs, next_power_of_two
from .config import LlamaConfig
from .generate import GenerationResult, GenerationStats, generate
from .llama import LlamaForCausalLM
from .sampling import sample
from .scheduler import Scheduler

__all__ = [
    "GenerationResult",
    "GenerationStats",
    "LlamaConfig",
    "LlamaForCausalLM",
    "Scheduler",
    "SeqChunk",
    "StepInputs",
    "build_step_inputs",
    "generate",
    "next_power_of_two",
    "sample",
]
