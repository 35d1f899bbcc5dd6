"""Typed sections for the curation stages: ``validate``, ``pii``, ``dedup``, ``split``."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator

from llmpipe.config.base import Section

Role = Literal["system", "user", "assistant"]
SplitName = Literal["train", "val", "test"]


class RepairSection(Section):
    """``validate.repair``: how a conversation is repaired before it is judged (see data/repair.py)."""

    # Drop empty or whitespace-only turns anywhere but in the last place (an empty last turn,
    # e.g. an empty final reply, is rejected: there is nothing to train on).
    drop_empty_turns: bool
    # Drop assistant turns before the first user turn (chunked ShareGPT dumps start with `gpt`).
    drop_leading_non_user: bool
    # Runs of turns with the same role: merge (join with merge_separator), drop (keep the last
    # turn of the run, the one the next turn answers) or reject (bad_alternation).
    same_role_turns: Literal["merge", "drop", "reject"]
    merge_separator: str
    # Drop a final user turn that got no reply (and so carries no training signal).
    drop_trailing_user: bool


class ValidateSection(Section):
    inputs: list[str] = Field(min_length=1)
    strict: bool
    require_system_prompt: bool
    default_system_prompt: str | None
    min_response_tokens: int = Field(ge=0)
    max_line_bytes: int = Field(gt=0)
    repair: RepairSection


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
    "SECRET",
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
    # PERSON from a name lexicon: "Call Aisha Petrova", "Dr. Okafor", "Hi Jonas,"; and spaCy's
    # PERSON spans kept only with a lexicon given name (technical words are not people).
    name_lexicon: bool
    # Names are looked for in prose only, not in fenced/inline code, stack traces, code lines.
    code_aware: bool
    # Phone numbers by shape in any common format, valid in their numbering plan or not.
    lenient_phones: bool
    keep_patterns: list[str]
    # Replaced spans (with context) kept per entity type in the review file.
    review_per_entity: int = Field(ge=0)
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
        if "PHONE_NUMBER" in self.entities and not self.lenient_phones and not self.phone_regions:
            raise ValueError("phone_regions: must list at least one region when PHONE_NUMBER is on")
        return self

    def replacement_for(self, entity_type: str) -> str:
        return self.replacement.format(entity_type=entity_type)


def _distinct_roles(value: list[str]) -> list[str]:
    if len(set(value)) != len(value):
        raise ValueError(f"roles must be distinct, got {value}")
    return value


Roles = Annotated[list[Role], AfterValidator(_distinct_roles)]


class DedupSection(Section):
    num_perm: int = Field(ge=16, le=4096)
    threshold: float = Field(gt=0.0, le=1.0)
    shingle_size: int = Field(ge=1, le=64)
    roles: Roles = Field(min_length=1)


class SplitSection(Section):
    ratios: dict[SplitName, float]
    seed: int
    stratify_key: str | None = Field(min_length=1)
    pin_key: str | None = Field(min_length=1)
    contamination_threshold: float = Field(gt=0.0, le=1.0)
    contamination_num_perm: int = Field(ge=16, le=4096)
    contamination_shingle_size: int = Field(ge=1, le=64)
    contamination_roles: Roles = Field(min_length=1)

    @field_validator("ratios")
    @classmethod
    def _ratios(cls, value: dict[str, float]) -> dict[str, float]:
        names = ("train", "val", "test")
        if set(value) != set(names):
            raise ValueError(f"needs exactly the keys {list(names)}, got {sorted(value)}")
        bad = {k: v for k, v in value.items() if not 0.0 <= v <= 1.0}
        if bad:
            raise ValueError(f"each ratio must be in [0, 1], got {bad}")
        if abs(sum(value.values()) - 1.0) > 1e-6:
            raise ValueError(f"ratios must sum to 1, got {sum(value.values())!r}")
        return {k: value[k] for k in names}


class CurationSection(Section):
    """``curation``: which engine runs validate, pii-scrub, minhash-dedup and split.

    Both engines write the same bytes (records, rejects, clusters, splits, metrics); the engine
    only decides where the work runs (docs/curation.md "Engines").
    """

    engine: Literal["local", "ray"]
    # Ray cluster to join ("host:port", "ray://host:10001" or "auto"); null: $RAY_ADDRESS when set,
    # else an embedded local Ray started for the stage and stopped after it.
    ray_address: str | None = Field(min_length=1)
    # Logical CPUs of the embedded local Ray (null: the machine's); ignored on a cluster.
    num_cpus: int | None = Field(ge=1)
    # Records per Ray batch (one task or actor call) for validate, minhash-dedup and split
    # (pii-scrub: pii.batch_size, over an actor pool of pii.workers analyzers).
    batch_size: int = Field(ge=1)
    # Ray workers (validate: actors, each with its own tokenizer; minhash/split: tasks) per step.
    workers: int = Field(ge=1)
    # Files per records output of validate, pii-scrub and minhash-dedup: 1 writes records.jsonl;
    # k > 1 writes records.jsonl/ as a directory of part-00000.jsonl ... (contiguous runs of the
    # input order; concatenated in name order they are the single file's bytes). Both engines.
    shards: int = Field(ge=1, le=100_000)
