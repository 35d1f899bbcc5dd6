"""Checks that must pass before a model version may be promoted.

1. the gate passed (metrics/gate.json ``passed: true``);
2. the git workspace has no uncommitted changes to tracked files;
3. ``dvc status`` reports the pipeline outputs match the committed dvc.lock.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


class PromotionRefused(RuntimeError):
    """Promotion is not allowed; the message says why."""


def check_gate(repo: Path, gate_file: str) -> dict:
    path = repo / gate_file
    if not path.is_file():
        raise PromotionRefused(f"{gate_file}: gate result not found; run the pipeline (dvc repro) first")
    try:
        gate = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise PromotionRefused(f"{gate_file}:{exc.lineno}: invalid JSON ({exc.msg})") from exc
    if not isinstance(gate, dict) or "passed" not in gate:
        raise PromotionRefused(f"{gate_file}: no 'passed' field; cannot tell whether the gate passed")
    if gate["passed"] is not True:
        failed = [
            c.get("name", "?") + (f" ({c['reason']})" if c.get("reason") else "")
            for c in gate.get("checks", [])
            if isinstance(c, dict) and c.get("passed") is False
        ]
        detail = "; failed checks: " + ", ".join(failed) if failed else ""
        raise PromotionRefused(f"{gate_file}: the gate failed, refusing to promote{detail}")
    return gate


def check_git_clean(repo: Path) -> None:
    proc = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise PromotionRefused(f"{repo}: not a git repository ({proc.stderr.strip()})")
    dirty = [line for line in proc.stdout.splitlines() if line.strip()]
    if dirty:
        listing = ", ".join(line[3:] for line in dirty[:10]) + (" ..." if len(dirty) > 10 else "")
        raise PromotionRefused(
            f"workspace differs from the committed pipeline: uncommitted changes to {listing}; "
            "commit them (git commit) before promoting"
        )


def check_dvc_status(repo: Path) -> None:
    """Run ``dvc status --json`` (as a subprocess: library code never imports dvc)."""
    if not (repo / "dvc.yaml").is_file():
        return
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "--json"],
        cwd=repo, capture_output=True, text=True, timeout=600,
    )
    out = proc.stdout.strip()
    try:
        status = json.loads(out) if out else {}
    except json.JSONDecodeError:
        status = None
    if proc.returncode not in (0, 1) or status is None:
        raise PromotionRefused(
            f"dvc status failed (exit {proc.returncode}): {(proc.stderr or out).strip()[-500:]}"
        )
    if status:
        stages = ", ".join(f"{k}: {json.dumps(v, sort_keys=True)}" for k, v in list(status.items())[:5])
        raise PromotionRefused(
            "workspace differs from the committed pipeline (dvc status is not clean): "
            f"{stages}; run `dvc repro` and commit dvc.lock before promoting"
        )


def check_promotable(repo: str | Path, *, gate_file: str = "metrics/gate.json", check_dvc: bool = True) -> dict:
    """Run all checks; raise :class:`PromotionRefused` on the first failure. Returns the gate."""
    repo = Path(repo)
    gate = check_gate(repo, gate_file)
    check_git_clean(repo)
    if check_dvc:
        check_dvc_status(repo)
    return gate
