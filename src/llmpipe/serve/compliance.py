"""Format compliance of a model reply: the demo task's JSON rules, checked with jsonschema.

The schema file is data/task/support_triage.schema.json and the check itself is the eval stage's
``llmpipe.evaluate.scorers.check_format`` (strict: the whole reply is one JSON object, valid
against the schema, keys in the schema's order), so deploy and eval judge replies the same way.
If that module is unavailable, an equivalent local check is used.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from jsonschema.validators import validator_for

try:  # the eval stage's scorer: one definition of "compliant" for eval and deploy
    from llmpipe.evaluate.scorers import check_format as _eval_check_format
except ImportError:  # pragma: no cover - only when the evaluate package is absent
    _eval_check_format = None

# The demo task's reply rules, used only when the schema file is absent (e.g. a unit test that
# runs before the eval stage exists). The file, when present, always wins.
DEMO_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "additionalProperties": False,
    "required": ["intent", "product", "urgency", "order_id"],
    "properties": {
        "intent": {"enum": [
            "order_status", "refund_request", "cancel_order", "shipping_address_change",
            "technical_issue", "billing_question", "account_access", "product_inquiry"]},
        "product": {"enum": [
            "smart_thermostat", "wireless_earbuds", "robot_vacuum", "fitness_tracker",
            "coffee_maker", "e_reader", "security_camera", "electric_kettle", "unknown"]},
        "urgency": {"enum": ["low", "medium", "high"]},
        "order_id": {"anyOf": [{"type": "string", "pattern": "^[A-Z]{2}[0-9]{6}$"}, {"type": "null"}]},
    },
}


class ReplyValidator:
    """Check that a reply text is exactly one JSON object valid against the task schema."""

    def __init__(self, schema: dict[str, Any], *, check_key_order: bool = True, source: str = "<schema>"):
        cls = validator_for(schema)
        cls.check_schema(schema)
        self._validator = cls(schema)
        self.source = source
        props = schema.get("properties")
        self.check_key_order = check_key_order
        self._order = list(props) if check_key_order and isinstance(props, dict) else None

    @classmethod
    def from_file(cls, path: str | Path | None, *, check_key_order: bool = True) -> "ReplyValidator":
        if path and Path(path).is_file():
            try:
                schema = json.loads(Path(path).read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{exc.lineno}: invalid JSON schema ({exc.msg})") from exc
            return cls(schema, check_key_order=check_key_order, source=str(path))
        print(f"[compliance] {path}: schema file not found, using the built-in demo task rules",
              file=sys.stderr)
        return cls(DEMO_SCHEMA, check_key_order=check_key_order, source="builtin:support_triage")

    def check(self, text: str | None) -> tuple[bool, str]:
        """Return (compliant, reason). ``reason`` is "" when compliant."""
        if text is None:
            return False, "no reply text"
        if _eval_check_format is not None:
            res = _eval_check_format(text, self._validator, require_key_order=self.check_key_order)
            return res.compliant, "" if res.compliant else "; ".join(res.errors)[:300]
        try:
            obj = json.loads(text.strip())
        except json.JSONDecodeError as exc:
            return False, f"not JSON: {exc.msg} at char {exc.pos}"
        if not isinstance(obj, dict):
            return False, f"not a JSON object ({type(obj).__name__})"
        err = next(iter(self._validator.iter_errors(obj)), None)
        if err is not None:
            where = "/".join(str(p) for p in err.absolute_path) or "<root>"
            return False, f"schema: {where}: {err.message[:200]}"
        if self._order is not None:
            order = [k for k in obj if k in self._order]
            want = [k for k in self._order if k in obj]
            if order != want:
                return False, f"keys out of order: {list(obj)}"
        return True, ""


def reply_text(path: str, body: dict[str, Any]) -> str | None:
    """Extract the first choice's text from an OpenAI chat/completions response body."""
    try:
        choice = body["choices"][0]
    except (KeyError, IndexError, TypeError):
        return None
    if path.endswith("chat/completions"):
        msg = choice.get("message") or {}
        return msg.get("content")
    return choice.get("text")
