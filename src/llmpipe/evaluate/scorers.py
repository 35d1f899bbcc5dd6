"""Task scorers for structured (JSON) replies: format compliance and exact match per field.

Two questions are kept apart on purpose:

* **format compliance** is strict: the whole reply (surrounding whitespace aside) must be one JSON
  object that validates against the task's JSON Schema, with the keys in the schema's order. A reply wrapped in prose or a code fence
  is *not* compliant, because a downstream parser would choke on it.
* **accuracy** is lenient about framing: the first JSON object found anywhere in the reply is
  compared field by field with the reference, so a baseline that wraps correct JSON in a code
  fence still gets credit for what it got right. An unparseable reply scores 0 on every field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import jsonschema


class SchemaError(ValueError):
    """The task JSON Schema file is missing or invalid."""


def load_schema(path: str | Path) -> jsonschema.protocols.Validator:
    """Load a JSON Schema file and return a validator for it (checks the schema itself too)."""
    p = Path(path)
    if not p.is_file():
        raise SchemaError(f"{p}: JSON Schema file not found")
    try:
        schema = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SchemaError(f"{p}:{exc.lineno}:{exc.colno}: invalid JSON in schema: {exc.msg}") from exc
    cls = jsonschema.validators.validator_for(schema)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise SchemaError(f"{p}: not a valid JSON Schema: {exc.message}") from exc
    return cls(schema)


def schema_key_order(validator: jsonschema.protocols.Validator) -> list[str]:
    """The property order declared in the schema (JSON Schema itself cannot enforce order)."""
    return list(validator.schema.get("properties", {}))


def parse_strict(text: str) -> tuple[Any, str | None]:
    """Parse the whole reply as JSON. Returns (value, None) or (None, error message)."""
    try:
        return json.loads(text.strip()), None
    except json.JSONDecodeError as exc:
        return None, f"not valid JSON: {exc.msg} at char {exc.pos}"


def extract_json_object(text: str) -> dict[str, Any] | None:
    """Return the first JSON object embedded anywhere in ``text``, or None."""
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        try:
            value, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            value = None
        if isinstance(value, dict):
            return value
        start = text.find("{", start + 1)
    return None


@dataclass
class FormatResult:
    valid_json: bool
    schema_valid: bool
    key_order_ok: bool
    compliant: bool
    errors: list[str] = field(default_factory=list)


def check_format(
    text: str, validator: jsonschema.protocols.Validator, require_key_order: bool = True
) -> FormatResult:
    """Strict format check of one reply against the task schema.

    With ``require_key_order`` the keys must also appear in the order the schema's
    ``properties`` declare (the demo task fixes the order; the deploy canary checks the same).
    """
    value, err = parse_strict(text)
    if err is not None:
        return FormatResult(False, False, False, False, [err])
    errors = sorted(
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(value)
    )
    schema_valid = not errors
    order = schema_key_order(validator)
    key_order_ok = isinstance(value, dict) and [k for k in value if k in order] == [k for k in order if k in value]
    if schema_valid and not key_order_ok and require_key_order:
        errors.append(f"keys out of order: {list(value)} (expected {order})")
    compliant = schema_valid and (key_order_ok or not require_key_order)
    return FormatResult(True, schema_valid, key_order_ok, compliant, errors)


def field_matches(pred: dict[str, Any] | None, ref: dict[str, Any], fields: Sequence[str]) -> dict[str, bool]:
    """Exact match per field (type-sensitive: ``null`` only matches ``null``)."""
    out = {}
    for f in fields:
        if pred is None or f not in pred:
            out[f] = False
        else:
            p, r = pred[f], ref.get(f)
            out[f] = type(p) is type(r) and p == r
    return out


def score_example(
    prediction: str,
    reference: str,
    fields: Sequence[str],
    validator: jsonschema.protocols.Validator,
    require_key_order: bool = True,
) -> dict[str, Any]:
    """Score one reply. ``reference`` is the gold reply text (must itself be a JSON object)."""
    ref = json.loads(reference)
    if not isinstance(ref, dict):
        raise ValueError(f"reference reply is not a JSON object: {reference[:80]!r}")
    fmt = check_format(prediction, validator, require_key_order)
    pred = extract_json_object(prediction)
    matches = field_matches(pred, ref, fields)
    return {
        "parsed": pred is not None,
        "format_compliant": fmt.compliant,
        "valid_json": fmt.valid_json,
        "schema_valid": fmt.schema_valid,
        "key_order_ok": fmt.key_order_ok,
        "format_errors": fmt.errors,
        "field_match": matches,
        "exact_match": all(matches.values()),
    }


def aggregate(scores: Iterable[dict[str, Any]], fields: Sequence[str]) -> dict[str, Any]:
    """Aggregate per-example scores into the task metrics reported by eval."""
    scores = list(scores)
    n = len(scores)
    if n == 0:
        raise ValueError("no examples to aggregate (empty test set?)")
    per_field = {f: sum(s["field_match"][f] for s in scores) / n for f in fields}
    return {
        "n": n,
        "field_accuracy": per_field,
        "task_accuracy": sum(per_field.values()) / len(fields),
        "exact_match": sum(s["exact_match"] for s in scores) / n,
        "format_compliance": sum(s["format_compliant"] for s in scores) / n,
        "valid_json_rate": sum(s["valid_json"] for s in scores) / n,
        "schema_valid_rate": sum(s["schema_valid"] for s in scores) / n,
        "parse_rate": sum(s["parsed"] for s in scores) / n,
        "key_order_rate": sum(s["key_order_ok"] for s in scores) / n,
    }
