"""The one place the ``COMPILED_ATTN_*`` environment is read.

Precedence everywhere: explicit argument > config object > environment.
"""

from __future__ import annotations

import os


def backend_override() -> str | None:
    """``COMPILED_ATTN_BACKEND``: force a backend by name (fails loudly if it cannot run)."""
    return os.environ.get("COMPILED_ATTN_BACKEND") or None


def input_checks() -> str:
    """``COMPILED_ATTN_CHECKS``: ``"cpu"`` (default: validate metadata against the cache on CPU
    eager calls), ``"always"`` (also on GPU, costs a host sync per step) or ``"never"``."""
    value = os.environ.get("COMPILED_ATTN_CHECKS", "cpu").lower()
    if value not in ("cpu", "always", "never"):
        raise ValueError(f"COMPILED_ATTN_CHECKS must be cpu, always or never, got {value!r}")
    return value
