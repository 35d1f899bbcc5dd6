"""Load ``params.yaml``: the single source of configuration for every stage."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

DEFAULT_PARAMS = "params.yaml"


class ParamsError(ValueError):
    """A required parameter is missing or has the wrong type."""


def load_params(path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Read params.yaml (or ``$LLMPIPE_PARAMS`` / ``path``)."""
    p = Path(path or os.environ.get("LLMPIPE_PARAMS", DEFAULT_PARAMS))
    if not p.exists():
        raise ParamsError(f"{p}: parameters file not found (run from the repository root)")
    data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ParamsError(f"{p}: top level must be a mapping")
    return data


def section(params: dict[str, Any], name: str) -> dict[str, Any]:
    """Return ``params[name]`` as a dict, with a clear error when it is missing."""
    value = params.get(name)
    if not isinstance(value, dict):
        raise ParamsError(f"params.yaml: section '{name}' is missing or is not a mapping")
    return value
