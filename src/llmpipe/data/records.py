"""The canonical record: helpers shared by every data stage (see docs/ARCHITECTURE.md)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any, Iterator

ROLES = ("system", "user", "assistant")

# A sharded records output (``curation.shards`` > 1) is a directory at the file's path holding
# part-00000.jsonl, part-00001.jsonl, ...: concatenated in name order they are the single file.
SHARD_NAME = re.compile(r"part-\d{5}\.jsonl")


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


def _decoded_lines(fh, file: str | os.PathLike[str], error: type[Exception]) -> Iterator[tuple[int, str]]:
    """(line number, line) for each non-blank line of the binary file ``fh``; invalid UTF-8
    raises ``error`` naming ``file`` and the physical line."""
    for lineno, raw in enumerate(fh, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise error(f"{file}:{lineno}: not valid UTF-8 ({exc.reason})") from None
        if line.strip():
            yield lineno, line


def _json_object(file: str | os.PathLike[str], lineno: int, line: str, error: type[Exception]) -> dict[str, Any]:
    """The JSON object on one line; invalid JSON or another JSON value raises ``error``."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise error(f"{file}:{lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise error(f"{file}:{lineno}: expected a JSON object, got {type(obj).__name__}")
    return obj


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
        for lineno, line in _decoded_lines(fh, path, error):
            yield lineno, _json_object(path, lineno, line, error)


def record_files(
    path: str | os.PathLike[str], error: type[Exception] = ValueError, *, missing_hint: str = ""
) -> list[str]:
    """The JSONL files of a records output: ``[path]`` for a file, its ``part-NNNNN.jsonl``
    shards in name order for a directory (a sharded output, ``curation.shards`` > 1)."""
    if os.path.isdir(path):
        files = sorted(e.name for e in os.scandir(path) if SHARD_NAME.fullmatch(e.name))
        if not files:
            raise error(f"{path}: directory holds no part-NNNNN.jsonl shards{missing_hint}")
        return [os.path.join(path, name) for name in files]
    if not os.path.exists(path):
        raise error(f"{path}: input file not found{missing_hint}")
    return [os.fspath(path)]


def iter_record_lines(
    path: str | os.PathLike[str], error: type[Exception] = ValueError, *, missing_hint: str = ""
) -> Iterator[tuple[str, int, str]]:
    """Yield (file, line number, line) for each non-blank line of a records file or of the shards
    of a records directory, in order; invalid UTF-8 raises ``error`` naming the file and line."""
    for file in record_files(path, error, missing_hint=missing_hint):
        with open(file, "rb") as fh:
            for lineno, line in _decoded_lines(fh, file, error):
                yield file, lineno, line


def parse_record(
    file: str, lineno: int, line: str, error: type[Exception] = ValueError, *, require_id: bool = False
) -> dict[str, Any]:
    """One line of a pipeline records file as a canonical record; problems raise ``error``
    naming the file and line (invalid JSON, not an object, no ``messages`` list or ``id``)."""
    obj = _json_object(file, lineno, line, error)
    if not isinstance(obj.get("messages"), list) or (require_id and not isinstance(obj.get("id"), str)):
        need = "a string 'id' and a 'messages' list" if require_id else "a 'messages' list"
        raise error(f"{file}:{lineno}: record needs {need}")
    return obj


def iter_records(
    path: str | os.PathLike[str], error: type[Exception] = ValueError, *, require_id: bool = False
) -> Iterator[dict[str, Any]]:
    """Stream the canonical records of a pipeline records output (a JSONL file, or a directory
    of ``part-NNNNN.jsonl`` shards read in name order), with :func:`read_records`' checks."""
    for file, lineno, line in iter_record_lines(path, error, missing_hint=" (did the previous stage run?)"):
        yield parse_record(file, lineno, line, error, require_id=require_id)


def read_records(
    path: str | os.PathLike[str], error: type[Exception] = ValueError, *, require_id: bool = False
) -> list[dict[str, Any]]:
    """Read a pipeline records output (the output of a previous stage): a JSONL file or a
    directory of ``part-NNNNN.jsonl`` shards (``curation.shards`` > 1), in order.

    Every problem raises ``error`` naming the file and line: a missing file, invalid UTF-8,
    invalid JSON, a value that is not an object, a record without a ``messages`` list (or, with
    ``require_id``, without a string ``id``). Blank lines are skipped.
    """
    return list(iter_records(path, error, require_id=require_id))
