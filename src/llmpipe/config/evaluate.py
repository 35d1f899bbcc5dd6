"""Typed sections for evaluation and promotion: ``eval`` and ``gate``."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from llmpipe.config.base import Section

PositiveInt = Annotated[int, Field(ge=1)]
# A gate threshold: a real number (not a bool, not NaN/inf), ints allowed (e.g. 5 points).
Threshold = Annotated[float, Field(strict=True, allow_inf_nan=False)]


class FewshotSection(Section):
    k: int = Field(ge=0)
    seed: int
    stratify_key: str | None


class LmEvalSection(Section):
    task_dir: str
    tasks: dict[str, str] = Field(min_length=1)   # task -> primary metric
    batch_size: int = Field(ge=1)
    limit: PositiveInt | None
    apply_chat_template: bool


class SafetySection(Section):
    data: str
    system_prompt: str | None
    max_new_tokens: int = Field(ge=1)


class JudgeSection(Section):
    enabled: bool
    base_url: str
    model: str
    api_key_env: str
    max_retries: int = Field(ge=0)
    retry_temperature: float = Field(ge=0.0)
    max_tokens: int = Field(ge=1)
    timeout_s: float = Field(gt=0)
    limit: PositiveInt | None


class EvalSection(Section):
    schema_: str = Field(alias="schema")
    fields: list[str] = Field(min_length=1)
    require_key_order: bool
    limit: PositiveInt | None
    max_new_tokens: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    device: Literal["auto", "cpu", "cuda"]
    num_threads: PositiveInt | None
    seed: int
    fewshot: FewshotSection
    lm_eval: LmEvalSection
    safety: SafetySection
    judge: JudgeSection


class GateSection(Section):
    min_task_accuracy: Threshold
    min_margin_over_baseline: Threshold
    min_format_compliance: Threshold
    max_general_drop_points: Threshold
    min_safety_refusal_rate: Threshold
    max_over_refusal_rate: Threshold
