"""The typed-config machinery shared by every params.yaml section.

Each section of params.yaml is one pydantic model (``Section``): unknown keys are errors, no
field has a default (defaults live in params.yaml only), and models are frozen. ``format_errors``
turns pydantic's errors into one line per problem with the full key path and, for a misspelled
key, the nearest valid name.
"""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError


class ParamsError(ValueError):
    """params.yaml is missing, malformed, or a key is unknown, missing or of the wrong type."""


class Section(BaseModel):
    """Base of every params.yaml section model: strict keys, no defaults in code, immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, populate_by_name=True)


def _field(model: type[BaseModel], key: str) -> Any:
    """The field that YAML key ``key`` fills (by alias first, then by name)."""
    for name, field in model.model_fields.items():
        if (field.alias or name) == key:
            return field
    return model.model_fields.get(key)


def yaml_keys(model: type[BaseModel]) -> list[str]:
    """The YAML keys a section model accepts (aliases where set)."""
    return sorted(field.alias or name for name, field in model.model_fields.items())


def _model_at(root: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model class whose fields are valid at ``loc`` (a pydantic error location)."""
    model: Any = root
    for part in loc:
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        field = _field(model, str(part))
        if field is None:
            return None
        ann = field.annotation
        # unwrap Optional[Model] / Model | None
        for arg in getattr(ann, "__args__", ()) or ():
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                ann = arg
        model = ann
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _keypath(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc)


def format_errors(root: type[BaseModel], exc: ValidationError, source: str) -> str:
    """One line per problem: ``params.yaml: validate.strictt: unknown key (did you mean 'strict'?)``."""
    lines = []
    for err in exc.errors(include_url=False):
        loc = tuple(err.get("loc", ()))
        # pydantic appends the union member / validator name for some errors; keep real keys only
        loc = tuple(p for p in loc if isinstance(p, int) or not str(p).startswith(("function-", "union[")))
        path = _keypath(loc) or "<top level>"
        kind = err.get("type", "")
        if kind == "extra_forbidden":
            parent = _model_at(root, loc[:-1])
            valid = yaml_keys(parent) if parent else []
            near = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            hint = f" (did you mean '{'.'.join(str(p) for p in loc[:-1] + (near[0],))}'?)" if near else ""
            lines.append(f"{source}: {path}: unknown key{hint}; valid keys here: {', '.join(valid)}")
        elif kind == "missing":
            lines.append(f"{source}: {path}: required key is missing (defaults live in params.yaml)")
        else:
            got = err.get("input")
            shown = repr(got) if not isinstance(got, dict) else "a mapping"
            lines.append(f"{source}: {path}: {err.get('msg')} (got {shown[:80]})")
    return "\n".join(lines)
