"""Typed section for the export stage: ``quantize``."""

from __future__ import annotations

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
