"""Collect the lineage of a model version: what it was built from and how it scored.

Everything comes from files the pipeline commits (params.yaml, dvc.lock, metrics/*.json) plus
git HEAD, so a version tag can be traced back to its exact inputs.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import yaml

LINEAGE_SCHEMA = "llmpipe.lineage/1"


class LineageError(RuntimeError):
    """A file needed for lineage is missing or malformed."""


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as exc:
        raise LineageError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from exc


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except yaml.YAMLError as exc:
        raise LineageError(f"{path}: invalid YAML ({exc})") from exc


def lock_artifacts(lock: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Map every output path in dvc.lock to its hash info ({md5, size, nfiles, stage})."""
    result: dict[str, dict[str, Any]] = {}
    for stage, body in ((lock or {}).get("stages") or {}).items():
        for out in (body or {}).get("outs") or []:
            info = {k: out[k] for k in ("md5", "etag", "size", "nfiles", "hash") if k in out}
            info["stage"] = stage
            result[out["path"]] = info
    return result


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _git(repo: Path, *args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)
    if proc.returncode != 0:
        raise LineageError(f"git {' '.join(args)} failed in {repo}: {proc.stderr.strip()}")
    return proc.stdout.strip()


def build_lineage(
    repo: str | Path,
    *,
    artifact: str,
    version: str,
    model_path: str,
    params_file: str = "params.yaml",
    lock_file: str = "dvc.lock",
    data_metrics: str = "metrics/data.json",
    eval_metrics: str = "metrics/eval.json",
    gate_metrics: str = "metrics/gate.json",
) -> dict[str, Any]:
    """Build the lineage record stored in the version tag's message."""
    repo = Path(repo)
    params = _read_yaml(repo / params_file) or {}
    lock = _read_yaml(repo / lock_file)
    data = _read_json(repo / data_metrics) or {}
    artifacts = lock_artifacts(lock)
    params_text = json.dumps(params, sort_keys=True, separators=(",", ":"))
    model_hash = artifacts.get(model_path)
    if model_hash is None:
        # The model may be inside a tracked directory output (e.g. models/gguf).
        for path, info in artifacts.items():
            if model_path.startswith(path.rstrip("/") + "/"):
                model_hash = {**info, "inside": path}
                break
    model_file = repo / model_path
    model_sha256 = _sha256(model_file) if model_file.is_file() else None
    return {
        "schema": LINEAGE_SCHEMA,
        "artifact": artifact,
        "version": version,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git": {
            "commit": _git(repo, "rev-parse", "HEAD"),
            "branch": _git(repo, "rev-parse", "--abbrev-ref", "HEAD"),
        },
        "model": {"path": model_path, "sha256": model_sha256, "dvc_lock": model_hash},
        "base_model": (params.get("model") or {}).get("name_or_path"),
        "dataset_version": data.get("dataset_version"),
        "params_sha256": hashlib.sha256(params_text.encode()).hexdigest(),
        "params": params,
        "metrics": {
            "eval": _read_json(repo / eval_metrics),
            "gate": _read_json(repo / gate_metrics),
        },
        "artifacts": artifacts,
    }
