"""``python -m compiled_attn``: the same as the ``compiled-attn`` command."""

import sys

from .cli import main

if __name__ == "__main__":  # not on import (pytest's doctest collection imports every module)
    sys.exit(main())
