"""General-capability regression with EleutherAI lm-evaluation-harness, fully offline.

The tasks are custom YAML tasks bundled in the repo (``data/eval/lm_eval``): small JSONL data
written for this project, one multiple-choice task scored by log-likelihood and one generation
task. They are found through ``TaskManager(include_path=...)`` and run with
``lm_eval.simple_evaluate`` on an HF model directory (``model="hf"``). Scores are reported as
fractions in [0, 1]; the drop between two models is reported in points (x100) by the caller.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Mapping


class HarnessError(RuntimeError):
    """The lm-eval tasks cannot be found or run."""


def _offline_env() -> None:
    # No hub access at run time (DESIGN.md); the bundled tasks only read local JSONL.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def task_manager(task_dir: str | Path):
    """A TaskManager that knows only the bundled tasks in ``task_dir``.

    lm-eval's own task catalogue (thousands of YAMLs, most of them hub datasets) is left out:
    indexing it costs tens of seconds and none of it is usable offline anyway.
    """
    _offline_env()
    from lm_eval.tasks import TaskManager

    d = Path(task_dir)
    if not d.is_dir():
        raise HarnessError(f"{d}: lm-eval task directory not found")
    return TaskManager(include_path=str(d.resolve()), include_defaults=False)


def load_tasks(task_dir: str | Path, names: list[str]) -> dict[str, Any]:
    """Load the named tasks (datasets included); returns {name: Task}. Checks they all exist."""
    from lm_eval.tasks import get_task_dict

    tm = task_manager(task_dir)
    missing = [n for n in names if n not in tm.all_tasks]
    if missing:
        raise HarnessError(f"{task_dir}: lm-eval task(s) not found: {', '.join(missing)}")
    loaded = get_task_dict(names, tm)
    return {str(getattr(k, "task_name", k)): v for k, v in loaded.items()}


def _split_metric(key: str) -> tuple[str, str]:
    name, _, filt = key.partition(",")
    return name, filt or "none"


def run(
    model_dir: str | Path,
    task_dir: str | Path,
    tasks: Mapping[str, str],
    *,
    batch_size: int,
    limit: int | None,
    device: str,
    dtype: str,
    apply_chat_template: bool,
    seed: int,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run lm-eval on ``model_dir``.

    ``tasks`` maps task name -> primary metric (e.g. ``acc`` or ``exact_match``). Returns
    ``(scores, samples)``: ``scores[task] = {"metric", "score", "stderr", "n", "all": {...}}`` and
    one row per evaluated document (prompt target, filtered response, correctness) so a reviewer
    can read what the model answered.
    """
    _offline_env()
    import lm_eval

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise HarnessError(f"{model_dir}: not a Hugging Face model directory (no config.json)")
    tm = task_manager(task_dir)
    missing = [n for n in tasks if n not in tm.all_tasks]
    if missing:
        raise HarnessError(f"{task_dir}: lm-eval task(s) not found: {', '.join(missing)}")
    print(f"[lm-eval] {model_dir}: {', '.join(tasks)}", file=sys.stderr, flush=True)
    res = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(model_dir), "dtype": dtype, "trust_remote_code": False},
        tasks=list(tasks),
        batch_size=batch_size,
        device=device,
        limit=limit,
        task_manager=tm,
        apply_chat_template=apply_chat_template,
        log_samples=True,
        bootstrap_iters=0,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    if res is None:
        raise HarnessError("lm_eval.simple_evaluate returned nothing")
    scores: dict[str, Any] = {}
    samples: list[dict[str, Any]] = []
    for name, primary in tasks.items():
        raw = res["results"].get(name)
        if raw is None:
            raise HarnessError(f"lm-eval returned no results for task {name}")
        flat = {}
        for key, value in raw.items():
            if key == "alias" or not isinstance(value, (int, float)):
                continue
            metric, filt = _split_metric(key)
            flat[metric if filt == "none" else f"{metric}[{filt}]"] = float(value)
        main = [k for k in raw if _split_metric(k)[0] == primary]
        if not main:
            raise HarnessError(f"task {name}: metric '{primary}' not in results ({sorted(raw)})")
        value = float(raw[main[0]])
        err_key = main[0].replace(primary, primary + "_stderr", 1)
        stderr = raw.get(err_key)
        task_samples = res.get("samples", {}).get(name, [])
        scores[name] = {
            "metric": primary,
            "score": value,
            "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
            "n": len(task_samples),
            "all": flat,
        }
        for s in task_samples:
            doc = s.get("doc", {})
            samples.append(
                {
                    "task": name,
                    "doc_id": s.get("doc_id"),
                    "id": doc.get("id"),
                    "target": s.get("target"),
                    "response": _short_response(s.get("filtered_resps")),
                    primary: float(s[primary]) if isinstance(s.get(primary), (int, float)) else None,
                }
            )
    return scores, samples


def _short_response(resps: Any) -> Any:
    """lm-eval keeps (loglik, is_greedy) pairs or strings; keep something JSON friendly."""
    if isinstance(resps, list):
        out = []
        for r in resps:
            if isinstance(r, (list, tuple)):
                out.append([float(x) if isinstance(x, (int, float)) else x for x in r])
            else:
                out.append(float(r) if isinstance(r, (int, float)) else r)
        return out
    return resps
