"""Thin wrapper around the ``gto`` command line (Git Tag Ops) for one repository.

We call the CLI (``python -m gto``-equivalent entry point) rather than GTO's Python API: the
CLI is GTO's stable interface, and a subprocess keeps GitPython state out of the caller.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SEMVER = re.compile(r"^v(\d+)\.(\d+)\.(\d+)$")


class GtoError(RuntimeError):
    """A gto or git command failed."""


def _gto_executable() -> list[str]:
    exe = Path(sys.executable).with_name("gto")
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("gto")
    if found:
        return [found]
    raise GtoError("the 'gto' command is not installed (pip install gto==1.10.1)")


def parse_semver(version: str) -> tuple[int, int, int]:
    m = SEMVER.match(version)
    if not m:
        raise GtoError(f"version '{version}' is not semantic (expected vMAJOR.MINOR.PATCH)")
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def bump(version: str, part: str) -> str:
    major, minor, patch = parse_semver(version)
    if part == "major":
        return f"v{major + 1}.0.0"
    if part == "minor":
        return f"v{major}.{minor + 1}.0"
    if part == "patch":
        return f"v{major}.{minor}.{patch + 1}"
    raise GtoError(f"unknown version bump '{part}' (expected major, minor or patch)")


@dataclass(frozen=True)
class VersionInfo:
    version: str
    commit: str
    stages: tuple[str, ...]
    message: str


class Registry:
    """GTO registry of one git repository."""

    def __init__(self, repo: str | os.PathLike[str] = ".") -> None:
        self.repo = Path(repo).resolve()

    # -- low level -------------------------------------------------------------------------
    def _run(self, args: list[str], what: str) -> str:
        try:
            proc = subprocess.run(args, cwd=self.repo, capture_output=True, text=True, timeout=120)
        except FileNotFoundError as exc:
            raise GtoError(f"{what}: {exc}") from exc
        if proc.returncode != 0:
            msg = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
            tail = "\n".join(msg[-8:])
            raise GtoError(f"{what} failed (exit {proc.returncode}) in {self.repo}:\n{tail}")
        return proc.stdout

    def gto(self, *args: str) -> str:
        return self._run([*_gto_executable(), *args, "--repo", str(self.repo)], "gto " + " ".join(args[:2]))

    def git(self, *args: str) -> str:
        return self._run(["git", *args], "git " + " ".join(args[:2]))

    # -- reading ---------------------------------------------------------------------------
    def versions(self, artifact: str) -> list[VersionInfo]:
        """Registered, non-deregistered versions of ``artifact``, lowest semver first."""
        try:
            out = self.gto("show", artifact, "--json", "--ro")
        except GtoError as exc:
            if "Cannot find artifact" in str(exc):
                return []
            raise
        data = json.loads(out or "[]")
        result = []
        for v in data:
            if not v.get("registrations") or not SEMVER.match(v.get("version", "")):
                continue
            stages = tuple(s["stage"] for s in v.get("stages", []) if s.get("is_active", True))
            message = v["registrations"][-1].get("message", "")
            result.append(VersionInfo(v["version"], v["commit_hexsha"], stages, message))
        return sorted(result, key=lambda x: parse_semver(x.version))

    def stage_version(self, artifact: str, stage: str) -> str | None:
        """The version currently assigned to ``stage`` (None when nothing is)."""
        data = json.loads(self.gto("show", "--json") or "{}")
        entry = data.get(artifact) or {}
        return (entry.get("stage") or {}).get(stage)

    def lineage(self, artifact: str, version: str) -> dict[str, Any]:
        """The lineage JSON stored in the message of the annotated tag ``artifact@version``."""
        tag = f"{artifact}@{version}"
        out = self.git("for-each-ref", f"refs/tags/{tag}", "--format=%(contents)")
        if not out.strip():
            raise GtoError(f"tag '{tag}' not found in {self.repo}")
        try:
            return json.loads(out)
        except json.JSONDecodeError as exc:
            raise GtoError(f"tag '{tag}': message is not lineage JSON ({exc})") from exc

    def history(self, artifact: str) -> list[dict[str, Any]]:
        return json.loads(self.gto("history", artifact, "--json") or "[]")

    # -- writing ---------------------------------------------------------------------------
    def register(self, artifact: str, version: str, message: str, ref: str = "HEAD") -> str:
        self.gto("register", artifact, ref, "--version", version, "--message", message)
        return f"{artifact}@{version}"

    def assign(self, artifact: str, version: str, stage: str, message: str) -> None:
        self.gto("assign", artifact, "--version", version, "--stage", stage, "--message", message)

    def unassign(self, artifact: str, version: str, stage: str, message: str) -> None:
        self.gto("deprecate", artifact, version, stage, "--message", message)
