"""Typed section for the export stage: ``quantize``."""

from __future__ import annotations

from pydantic import Field

from llmpipe.config.base import Section


class QuantizeSection(Section):
    name: str
    types: list[str]
    n_threads: int = Field(ge=1)
    n_ctx: int = Field(gt=0)
    ppl_max_examples: int = Field(ge=1)
    reply_max_tokens: int = Field(ge=1)
    bench_tokens: int = Field(ge=1)
