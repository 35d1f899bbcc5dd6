"""The canonical record: helpers shared by every data stage (see docs/ARCHITECTURE.md)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

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
