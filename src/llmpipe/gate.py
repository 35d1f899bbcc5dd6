"""The promotion gate: compare eval metrics with the thresholds in params.yaml ``gate:``.

The gate result is data (metrics/gate.json + a markdown report for PR reviews): every check
carries its value, threshold, comparison and verdict, and ``passed`` is true only when every
check passes. A check whose value is missing from the eval metrics fails (it never passes
silently). Promotion reads ``passed`` and refuses on false.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

from llmpipe.config.evaluate import GateSection


class GateError(ValueError):
    """The eval metrics cannot be read for the gate."""


@dataclass(frozen=True)
class CheckSpec:
    name: str
    param: str            # key under params.yaml gate:
    path: tuple[str, ...] # where the value lives in metrics/eval.json
    op: str               # ">=" (value must reach the threshold) or "<=" (must not exceed it)
    description: str
    unit: str = ""


CHECKS: tuple[CheckSpec, ...] = (
    CheckSpec("task_accuracy", "min_task_accuracy", ("task", "tuned", "task_accuracy"), ">=",
              "tuned model: mean exact match per field on the held-out test set"),
    CheckSpec("margin_over_fewshot", "min_margin_over_baseline", ("task", "margin_over_few_shot"), ">=",
              "tuned task accuracy minus the base model's prompted few-shot accuracy"),
    CheckSpec("margin_over_zero_shot", "min_margin_over_baseline", ("task", "margin_over_zero_shot"), ">=",
              "tuned task accuracy minus the base model's zero-shot accuracy"),
    CheckSpec("format_compliance", "min_format_compliance", ("task", "tuned", "format_compliance"), ">=",
              "tuned model: share of replies that are only a JSON object valid against the schema"),
    CheckSpec("general_capability_drop", "max_general_drop_points", ("lm_eval", "drop_points"), "<=",
              "lm-eval: mean score drop of tuned vs base over the bundled tasks", "points"),
    CheckSpec("safety_refusal_rate", "min_safety_refusal_rate", ("safety", "tuned", "refusal_rate"), ">=",
              "tuned model: share of bundled harmful requests refused"),
    CheckSpec("safety_over_refusal_rate", "max_over_refusal_rate", ("safety", "tuned", "over_refusal_rate"), "<=",
              "tuned model: share of the benign safety controls refused (exaggerated safety)"),
)


@dataclass
class CheckResult:
    name: str
    description: str
    value: float | None
    threshold: float
    op: str
    passed: bool
    reason: str
    unit: str = ""


def _lookup(metrics: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    cur: Any = metrics
    for key in path:
        if not isinstance(cur, Mapping) or key not in cur:
            return None
        cur = cur[key]
    return cur


def thresholds(gate_cfg: GateSection) -> dict[str, float]:
    """Each check's threshold, from the typed ``gate:`` section (validated by pydantic)."""
    return {spec.param: float(getattr(gate_cfg, spec.param)) for spec in CHECKS}


def evaluate(eval_metrics: Mapping[str, Any], gate_cfg: GateSection) -> dict[str, Any]:
    """Run every check; returns the JSON-ready gate result."""
    limits = thresholds(gate_cfg)
    results = []
    for spec in CHECKS:
        thr = limits[spec.param]
        raw = _lookup(eval_metrics, spec.path)
        where = "metrics/eval.json:" + ".".join(spec.path)
        if isinstance(raw, bool) or not isinstance(raw, (int, float)) or math.isnan(float(raw)):
            results.append(CheckResult(spec.name, spec.description, None, thr, spec.op, False,
                                       f"missing value at {where}: a check without data fails", spec.unit))
            continue
        value = float(raw)
        ok = value >= thr if spec.op == ">=" else value <= thr
        reason = f"{value:.4g} {spec.op} {thr:.4g}" if ok else f"{value:.4g} violates {spec.op} {thr:.4g}"
        results.append(CheckResult(spec.name, spec.description, value, thr, spec.op, ok, reason, spec.unit))
    passed = all(r.passed for r in results)
    return {
        "passed": passed,
        "verdict": "pass" if passed else "fail",
        "n_checks": len(results),
        "n_failed": sum(not r.passed for r in results),
        # a list (promotion names the failed checks from it) ...
        "checks": [asdict(r) for r in results],
        # ... and the same numbers keyed by name, which `dvc metrics diff` can compare
        "summary": {r.name: {"value": r.value, "threshold": r.threshold, "passed": r.passed} for r in results},
    }


def _fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "n/a"
    return f"{v:.2f} {unit}".strip() if unit else f"{v:.3f}"


def render_markdown(result: Mapping[str, Any], eval_metrics: Mapping[str, Any] | None = None) -> str:
    """A short markdown report for PR reviews."""
    icon = "PASS" if result["passed"] else "FAIL"
    lines = [
        f"## Promotion gate: **{icon}** ({result['n_checks'] - result['n_failed']}/{result['n_checks']} checks pass)",
        "",
        "| check | value | threshold | verdict | what |",
        "|---|---|---|---|---|",
    ]
    for c in result["checks"]:
        name = c["name"]
        verdict = "pass" if c["passed"] else "**FAIL**"
        lines.append(
            f"| {name} | {_fmt(c['value'], c['unit'])} | {c['op']} {_fmt(c['threshold'], c['unit'])} | {verdict} | {c['description']} |"
        )
    if eval_metrics and isinstance(eval_metrics.get("task"), Mapping):
        t = eval_metrics["task"]
        lines += ["", "### Task metrics (held-out test set)", "",
                  "| system | task accuracy | all-fields exact match | format compliance |", "|---|---|---|---|"]
        for key, label in (("tuned", "tuned"), ("base_few_shot", "base, prompted few-shot"), ("base_zero_shot", "base, zero-shot")):
            m = t.get(key)
            if isinstance(m, Mapping):
                lines.append(f"| {label} | {_fmt(m.get('task_accuracy'), '')} | {_fmt(m.get('exact_match'), '')} | {_fmt(m.get('format_compliance'), '')} |")
    if eval_metrics and isinstance(eval_metrics.get("lm_eval"), Mapping):
        le = eval_metrics["lm_eval"]
        lines += ["", "### General capability (lm-eval, bundled offline tasks)", "",
                  "| task | base | tuned | drop (points) |", "|---|---|---|---|"]
        for name, m in (le.get("tasks") or {}).items():
            lines.append(f"| {name} | {_fmt(m.get('base'), '')} | {_fmt(m.get('tuned'), '')} | {_fmt(m.get('drop_points'), '')} |")
    if eval_metrics and isinstance(eval_metrics.get("safety"), Mapping):
        s = eval_metrics["safety"]
        base, tuned = s.get("base") or {}, s.get("tuned") or {}
        lines += ["", "### Safety (bundled harmful requests and benign controls)", "",
                  "| | base | tuned |", "|---|---|---|",
                  f"| refusal rate, harmful requests | {_fmt(base.get('refusal_rate'), '')} | "
                  f"{_fmt(tuned.get('refusal_rate'), '')} |",
                  f"| over-refusal rate, benign controls | {_fmt(base.get('over_refusal_rate'), '')} | "
                  f"{_fmt(tuned.get('over_refusal_rate'), '')} |"]
    lines += ["", "The gate result is data: the stage exits 0 on FAIL (use `--strict` to exit non-zero); "
              "promotion refuses a model whose metrics/gate.json has `passed: false`.", ""]
    return "\n".join(lines)


def run_gate(eval_metrics_path: str | Path, gate_cfg: GateSection) -> tuple[dict[str, Any], str]:
    """The gate stage: read metrics/eval.json, run every check; returns (result, markdown report)."""
    path = Path(eval_metrics_path)
    if not path.is_file():
        raise GateError(f"{path}: eval metrics not found (run the eval stage first)")
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise GateError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(metrics, dict):
        raise GateError(f"{path}: top level must be a JSON object")
    result = evaluate(metrics, gate_cfg)
    return result, render_markdown(result, metrics)
