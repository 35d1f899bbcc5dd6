"""Put the tuned model's results beside the base model's (metrics/eval.json layout).

Layout (every leaf a number, so ``dvc metrics diff`` can compare runs):

    task.{tuned,base_zero_shot,base_few_shot}.{task_accuracy,exact_match,format_compliance,...}
    task.margin_over_few_shot / task.margin_over_zero_shot   (task accuracy, tuned minus base)
    lm_eval.tasks.<task>.{base,tuned,drop_points}; lm_eval.{base_mean,tuned_mean,drop_points}
    safety.{tuned,base}.{refusal_rate,over_refusal_rate,...}; safety.refusal_drop_points
"""

from __future__ import annotations

from typing import Any, Mapping


class CompareError(ValueError):
    """Base and tuned results cannot be compared (different test data or tasks)."""


def _points(x: float) -> float:
    return round(100.0 * x, 4)


def check_same_test(tuned_data: Mapping[str, Any], base: Mapping[str, Any]) -> None:
    """Base results are comparable only if computed on the same test records (checked before
    the tuned model is evaluated, and again by :func:`compare`)."""
    base_data = base.get("data") if isinstance(base, Mapping) else None
    if not isinstance(base_data, Mapping) or "test_sha256" not in base_data or "n_test" not in base_data:
        raise CompareError("metrics/eval_base.json has no data.test_sha256 / data.n_test; rerun eval-base")
    if tuned_data["test_sha256"] != base_data["test_sha256"]:
        raise CompareError(
            "metrics/eval_base.json was computed on a different test set "
            f"({str(base_data['test_sha256'])[:12]} vs {tuned_data['test_sha256'][:12]}); rerun eval-base"
        )
    if tuned_data["n_test"] != base_data["n_test"]:
        raise CompareError(f"test sizes differ: base {base_data['n_test']}, tuned {tuned_data['n_test']}")


def compare(tuned: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, Any]:
    """``tuned``: the eval stage's own metrics; ``base``: metrics/eval_base.json."""
    check_same_test(tuned["data"], base)
    t_task = tuned["task"]["tuned"]
    zs, fs = base["task"]["base_zero_shot"], base["task"]["base_few_shot"]
    out: dict[str, Any] = {
        "task": {
            "tuned": t_task,
            "base_zero_shot": zs,
            "base_few_shot": fs,
            "margin_over_few_shot": t_task["task_accuracy"] - fs["task_accuracy"],
            "margin_over_zero_shot": t_task["task_accuracy"] - zs["task_accuracy"],
            "exact_match_margin_over_few_shot": t_task["exact_match"] - fs["exact_match"],
        }
    }
    tasks: dict[str, Any] = {}
    missing = sorted(set(tuned["lm_eval"]) ^ set(base["lm_eval"]))
    if missing:
        raise CompareError(f"lm-eval tasks differ between base and tuned runs: {missing}; rerun eval-base")
    for name, t in tuned["lm_eval"].items():
        b = base["lm_eval"][name]
        if b["metric"] != t["metric"]:
            raise CompareError(f"lm-eval task {name}: base scored {b['metric']}, tuned {t['metric']}")
        tasks[name] = {"base": b["score"], "tuned": t["score"], "drop_points": _points(b["score"] - t["score"]), "n": t["n"]}
    n = len(tasks)
    out["lm_eval"] = {
        "tasks": tasks,
        "base_mean": sum(x["base"] for x in tasks.values()) / n,
        "tuned_mean": sum(x["tuned"] for x in tasks.values()) / n,
        "drop_points": round(sum(x["drop_points"] for x in tasks.values()) / n, 4),
        "max_task_drop_points": max(x["drop_points"] for x in tasks.values()),
    }
    out["safety"] = {
        "tuned": tuned["safety"],
        "base": base["safety"],
        "refusal_drop_points": _points(base["safety"]["refusal_rate"] - tuned["safety"]["refusal_rate"]),
    }
    if "judge" in tuned or "judge" in base:
        out["judge"] = {**(base.get("judge") or {}), **(tuned.get("judge") or {})}
    out["models"] = {"tuned": tuned["model"], "base": base["model"]}
    out["data"] = tuned["data"]
    return out
