"""compiled_attn: paged attention for LLM inference, one contract over many backends,
whole under torch.compile, CUDA graphs and export."""

from . import models, ops
from .backends import available_backends, select_backend
from .graphs import BatchLayout, CUDAGraphRunner
from .cache import BlockAllocator, CacheFullError, PagedKVCache
from .layer import Attention
from .metadata import AttentionMetadata
from .spec import AttentionSpec

__all__ = [
    "Attention",
    "AttentionMetadata",
    "AttentionSpec",
    "BatchLayout",
    "BlockAllocator",
    "CUDAGraphRunner",
    "CacheFullError",
    "PagedKVCache",
    "available_backends",
    "models",
    "ops",
    "select_backend",
]
__version__ = "0.1.0"
