"""The canonical record: helpers shared by every data stage (see docs/ARCHITECTURE.md)."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Iterator

ROLES = ("system", "user", "assistant")


def record_id(messages: list[dict[str, str]]) -> str:
    """First 16 hex chars of sha256 over the compact, key-sorted JSON of ``messages``."""
    blob = json.dumps(
        [{"role": m["role"], "content": m["content"]} for m in messages],
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def make_record(
    messages: list[dict[str, str]], metadata: dict[str, Any] | None, source: dict[str, Any]
) -> dict[str, Any]:
    return {
        "id": record_id(messages),
        "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
        "metadata": dict(metadata or {}),
        "source": dict(source),
    }


def final_reply(record: dict[str, Any]) -> str:
    """The content of the last (assistant) message."""
    return record["messages"][-1]["content"]


def iter_json_objects(
    path: str | os.PathLike[str], error: type[Exception] = ValueError, *, missing_hint: str = ""
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank line of a JSONL file.

    Every problem raises ``error`` naming the file and the physical line: a missing file (with
    ``missing_hint`` appended), invalid UTF-8, invalid JSON, a value that is not an object.
    """
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        raise error(f"{path}: input file not found{missing_hint}") from None
    with fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise error(f"{path}:{lineno}: not valid UTF-8 ({exc.reason})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise error(f"{path}:{lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from None
            if not isinstance(obj, dict):
                raise error(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def read_records(
    path: str | os.PathLike[str], error: type[Exception] = ValueError, *, require_id: bool = False
) -> list[dict[str, Any]]:
    """Read a pipeline JSONL file of canonical records (the output of a previous stage).

    Every problem raises ``error`` naming the file and line: a missing file, invalid UTF-8,
    invalid JSON, a value that is not an object, a record without a ``messages`` list (or, with
    ``require_id``, without a string ``id``). Blank lines are skipped.
    """
    out: list[dict[str, Any]] = []
    for lineno, obj in iter_json_objects(path, error, missing_hint=" (did the previous stage run?)"):
        if not isinstance(obj.get("messages"), list) or (require_id and not isinstance(obj.get("id"), str)):
            need = "a string 'id' and a 'messages' list" if require_id else "a 'messages' list"
            raise error(f"{path}:{lineno}: record needs {need}")
        out.append(obj)
    return out
