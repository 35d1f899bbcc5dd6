"""Typed sections for the export stages: ``quantize`` (GGUF) and ``quantize_awq`` (AWQ W4A16)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from llmpipe.config.base import Section


class QuantizeSection(Section):
    name: str = Field(min_length=1, pattern=r"^[^/\\]+$")  # file-name stem of models/gguf/<name>-<type>.gguf
    # llama.cpp quant types made from the f16 conversion. Upper-cased here; whether llama.cpp
    # knows a name is checked by llmpipe.export.gguf.normalise_quant_type (it needs llama.cpp).
    types: list[str] = Field(min_length=1)
    n_threads: int = Field(ge=1)
    n_ctx: int = Field(ge=2)
    ppl_max_examples: int = Field(ge=1)
    reply_max_tokens: int = Field(ge=1)
    bench_tokens: int = Field(ge=2)

    @field_validator("types")
    @classmethod
    def _types(cls, v: list[str]) -> list[str]:
        names = [t.strip().upper() for t in v]
        if any(not t for t in names):
            raise ValueError("quant type names must be non-empty")
        if "F16" in names:
            raise ValueError("F16 is always written; list only quantized types, e.g. [Q8_0, Q4_K_M]")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate quant types in {v}")
        return names


class QuantizeAwqSection(Section):
    """The quantize-awq stage: a 4-bit AWQ (W4A16) checkpoint of the merged model, llm-compressor.

    Its own section, not keys under ``quantize``: the quantize stage declares the whole
    ``quantize`` section, so any key added there would change its params in dvc.lock and re-run
    it (docs/export.md, "AWQ").
    """

    enabled: bool             # false: the stage writes only a marker (no AWQ venv needed)
    python: str = Field(min_length=1)  # interpreter of the AWQ venv (relative to the repo root)
    group_size: int = Field(ge=1)      # weights per scale; must divide every quantized layer's input width
    symmetric: bool           # false: a zero point per group (llm-compressor's AWQ default, W4A16_ASYM)
    calibration_samples: int = Field(ge=1)  # first N records of data/split/train.jsonl
    max_seq_length: int = Field(ge=2)       # calibration records are cut to this many tokens
    n_grid: int = Field(ge=2)               # AWQ's scale grid search points per mapping
    ignore: list[str]         # modules left in full precision (llm-compressor names/regexes)
    dtype: Literal["bfloat16", "float16", "float32"]  # of the saved scales and unquantized tensors
