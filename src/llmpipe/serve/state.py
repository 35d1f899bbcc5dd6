"""Deployment state (atomic JSON file) and the decision log (JSON Lines, one line per decision).

The state is rewritten atomically (temp file + rename) after every change, so a controller that
is killed at any point restarts from the last decision.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any

from llmpipe.io import write_json

STATE_SCHEMA = "llmpipe.deploy-state/1"
PHASES = ("stable", "canary", "promoted", "rolled_back")


class StateError(RuntimeError):
    """The state file exists but cannot be used."""


def utcnow() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def initial_state(stable: dict[str, Any], canary: dict[str, Any] | None, steps: list[float]) -> dict[str, Any]:
    return {
        "schema": STATE_SCHEMA,
        "phase": "canary" if canary else "stable",
        "step": 0,
        "steps": list(steps),
        "canary_weight": float(steps[0]) if canary else 0.0,
        "stable": stable,
        "canary": canary,
        "decisions": 0,
        "restarts": 0,
        "updated_at": utcnow(),
    }


class StateStore:
    """Load/save the state file and append decisions to the log."""

    def __init__(self, state_path: str | Path, log_path: str | Path) -> None:
        self.state_path = Path(state_path)
        self.log_path = Path(log_path)

    def load(self) -> dict[str, Any] | None:
        if not self.state_path.exists():
            return None
        try:
            state = json.loads(self.state_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise StateError(f"{self.state_path}:{exc.lineno}: corrupt state file ({exc.msg})") from exc
        if not isinstance(state, dict) or state.get("schema") != STATE_SCHEMA:
            raise StateError(f"{self.state_path}: not a deploy state file (schema {STATE_SCHEMA} expected)")
        if state.get("phase") not in PHASES:
            raise StateError(f"{self.state_path}: unknown phase {state.get('phase')!r}")
        return state

    def save(self, state: dict[str, Any]) -> None:
        state["updated_at"] = utcnow()
        write_json(self.state_path, state)

    def log(self, decision: dict[str, Any]) -> dict[str, Any]:
        """Append one decision (one JSON line, fsynced)."""
        entry = {"ts": utcnow(), **decision}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(entry, sort_keys=True, ensure_ascii=False) + "\n"
        with open(self.log_path, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
        return entry

    def decisions(self) -> list[dict[str, Any]]:
        if not self.log_path.exists():
            return []
        with open(self.log_path, encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]
