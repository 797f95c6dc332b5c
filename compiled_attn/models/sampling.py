"""Next-token choice from a step's logits: greedy, or temperature with optional top-k."""

from __future__ import annotations

import torch


def sample(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits ``[S, vocab]`` → token ids ``[S]`` int64; ``temperature <= 0`` is greedy (argmax).

    >>> sample(torch.tensor([[0.0, 2.0, 1.0]])).tolist()
    [1]
    """
    if temperature <= 0:
        return logits.argmax(dim=-1)
    scaled = logits.float() / temperature
    if top_k is not None and 0 < top_k < scaled.shape[-1]:
        kth = scaled.topk(top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
