#!/usr/bin/env bash
# llm-compressor (AWQ, W4A16) in its own virtualenv (default .venv-awq), for `quantize.awq: true`.
#   usage: scripts/setup_awq.sh [VENV_DIR] [PYTHON]        (what `make setup-awq` runs)
#
# Why a separate venv: llmcompressor 0.14.0.1 pins transformers>=5.15,<=5.17 and
# compressed-tensors==0.19.0; the project pins transformers 5.23 (and .venv-vllm has 5.19). The
# pipeline never imports llm-compressor: the quantize-awq stage runs
# src/llmpipe/export/awq_worker.py with VENV_DIR/bin/python (quantize.awq_python) in a subprocess.
#
# torch is pinned first to 2.13.0, the CPU build (a wheel in the machine's pip find-links here);
# an unpinned torch would pull a multi-GB CUDA build on a CPU box.
set -euo pipefail
VENV=${1:-.venv-awq}
PY=${2:-python3.11}
TORCH=2.13.0
LLMCOMPRESSOR=0.14.0.1
# what llmcompressor 0.14.0.1 resolved to when this script was written (its own pins allow these)
PINS=("transformers==5.17.0" "compressed-tensors==0.19.0")
cd "$(dirname "$0")/.."

if ! command -v "$PY" >/dev/null 2>&1; then PY=python3; fi
rm -f "$VENV/bin/.installed"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup-awq] creating $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
start=$(date +%s)
echo "[setup-awq] installing torch==$TORCH and llmcompressor==$LLMCOMPRESSOR into $VENV (about 1.5 GB)"
"${PIP[@]}" install -q "torch==$TORCH"
"${PIP[@]}" install -q "torch==$TORCH" "llmcompressor==$LLMCOMPRESSOR" "${PINS[@]}"
# Smoke check: the pieces the worker uses import.
"$VENV/bin/python" -c "
import torch, transformers, compressed_tensors, llmcompressor
from llmcompressor import oneshot
from llmcompressor.modifiers.awq import AWQModifier
from llmcompressor.pipelines.cache import IntermediatesCache
print('[setup-awq] llmcompressor', llmcompressor.__version__, 'compressed-tensors', compressed_tensors.__version__,
      'transformers', transformers.__version__, 'torch', torch.__version__)"
touch "$VENV/bin/.installed"
echo "[setup-awq] done in $(( $(date +%s) - start )) s; $(du -sh "$VENV" | cut -f1) on disk"
