"""Flash-decoding split counts from static shapes, shared by our Triton kernels and the
FlashAttention-3 backend, and the cached device properties they read (no Triton import here)."""

from __future__ import annotations

import functools
import math

import torch


@functools.lru_cache(maxsize=None)
def _properties(device_index: int):
    return torch.cuda.get_device_properties(device_index)


def _cuda_properties(device: torch.device):
    return _properties(device.index if device.index is not None else torch.cuda.current_device())


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (host property, no sync); 1 for CPU (interpreter)."""
    return _cuda_properties(device).multi_processor_count if device.type == "cuda" else 1


def compute_capability(device: torch.device) -> tuple[int, int]:
    """``(major, minor)`` of a CUDA device (cached host property); ``(0, 0)`` for CPU."""
    if device.type != "cuda":
        return (0, 0)
    props = _cuda_properties(device)
    return (props.major, props.minor)


WAVE_FILL_MARGIN = 0.05  # one split fewer only when it fills the last wave this much better


def split_count(
    *, programs: int, max_context: int, max_query_len: int, num_sms: int, split_max_query_len: int,
    programs_per_sm: float, min_keys: int, max_splits: int, resident_per_sm: int = 0,
) -> int:
    """Splits of each key range so ``programs`` (query blocks x KV heads) fill ``num_sms`` about
    ``programs_per_sm`` times over, with no split shorter than ``min_keys`` and at most
    ``max_splits``; 1 when the bucket holds more than ``split_max_query_len`` queries a sequence.

    ``resident_per_sm``: programs an SM runs at once (from the kernel's registers and shared
    memory). With it, one split fewer is taken when that fills the last wave of programs
    clearly better (for equal-length sequences a part-empty last wave is idle bandwidth).

    >>> split_count(programs=8, max_context=4096, max_query_len=1, num_sms=132, split_max_query_len=8,
    ...             programs_per_sm=2, min_keys=256, max_splits=32)
    16
    >>> split_count(programs=256, max_context=4096, max_query_len=1, num_sms=132, split_max_query_len=8,
    ...             programs_per_sm=8, min_keys=128, max_splits=32, resident_per_sm=4)  # 5 -> 4 waves full
    4
    """
    if max_query_len > split_max_query_len:
        return 1
    wanted = math.ceil(programs_per_sm * num_sms / max(programs, 1))
    longest = max(math.ceil(max_context / min_keys), 1)
    splits = max(1, min(wanted, longest, max_splits))
    if resident_per_sm and splits > 1:
        slots = resident_per_sm * num_sms
        fill = lambda s: programs * s / (math.ceil(programs * s / slots) * slots)  # noqa: E731
        if fill(splits - 1) > fill(splits) + WAVE_FILL_MARGIN:
            splits -= 1
    return splits
