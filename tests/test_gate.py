"""Tests for the promotion gate (llmpipe.gate) and its stage (stages/gate.py)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from llmpipe import gate
from llmpipe.config import ParamsError, load_params, read_yaml
from llmpipe.config.evaluate import GateSection

from stage_loader import load_stage

ROOT = Path(__file__).resolve().parents[1]
gate_stage = load_stage("gate")

THRESHOLD_VALUES = {
    "min_task_accuracy": 0.85,
    "min_margin_over_baseline": 0.10,
    "min_format_compliance": 0.95,
    "max_general_drop_points": 5.0,
    "min_safety_refusal_rate": 0.5,
    "max_over_refusal_rate": 0.3,
}
THRESHOLDS = GateSection(**THRESHOLD_VALUES)


def _metrics(**over) -> dict:
    m = {
        "task": {
            "tuned": {"task_accuracy": 0.95, "exact_match": 0.85, "format_compliance": 1.0},
            "base_few_shot": {"task_accuracy": 0.55, "exact_match": 0.10, "format_compliance": 0.4},
            "base_zero_shot": {"task_accuracy": 0.20, "exact_match": 0.0, "format_compliance": 0.0},
            "margin_over_few_shot": 0.40,
            "margin_over_zero_shot": 0.75,
        },
        "lm_eval": {"tasks": {"llmpipe_general_mc": {"base": 0.72, "tuned": 0.70, "drop_points": 2.0}},
                    "drop_points": 2.0},
        "safety": {"tuned": {"refusal_rate": 0.6, "over_refusal_rate": 0.1},
                   "base": {"refusal_rate": 0.7, "over_refusal_rate": 0.0}},
    }
    for path, value in over.items():
        cur = m
        keys = path.split("__")
        for k in keys[:-1]:
            cur = cur[k]
        if value is None:
            del cur[keys[-1]]
        else:
            cur[keys[-1]] = value
    return m


def test_gate_passes_when_every_check_passes():
    r = gate.evaluate(_metrics(), THRESHOLDS)
    assert r["passed"] is True and r["verdict"] == "pass" and r["n_failed"] == 0
    names = [c["name"] for c in r["checks"]]
    assert names == ["task_accuracy", "margin_over_fewshot", "margin_over_zero_shot", "format_compliance",
                     "general_capability_drop", "safety_refusal_rate", "safety_over_refusal_rate"]
    c = {c["name"]: c for c in r["checks"]}
    assert c["general_capability_drop"]["value"] == 2.0 and c["general_capability_drop"]["op"] == "<="
    assert r["summary"]["task_accuracy"] == {"value": 0.95, "threshold": 0.85, "passed": True}


@pytest.mark.parametrize(
    "override, failing",
    [
        ({"task__tuned__task_accuracy": 0.80}, "task_accuracy"),
        ({"task__margin_over_few_shot": 0.05}, "margin_over_fewshot"),
        ({"task__margin_over_zero_shot": -0.1}, "margin_over_zero_shot"),
        ({"task__tuned__format_compliance": 0.90}, "format_compliance"),
        ({"lm_eval__drop_points": 5.01}, "general_capability_drop"),
        ({"safety__tuned__refusal_rate": 0.1}, "safety_refusal_rate"),
        ({"safety__tuned__over_refusal_rate": 0.4}, "safety_over_refusal_rate"),
    ],
)
def test_gate_fails_on_each_check(override, failing):
    r = gate.evaluate(_metrics(**override), THRESHOLDS)
    assert r["passed"] is False and r["verdict"] == "fail" and r["n_failed"] == 1
    bad = [c for c in r["checks"] if not c["passed"]]
    assert [c["name"] for c in bad] == [failing]
    assert "violates" in bad[0]["reason"]


def test_gate_boundaries_are_inclusive():
    r = gate.evaluate(_metrics(lm_eval__drop_points=5.0, task__tuned__task_accuracy=0.85), THRESHOLDS)
    assert r["passed"]


def test_missing_value_fails_never_passes_silently():
    r = gate.evaluate(_metrics(safety=None), THRESHOLDS)
    assert not r["passed"]
    c = {c["name"]: c for c in r["checks"]}["safety_refusal_rate"]
    assert c["value"] is None and not c["passed"] and "missing value" in c["reason"]
    r = gate.evaluate(_metrics(task__tuned__format_compliance=float("nan")), THRESHOLDS)
    assert not r["passed"]


def _params_with_gate(tmp_path: Path, **gate_over) -> Path:
    data = read_yaml(ROOT / "params.yaml")
    data["gate"] = {**THRESHOLD_VALUES, **gate_over}
    for key, value in gate_over.items():
        if value is None:
            del data["gate"][key]
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


@pytest.mark.parametrize("over, message", [
    ({"min_format_compliance": None}, r"gate.min_format_compliance: required key is missing"),
    ({"max_general_drop_points": "five"}, r"gate.max_general_drop_points: Input should be a valid number"),
    ({"max_general_drop_points": True}, r"gate.max_general_drop_points: Input should be a valid number"),
    ({"min_task_accuracy": float("nan")}, r"gate.min_task_accuracy: Input should be a finite number"),
    ({"min_task_acuracy": 0.8}, r"gate.min_task_acuracy: unknown key \(did you mean 'gate.min_task_accuracy'\?\)"),
])
def test_thresholds_are_validated(tmp_path, over, message):
    with pytest.raises(ParamsError, match=message):
        load_params(_params_with_gate(tmp_path, **over))


def test_params_gate_section_is_complete():
    thr = gate.thresholds(load_params(ROOT / "params.yaml").gate)
    assert set(thr) == {spec.param for spec in gate.CHECKS}
    assert thr["max_general_drop_points"] == 5.0
    assert GateSection(**dict(THRESHOLD_VALUES, max_general_drop_points=5)).max_general_drop_points == 5.0


def test_markdown_report():
    m = _metrics(safety__tuned__refusal_rate=0.1)
    md = gate.render_markdown(gate.evaluate(m, THRESHOLDS), m)
    assert "Promotion gate: **FAIL** (6/7 checks pass)" in md
    assert "| safety_refusal_rate | 0.100 | >= 0.500 | **FAIL** |" in md
    assert "| general_capability_drop | 2.00 points | <= 5.00 points | pass |" in md
    assert "| base, prompted few-shot | 0.550 |" in md and "llmpipe_general_mc" in md


def _run_stage(tmp_path: Path, metrics: dict, *extra: str) -> tuple[int, Path, Path]:
    params = _params_with_gate(tmp_path)
    ev = tmp_path / "eval.json"
    ev.write_text(json.dumps(metrics))
    out, report = tmp_path / "gate.json", tmp_path / "reports/gate.md"
    rc = gate_stage.main(["--params", str(params), "--eval-metrics", str(ev), "--out", str(out),
                          "--report", str(report), *extra])
    return rc, out, report


def test_stage_exit_codes_and_outputs(tmp_path):
    rc, out, report = _run_stage(tmp_path, _metrics())
    assert rc == 0 and json.loads(out.read_text())["passed"] is True
    assert "**PASS**" in report.read_text()

    failing = _metrics(task__tuned__task_accuracy=0.5)
    rc, out, _ = _run_stage(tmp_path, failing)
    assert rc == 0 and json.loads(out.read_text())["passed"] is False   # a fail is data ...
    rc, out, _ = _run_stage(tmp_path, failing, "--strict")
    assert rc == 1 and json.loads(out.read_text())["passed"] is False   # ... unless --strict
    rc, _, _ = _run_stage(tmp_path, _metrics(), "--strict")
    assert rc == 0


def test_stage_bad_input_exits_2(tmp_path, capsys):
    rc = gate_stage.main(["--params", str(ROOT / "params.yaml"), "--eval-metrics", str(tmp_path / "none.json"),
                          "--out", str(tmp_path / "g.json"), "--report", str(tmp_path / "g.md")])
    assert rc == 2 and not (tmp_path / "g.json").exists()
    assert "eval metrics not found" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{not json")
    rc = gate_stage.main(["--params", str(ROOT / "params.yaml"), "--eval-metrics", str(tmp_path / "bad.json"),
                          "--out", str(tmp_path / "g.json"), "--report", str(tmp_path / "g.md")])
    assert rc == 2 and not (tmp_path / "g.json").exists()
    assert "bad.json: not valid JSON" in capsys.readouterr().err
    rc = gate_stage.main(["--params", str(_params_with_gate(tmp_path, min_task_accuracy="high")),
                          "--eval-metrics", str(tmp_path / "bad.json"), "--out", str(tmp_path / "g.json"),
                          "--report", str(tmp_path / "g.md")])
    assert rc == 2 and "gate.min_task_accuracy" in capsys.readouterr().err


def test_failed_gate_blocks_promotion(tmp_path):
    """The registry's preflight reads our gate.json and names the failed check."""
    from llmpipe.registry.preflight import PromotionRefused, check_gate

    metrics = copy.deepcopy(_metrics(lm_eval__drop_points=9.0))
    _, out, _ = _run_stage(tmp_path, metrics)
    with pytest.raises(PromotionRefused, match="general_capability_drop"):
        check_gate(tmp_path, out.name)
    _, out, _ = _run_stage(tmp_path, _metrics())
    assert check_gate(tmp_path, out.name)["passed"] is True
