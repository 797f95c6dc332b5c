#!/usr/bin/env bash
# Set-up on a fresh machine: a CPU PyTorch unless one is already installed (a GPU machine keeps
# its own), then this project in editable mode with the test and export extras.
set -euo pipefail
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
if ! "$PY" -c "import torch" 2>/dev/null; then
  # A plain `pip install torch` on Linux pulls a multi-GB CUDA build; ask for the CPU one.
  "$PY" -m pip install -q "torch==2.13.0" \
    || "$PY" -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
fi
"$PY" -m pip install -q -e ".[test,onnx]"
