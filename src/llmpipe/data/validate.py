"""Validate normalised conversations and split them into accepted records and rejects.

Each conversation is first repaired by the ``validate.repair`` policy (``llmpipe.data.repair``:
empty turns, leading assistant turns, same-role runs, a trailing user turn); every repair of a
record that comes out valid is counted in the metrics and listed in the repairs report.
Structural rules live in a pydantic model (``Conversation``); each rule raises a
``PydanticCustomError`` whose type is the reject reason code, so metrics and the rejects file
speak the same vocabulary. Token-length rules need the base model's tokenizer and run after the
structural ones.

Reason codes: read problems from ``formats`` (empty_file, invalid_utf8, malformed_json,
line_too_long, truncated_json_array), mapping problems (not_an_object, unknown_format,
wrong_type, unknown_role, non_text_content) and rules here (empty_content, system_not_first,
no_user_turn, bad_alternation, last_not_assistant, missing_system_prompt,
response_too_short, too_many_tokens).
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from llmpipe.config.data import ValidateSection
from llmpipe.data import formats
from llmpipe.data.records import make_record
from llmpipe.data.repair import REPAIR_KINDS, Repair, repair_messages


class StrictValidationError(RuntimeError):
    """Raised in strict mode at the first rejected record; names file, line and reason."""


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str

    @field_validator("content")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise PydanticCustomError("empty_content", "message content is empty or whitespace")
        return value


class Conversation(BaseModel):
    """A canonical conversation: optional leading system prompt, then user/assistant turns."""

    model_config = ConfigDict(strict=True)

    messages: list[Message]

    @model_validator(mode="after")
    def _structure(self) -> "Conversation":
        msgs = self.messages
        roles = [m.role for m in msgs]
        if "system" in roles[1:]:
            raise PydanticCustomError("system_not_first", "a system message may only come first")
        turns = roles[1:] if roles and roles[0] == "system" else roles
        if "user" not in turns:
            raise PydanticCustomError("no_user_turn", "conversation has no user message")
        for i, role in enumerate(turns):
            expected = "user" if i % 2 == 0 else "assistant"
            if role != expected:
                raise PydanticCustomError(
                    "bad_alternation",
                    "turn {index} is '{role}', expected '{expected}' (user/assistant must alternate,"
                    " starting with user)",
                    {"index": i + 1, "role": role, "expected": expected},
                )
        if turns[-1] != "assistant":
            raise PydanticCustomError("last_not_assistant", "the last message must be from the assistant")
        return self


def _first_error(exc: ValidationError) -> tuple[str, str]:
    err = exc.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in err.get("loc", ()))
    code = err["type"]
    known = {
        "empty_content", "system_not_first", "no_user_turn", "bad_alternation", "last_not_assistant",
    }
    if code not in known:
        code = "unknown_role" if "role" in loc and code == "literal_error" else "wrong_type"
    return code, f"{loc}: {err['msg']}" if loc else err["msg"]


@dataclass
class Reject:
    source: dict[str, Any]
    reason: str
    detail: str
    excerpt: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "reason": self.reason, "detail": self.detail, "excerpt": self.excerpt}

    def describe(self) -> str:
        return f"{self.source['file']}:{self.source['line']}: {self.reason}: {self.detail}"


@dataclass
class ValidationResult:
    records: list[dict[str, Any]]
    rejects: list[Reject]
    repairs: list[dict[str, Any]]  # one entry per valid record that was repaired
    metrics: dict[str, Any]


def check_structure(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """Validate with the pydantic model; raises ``formats.FormatError`` with the reason code."""
    try:
        conv = Conversation.model_validate({"messages": messages})
    except ValidationError as exc:
        code, detail = _first_error(exc)
        raise formats.FormatError(code, detail) from None
    return [m.model_dump() for m in conv.messages]


class TokenCounter:
    """Counts tokens the way training will see them (chat template applied)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def conversation(self, messages: list[dict[str, str]]) -> int:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False)
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def text(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def validation_metrics(seen: int, records: list, rejects: list, repaired: list, by_reason: Counter,
                       per_format: Counter, per_file: dict[str, Counter]) -> dict[str, Any]:
    """The metrics/validate.json layout, shared by the local and the Ray engine (sorted keys)."""
    return {
        "items_read": seen,
        "records_valid": len(records),
        "records_rejected": len(rejects),
        "rejected_by_reason": dict(sorted(by_reason.items())),
        "valid_by_format": dict(sorted(per_format.items())),
        "by_file": {f: dict(sorted(c.items())) for f, c in sorted(per_file.items())},
        **repair_metrics(repaired),
    }


def validate_items(
    items: Iterable[formats.RawItem | formats.ReadProblem],
    cfg: ValidateSection,
    max_seq_len: int,
    counter: TokenCounter,
    progress: Callable[[int], None] | None = None,
) -> ValidationResult:
    """Turn raw items into canonical records, repairs and rejects; enforce ``cfg.strict``.

    ``max_seq_len`` (model.max_seq_len) bounds a conversation's tokens, chat template applied.
    """
    records: list[dict[str, Any]] = []
    rejects: list[Reject] = []
    repaired: list[dict[str, Any]] = []
    per_format: Counter[str] = Counter()
    per_file: dict[str, Counter[str]] = {}
    seen = 0

    def reject(source: dict[str, Any], reason: str, detail: str, excerpt: str = "") -> None:
        r = Reject(source, reason, detail, excerpt)
        if cfg.strict:
            raise StrictValidationError(
                f"{r.describe()}\n(validate.strict is true: fix the input or set validate.strict=false "
                "to reject such records and continue)"
            )
        rejects.append(r)
        per_file.setdefault(source["file"], Counter())["rejected"] += 1

    for item in items:
        seen += 1
        if progress and seen % 1000 == 0:
            progress(seen)
        if isinstance(item, formats.ReadProblem):
            reject({"file": item.file, "line": item.line, "format": None}, item.reason, item.detail,
                   item.excerpt)
            continue
        source = {"file": item.file, "line": item.line, "format": None}
        try:
            norm = formats.normalise(item.obj)
            source["format"] = norm.format
            messages, repairs = repair_messages(norm.messages, norm.where, cfg.repair)
            if cfg.default_system_prompt and not (messages and messages[0].get("role") == "system"):
                messages = [{"role": "system", "content": cfg.default_system_prompt}] + messages
            messages = check_structure(messages)
            if cfg.require_system_prompt and messages[0]["role"] != "system":
                raise formats.FormatError("missing_system_prompt", "no system message and "
                                          "validate.require_system_prompt is true")
            reply_tokens = counter.text(messages[-1]["content"])
            if reply_tokens < cfg.min_response_tokens:
                raise formats.FormatError(
                    "response_too_short",
                    f"assistant reply has {reply_tokens} tokens, under validate.min_response_tokens="
                    f"{cfg.min_response_tokens}",
                )
            total = counter.conversation(messages)
            if total > max_seq_len:
                raise formats.FormatError(
                    "too_many_tokens",
                    f"conversation has {total} tokens, over model.max_seq_len={max_seq_len}",
                )
        except formats.FormatError as exc:
            excerpt = formats._excerpt(str(item.obj))
            reject(source, exc.reason, exc.detail, excerpt)
            continue
        per_format[norm.format] += 1
        per_file.setdefault(item.file, Counter())["accepted"] += 1
        record = make_record(messages, norm.metadata, source)
        records.append(record)
        if repairs:
            repaired.append(_repair_entry(record, len(norm.messages), repairs))

    metrics = validation_metrics(seen, records, rejects, repaired, Counter(r.reason for r in rejects),
                                 per_format, per_file)
    assert seen == len(records) + len(rejects), "every item must be accepted or rejected"
    return ValidationResult(records, rejects, repaired, metrics)


def _repair_entry(record: dict[str, Any], turns_in: int, repairs: list[Repair]) -> dict[str, Any]:
    """A repairs-report line: which record (id, file:line), what was done to which turns."""
    return {
        "id": record["id"],
        "source": record["source"],
        "turns_in": turns_in,
        "repairs": [r.to_json() for r in repairs],
    }


def repair_metrics(repaired: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts for metrics/validate.json: repaired records, and per repair kind the records it
    touched and the turns it removed (every kind listed, zeros included, for clean diffs)."""
    records = Counter()
    turns = Counter()
    for entry in repaired:
        kinds = {r["kind"] for r in entry["repairs"]}
        records.update(kinds)
        for r in entry["repairs"]:
            turns[r["kind"]] += r["removed"]
    return {
        "records_repaired": len(repaired),
        "repaired_records_by_kind": {k: records[k] for k in REPAIR_KINDS},
        "repair_turns_removed_by_kind": {k: turns[k] for k in REPAIR_KINDS},
    }


def iter_inputs(cfg: ValidateSection) -> Iterable[formats.RawItem | formats.ReadProblem]:
    files = formats.discover(list(cfg.inputs))
    if not files:
        raise FileNotFoundError(f"validate.inputs {list(cfg.inputs)}: no *.jsonl or *.json files found")
    for path in files:
        yield from formats.iter_file(path, cfg.max_line_bytes)


def validate_inputs(
    cfg: ValidateSection,
    max_seq_len: int,
    counter: TokenCounter,
    progress: Callable[[int], None] | None = None,
) -> ValidationResult:
    """Read every file of ``validate.inputs`` and validate what is in it (the validate stage)."""
    return validate_items(iter_inputs(cfg), cfg, max_seq_len, counter, progress)


def stderr_progress(start: float | None = None) -> Callable[[int], None]:
    t0 = start or time.perf_counter()

    def report(n: int) -> None:
        rate = n / max(time.perf_counter() - t0, 1e-9)
        print(f"[validate] {n} items read ({rate:,.0f}/s)", file=sys.stderr, flush=True)

    return report
