"""The serving stack's persistent state: releases, the rollout in progress, and the deploy lock.

One JSON file (``<state_dir>/state.json``), rewritten atomically after every change, so a
restarted stack comes back with the same stable model, the same canary at the same step and
weight, and the same lock. The lock is a lease: a deploy renews it; when it expires the stack
holds the canary at weight 0 until the next deploy resumes or rolls it back.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

from llmpipe.io import write_json

SCHEMA = "llmpipe.serve-stack/1"
ROLLOUT_STATUSES = ("attached", "running", "held")


class StackStateError(RuntimeError):
    """The state file exists but cannot be used."""


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class StackState:
    """Load, change and save ``state.json``; the lock logic takes ``now`` so it is testable."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.data: dict[str, Any] = {"schema": SCHEMA, "stable": None, "canary": None, "rollout": None,
                                     "lock": None, "previous_stable": None, "window": 0}

    def load(self) -> bool:
        """Read the file if it exists (True) - a restart keeps everything it says."""
        if not self.path.exists():
            return False
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise StackStateError(f"{self.path}:{exc.lineno}: corrupt state file ({exc.msg})") from exc
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise StackStateError(f"{self.path}: not a serve-stack state file (schema {SCHEMA} expected)")
        rollout = data.get("rollout")
        if rollout is not None and rollout.get("status") not in ROLLOUT_STATUSES:
            raise StackStateError(f"{self.path}: unknown rollout status {rollout.get('status')!r}")
        self.data.update(data)
        return True

    def save(self) -> None:
        self.data["updated_at"] = time.time()
        write_json(self.path, self.data)

    # -- the deploy lock -------------------------------------------------------------------
    def lock_holder(self, now: float) -> dict[str, Any] | None:
        lock = self.data.get("lock")
        return lock if lock and lock["expires_at"] > now else None

    def acquire(self, owner: str, ttl_s: float, now: float) -> tuple[str | None, str]:
        """(token, "") when the lock is free or expired, else (None, why it is refused)."""
        held = self.lock_holder(now)
        if held:
            return None, (f"deploy lock held by '{held['owner']}' since "
                          f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(held['acquired_at']))} "
                          f"(expires in {held['expires_at'] - now:.0f}s unless renewed); concurrent deploys are refused")
        token = secrets.token_urlsafe(24)
        self.data["lock"] = {"owner": owner, "token_sha256": _digest(token), "acquired_at": now,
                             "ttl_s": ttl_s, "expires_at": now + ttl_s}
        return token, ""

    def holds(self, token: str | None, now: float) -> bool:
        held = self.lock_holder(now)
        return bool(token and held and hmac.compare_digest(held["token_sha256"], _digest(token)))

    def renew(self, token: str, ttl_s: float, now: float) -> bool:
        if not self.holds(token, now):
            return False
        self.data["lock"].update(ttl_s=ttl_s, expires_at=now + ttl_s)
        return True

    def touch(self, token: str | None, now: float) -> None:
        """Extend the holder's lease by its TTL (any successful call from the holder)."""
        lock = self.data.get("lock")
        if lock and token and hmac.compare_digest(lock["token_sha256"], _digest(token)):
            lock["expires_at"] = max(lock["expires_at"], now + lock["ttl_s"])

    def release(self, token: str, now: float) -> bool:
        if not self.holds(token, now):
            return False
        self.data["lock"] = None
        return True

    def expired_lock(self, now: float) -> dict[str, Any] | None:
        """Drop an expired lock and return it (None when there is none or it is still valid)."""
        lock = self.data.get("lock")
        if lock and lock["expires_at"] <= now:
            self.data["lock"] = None
            return lock
        return None

    def public(self, now: float) -> dict[str, Any]:
        """The state without secrets or bulky samples (control API and logs)."""
        lock = self.lock_holder(now)
        rollout = self.data.get("rollout")
        return {
            "stable": _public_release(self.data.get("stable")),
            "canary": _public_release(self.data.get("canary")),
            "rollout": {k: v for k, v in rollout.items() if k != "baseline"} if rollout else None,
            "lock": {"owner": lock["owner"], "acquired_at": lock["acquired_at"],
                     "expires_in_s": round(lock["expires_at"] - now, 1)} if lock else None,
            "previous_stable": self.data.get("previous_stable"),
        }


def _public_release(rel: dict[str, Any] | None) -> dict[str, Any] | None:
    if rel is None:
        return None
    return {k: v for k, v in rel.items() if k not in ("api_key",)}


def append_event(path: str | Path, event: dict[str, Any]) -> dict[str, Any]:
    """One JSON line per control action (fsynced): the stack's own audit log."""
    entry = {"ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **event}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return entry
