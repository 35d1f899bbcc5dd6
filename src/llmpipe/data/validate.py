"""Validate normalised conversations and split them into accepted records and rejects.

Each conversation is first repaired by the ``validate.repair`` policy (``llmpipe.data.repair``:
empty turns, leading assistant turns, same-role runs, a trailing user turn); every repair of a
record that comes out valid is counted in the metrics and listed in the repairs report.
Structural rules live in a pydantic model (``Conversation``); each rule raises a
``PydanticCustomError`` whose type is the reject reason code, so metrics and the rejects file
speak the same vocabulary. Token-length rules need the base model's tokenizer and run after the
structural ones.

The stage streams (``validate_files``): items are read lazily, judged in batches by a
``Validator`` (in this process, or on Ray actors: ``llmpipe.curation.ray_validate``), and each
outcome is counted and written as it comes back, in input order; memory is bounded by the
batches in flight, not by the corpus.

Reason codes: read problems from ``formats`` (empty_file, invalid_utf8, malformed_json,
line_too_long, truncated_json_array), mapping problems (not_an_object, unknown_format,
wrong_type, unknown_role, non_text_content) and rules here (empty_content, system_not_first,
no_user_turn, bad_alternation, last_not_assistant, missing_system_prompt,
response_too_short, too_many_tokens).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from llmpipe.config.data import ValidateSection
from llmpipe.data import formats
from llmpipe.data.records import make_record
from llmpipe.data.repair import REPAIR_KINDS, Repair, repair_messages
from llmpipe.io import atomic_path, jsonl_line, write_jsonl_lines, write_records


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
class Accepted:
    """A valid record, with its repairs-report entry (None: nothing was repaired)."""

    record: dict[str, Any]
    repair: dict[str, Any] | None
    format: str


Outcome = Accepted | Reject
Item = formats.RawItem | formats.ReadProblem
# Validates batches of raw items, yielding each batch's outcomes in input order: in this process
# (``local_batch_map``) or on a Ray actor pool (``llmpipe.curation.ray_validate.ray_batch_map``).
BatchMap = Callable[[Iterator[list[Item]]], Iterator[list[Outcome]]]


@dataclass
class ValidationResult:
    """Everything in lists (``validate_items``: tests and benchmarks on small inputs; the stage
    streams with ``validate_files``)."""

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


class Validator:
    """Judges one raw item at a time: an ``Accepted`` record or a ``Reject``. Holds no state
    between items, so batches can run anywhere (this process, Ray actors) in any grouping.

    ``max_seq_len`` (model.max_seq_len) bounds a conversation's tokens, chat template applied.
    ``cfg.strict`` is not looked at here: the caller stops at the first reject in input order.
    """

    def __init__(self, cfg: ValidateSection, max_seq_len: int, counter: TokenCounter):
        self.cfg = cfg
        self.max_seq_len = max_seq_len
        self.counter = counter

    def __call__(self, batch: list[Item]) -> list[Outcome]:
        return [self.one(item) for item in batch]

    def one(self, item: Item) -> Outcome:
        cfg = self.cfg
        if isinstance(item, formats.ReadProblem):
            return Reject({"file": item.file, "line": item.line, "format": None}, item.reason, item.detail,
                          item.excerpt)
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
            reply_tokens = self.counter.text(messages[-1]["content"])
            if reply_tokens < cfg.min_response_tokens:
                raise formats.FormatError(
                    "response_too_short",
                    f"assistant reply has {reply_tokens} tokens, under validate.min_response_tokens="
                    f"{cfg.min_response_tokens}",
                )
            total = self.counter.conversation(messages)
            if total > self.max_seq_len:
                raise formats.FormatError(
                    "too_many_tokens",
                    f"conversation has {total} tokens, over model.max_seq_len={self.max_seq_len}",
                )
        except formats.FormatError as exc:
            return Reject(source, exc.reason, exc.detail, formats._excerpt(str(item.obj)))
        record = make_record(messages, norm.metadata, source)
        entry = _repair_entry(record, len(norm.messages), repairs) if repairs else None
        return Accepted(record, entry, norm.format)


def local_batch_map(validator: Validator) -> BatchMap:
    """Batches validated in this process, one after the other, as they are asked for."""
    return lambda batches: map(validator, batches)


class ValidationStats:
    """The metrics/validate.json counts, accumulated one outcome at a time (input order)."""

    def __init__(self) -> None:
        self.seen = 0
        self.valid = 0
        self.rejected = 0
        self.by_reason: Counter[str] = Counter()
        self.per_format: Counter[str] = Counter()
        self.per_file: dict[str, Counter[str]] = {}
        self.repaired = 0
        self.repaired_by_kind: Counter[str] = Counter()
        self.turns_by_kind: Counter[str] = Counter()

    def add(self, outcome: Outcome) -> None:
        self.seen += 1
        if isinstance(outcome, Reject):
            self.rejected += 1
            self.by_reason[outcome.reason] += 1
            self.per_file.setdefault(outcome.source["file"], Counter())["rejected"] += 1
            return
        self.valid += 1
        self.per_format[outcome.format] += 1
        self.per_file.setdefault(outcome.record["source"]["file"], Counter())["accepted"] += 1
        if outcome.repair is not None:
            self.repaired += 1
            self.repaired_by_kind.update({r["kind"] for r in outcome.repair["repairs"]})
            for r in outcome.repair["repairs"]:
                self.turns_by_kind[r["kind"]] += r["removed"]

    def to_metrics(self) -> dict[str, Any]:
        """The metrics/validate.json layout (sorted keys; every repair kind listed, zeros
        included, for clean diffs)."""
        assert self.seen == self.valid + self.rejected, "every item must be accepted or rejected"
        return {
            "items_read": self.seen,
            "records_valid": self.valid,
            "records_rejected": self.rejected,
            "rejected_by_reason": dict(sorted(self.by_reason.items())),
            "valid_by_format": dict(sorted(self.per_format.items())),
            "by_file": {f: dict(sorted(c.items())) for f, c in sorted(self.per_file.items())},
            "records_repaired": self.repaired,
            "repaired_records_by_kind": {k: self.repaired_by_kind[k] for k in REPAIR_KINDS},
            "repair_turns_removed_by_kind": {k: self.turns_by_kind[k] for k in REPAIR_KINDS},
        }


def batched(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    """``items`` in lists of ``size``, read lazily (the last list may be shorter)."""
    it = iter(items)
    while batch := list(islice(it, size)):
        yield batch


def strict_error(reject: Reject) -> StrictValidationError:
    return StrictValidationError(
        f"{reject.describe()}\n(validate.strict is true: fix the input or set validate.strict=false "
        "to reject such records and continue)"
    )


def iter_outcomes(
    items: Iterable[Item],
    cfg: ValidateSection,
    batch_map: BatchMap,
    batch_size: int,
    stats: ValidationStats,
    progress: Callable[[int], None] | None = None,
) -> Iterator[Outcome]:
    """Every item's outcome, in input order, counted into ``stats`` as it goes by. Holds one
    batch at a time (the batch map: a bounded number). ``cfg.strict``: raises
    ``StrictValidationError`` at the first reject in input order, before it is yielded."""
    for outcomes in batch_map(batched(items, batch_size)):
        for outcome in outcomes:
            stats.add(outcome)
            if progress and stats.seen % 1000 == 0:
                progress(stats.seen)
            if cfg.strict and isinstance(outcome, Reject):
                raise strict_error(outcome)
            yield outcome


def validate_items(
    items: Iterable[Item],
    cfg: ValidateSection,
    max_seq_len: int,
    counter: TokenCounter,
    progress: Callable[[int], None] | None = None,
) -> ValidationResult:
    """Turn raw items into canonical records, repairs and rejects, all in lists; enforce
    ``cfg.strict``. The stage streams instead (``validate_files``): same records, same order."""
    stats = ValidationStats()
    records: list[dict[str, Any]] = []
    rejects: list[Reject] = []
    repaired: list[dict[str, Any]] = []
    for outcome in iter_outcomes(items, cfg, local_batch_map(Validator(cfg, max_seq_len, counter)), 1,
                                 stats, progress):
        if isinstance(outcome, Reject):
            rejects.append(outcome)
        else:
            records.append(outcome.record)
            if outcome.repair is not None:
                repaired.append(outcome.repair)
    return ValidationResult(records, rejects, repaired, stats.to_metrics())


def _repair_entry(record: dict[str, Any], turns_in: int, repairs: list[Repair]) -> dict[str, Any]:
    """A repairs-report line: which record (id, file:line), what was done to which turns."""
    return {
        "id": record["id"],
        "source": record["source"],
        "turns_in": turns_in,
        "repairs": [r.to_json() for r in repairs],
    }


def iter_inputs(cfg: ValidateSection) -> Iterable[Item]:
    """Every item of ``validate.inputs``, file by file, read lazily (a JSON-array file is
    decoded from memory: ``formats.iter_file``)."""
    files = formats.discover(list(cfg.inputs))
    if not files:
        raise FileNotFoundError(f"validate.inputs {list(cfg.inputs)}: no *.jsonl or *.json files found")
    for path in files:
        yield from formats.iter_file(path, cfg.max_line_bytes)


@dataclass
class ValidateOutputs:
    records: str | os.PathLike[str]  # a file, or (shards > 1) a directory of shards
    rejects: str | os.PathLike[str]
    repairs: str | os.PathLike[str]


@dataclass
class ValidateSummary:
    metrics: dict[str, Any]
    first_rejects: list[Reject]  # the first SHOWN_REJECTS, in input order (the stage prints them)


SHOWN_REJECTS = 20


def validate_files(
    cfg: ValidateSection,
    out: ValidateOutputs,
    batch_map: BatchMap,
    batch_size: int,
    shards: int,
    progress: Callable[[int], None] | None = None,
) -> ValidateSummary:
    """The validate stage: read ``validate.inputs`` lazily, validate in batches of
    ``batch_size`` through ``batch_map``, and write each outcome as it comes back (records,
    rejects, repairs; atomically: on any error, strict mode included, nothing is left behind).

    Memory holds the batches in flight and the counters, never the corpus. ``shards`` > 1
    needs the number of records before the first shard is written: the records go to one
    temporary file first and are then cut into shards (one more sequential pass over them).
    """
    stats = ValidationStats()
    shown: list[Reject] = []
    with _cleanup_new_dirs(out.records, out.rejects, out.repairs), \
            atomic_path(out.rejects) as rejects_tmp, open(rejects_tmp, "w", encoding="utf-8") as rejects, \
            atomic_path(out.repairs) as repairs_tmp, open(repairs_tmp, "w", encoding="utf-8") as repairs:

        def records() -> Iterator[dict[str, Any]]:
            for outcome in iter_outcomes(iter_inputs(cfg), cfg, batch_map, batch_size, stats, progress):
                if isinstance(outcome, Reject):
                    rejects.write(jsonl_line(outcome.to_json()))
                    if len(shown) < SHOWN_REJECTS:
                        shown.append(outcome)
                    continue
                if outcome.repair is not None:
                    repairs.write(jsonl_line(outcome.repair))
                yield outcome.record

        written = _write_streamed_records(out.records, records(), shards)
    metrics = stats.to_metrics()
    if written != metrics["records_valid"]:
        raise RuntimeError(f"validate lost records: {metrics['records_valid']} valid, {written} written")
    return ValidateSummary(metrics, shown)


def _write_streamed_records(path: str | os.PathLike[str], rows: Iterator[dict[str, Any]], shards: int) -> int:
    """``write_records`` for rows whose number is known only at the end."""
    if shards == 1:
        return write_records(path, rows)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".unsharded.tmp", dir=path.parent)
    os.close(fd)
    try:
        total = write_records(name, rows)
        # newline="\n": split on the record separator only (a record's text may hold U+2028...)
        with open(name, encoding="utf-8", newline="\n") as fh:
            return write_jsonl_lines(path, fh, shards, total)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)


@contextlib.contextmanager
def _cleanup_new_dirs(*paths: str | os.PathLike[str]) -> Iterator[None]:
    """On an error, remove the output folders this call created (if still empty), so that a
    failed run leaves the tree as it found it."""
    new = []
    for p in paths:
        d = Path(p).absolute().parent
        while not d.exists() and d not in new:
            new.append(d)
            d = d.parent
    try:
        yield
    except BaseException:
        for d in sorted(new, key=lambda d: len(d.parts), reverse=True):
            with contextlib.suppress(OSError):
                d.rmdir()
        raise


def stderr_progress(start: float | None = None) -> Callable[[int], None]:
    t0 = start or time.perf_counter()

    def report(n: int) -> None:
        rate = n / max(time.perf_counter() - t0, 1e-9)
        print(f"[validate] {n} items validated ({rate:,.0f}/s)", file=sys.stderr, flush=True)

    return report
