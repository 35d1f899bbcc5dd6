"""Typed sections for the curation stages: ``validate``, ``pii``, ``dedup``, ``split``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from llmpipe.config.base import Section

Role = Literal["system", "user", "assistant"]
SplitName = Literal["train", "val", "test"]


class ValidateSection(Section):
    inputs: list[str] = Field(min_length=1)
    strict: bool
    require_system_prompt: bool
    default_system_prompt: str | None
    min_response_tokens: int = Field(ge=0)
    max_line_bytes: int = Field(gt=0)


class PiiSection(Section):
    language: str
    spacy_model: str
    entities: list[str] = Field(min_length=1)
    score_threshold: float = Field(ge=0.0, le=1.0)
    replacement: str
    phone_regions: list[str]
    person_patterns: bool
    keep_patterns: list[str]
    workers: int = Field(ge=1)
    batch_size: int = Field(ge=1)


class DedupSection(Section):
    num_perm: int = Field(ge=16)
    threshold: float = Field(gt=0.0, le=1.0)
    shingle_size: int = Field(ge=1)
    roles: list[Role] = Field(min_length=1)


class SplitSection(Section):
    ratios: dict[SplitName, float]
    seed: int
    stratify_key: str | None
    pin_key: str | None
    contamination_threshold: float = Field(gt=0.0, le=1.0)
    contamination_num_perm: int = Field(ge=16)
    contamination_shingle_size: int = Field(ge=1)
    contamination_roles: list[Role] = Field(min_length=1)
