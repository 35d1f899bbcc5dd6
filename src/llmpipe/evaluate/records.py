"""Access to canonical records (docs/ARCHITECTURE.md) from the evaluation side."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmpipe.data.records import iter_json_objects

Messages = list[dict[str, str]]


class RecordError(ValueError):
    """A canonical record is unusable for evaluation."""


def load_records(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Read a split file; every record must end with an assistant reply (the reference)."""
    p = Path(path)
    out = []
    for lineno, rec in iter_json_objects(p, RecordError, missing_hint=" (run the split stage first)"):
        msgs = rec.get("messages")
        if not isinstance(msgs, list) or len(msgs) < 2 or msgs[-1].get("role") != "assistant":
            raise RecordError(f"{p}:{lineno}: record has no final assistant message (reference)")
        out.append(rec)
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise RecordError(f"{p}: no records")
    return out


def prompt_messages(record: dict[str, Any]) -> Messages:
    """All messages except the final assistant reply."""
    return [{"role": m["role"], "content": m["content"]} for m in record["messages"][:-1]]


def reference_reply(record: dict[str, Any]) -> str:
    return record["messages"][-1]["content"]
