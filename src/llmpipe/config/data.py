"""Typed sections for the curation stages: ``validate``, ``pii``, ``dedup``, ``split``."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

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


# Entity types pii-scrub can detect (llmpipe.data.pii registers one recognizer set per type).
PII_ENTITIES = (
    "PERSON",
    "EMAIL_ADDRESS",
    "PHONE_NUMBER",
    "CREDIT_CARD",
    "US_SSN",
    "IP_ADDRESS",
    "IBAN_CODE",
    "STREET_ADDRESS",
)


class PiiSection(Section):
    language: str = Field(min_length=1)
    spacy_model: str = Field(min_length=1)
    entities: list[str] = Field(min_length=1)
    score_threshold: float = Field(ge=0.0, le=1.0)
    replacement: str
    # Regions whose *national* phone formats are recognised (+CC numbers are found for all).
    phone_regions: list[str]
    person_patterns: bool
    keep_patterns: list[str]
    workers: int = Field(ge=1)
    batch_size: int = Field(ge=1)

    @field_validator("entities")
    @classmethod
    def _known_entities(cls, value: list[str]) -> list[str]:
        bad = [e for e in value if e not in PII_ENTITIES]
        if bad:
            raise ValueError(f"unsupported {bad}; supported: {list(PII_ENTITIES)}")
        if len(set(value)) != len(value):
            raise ValueError(f"duplicates in {value}")
        return value

    @field_validator("replacement")
    @classmethod
    def _template(cls, value: str) -> str:
        try:
            value.format(entity_type="PERSON")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"{value!r} is not a valid template (only {{entity_type}} may be used): "
                             f"{exc}") from None
        return value

    @field_validator("phone_regions")
    @classmethod
    def _regions(cls, value: list[str]) -> list[str]:
        for region in value:
            if not re.fullmatch(r"[A-Z]{2}", region):
                raise ValueError(f"{region!r} is not a two-letter region code")
        return value

    @field_validator("keep_patterns")
    @classmethod
    def _regexes(cls, value: list[str]) -> list[str]:
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a valid regex: {exc}") from None
        return value

    @model_validator(mode="after")
    def _phone_needs_regions(self) -> "PiiSection":
        if "PHONE_NUMBER" in self.entities and not self.phone_regions:
            raise ValueError("phone_regions: must list at least one region when PHONE_NUMBER is on")
        return self

    def replacement_for(self, entity_type: str) -> str:
        return self.replacement.format(entity_type=entity_type)


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
