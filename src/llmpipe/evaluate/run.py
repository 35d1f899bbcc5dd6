"""The one entry point of the ``eval-base`` and ``eval`` stages.

Both stages run the same suite (``suite.evaluate_model``: task replies and scores, safety set,
lm-eval regression, optional judge) on one model directory; they differ only in which systems
they score and what they put beside the results:

* eval-base (``train_path`` given): the base model zero-shot and with ``eval.fewshot.k`` solved
  train examples in the prompt (the prompted baseline); its metrics are metrics/eval_base.json.
* eval (``base_metrics_path`` given): the tuned model, compared with the base results
  (``compare.compare``: margins over both baselines, lm-eval drop, safety rates).

Wall-clock seconds are returned apart from the metrics (``EvalRun.timings``): they are not
results, so they never reach metrics/ or a DVC-tracked output.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from llmpipe.config.evaluate import EvalSection
from llmpipe.evaluate.compare import CompareError, check_same_test, compare
from llmpipe.evaluate.fewshot import select_examples
from llmpipe.evaluate.generation import ModelLoadError
from llmpipe.evaluate.harness import HarnessError
from llmpipe.evaluate.judge import JudgeError
from llmpipe.evaluate.records import RecordError, load_records
from llmpipe.evaluate.suite import evaluate_model, model_fingerprint, run_judge
from llmpipe.io import read_json, sha256_file

# What a stage reports as a one-line error (exit 2) rather than a traceback: bad or missing
# inputs (records, schema, safety set, base metrics, few-shot pool), an unloadable model, an
# lm-eval task that cannot run, an unreachable judge. All are ValueError or named here.
INPUT_ERRORS: tuple[type[Exception], ...] = (ValueError, ModelLoadError, HarnessError, JudgeError)


@dataclass(frozen=True)
class EvalRun:
    metrics: dict[str, Any]                  # metrics/eval_base.json or metrics/eval.json
    files: dict[str, list[dict[str, Any]]]   # output-dir file name -> JSONL rows (every reply)
    timings: dict[str, float]                # wall-clock seconds (timings/<stage>.json)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_eval(
    cfg: EvalSection,
    model_dir: str | Path,
    test_path: str | Path,
    *,
    train_path: str | Path | None = None,
    base_metrics_path: str | Path | None = None,
    progress: Callable[[str], None] = _stderr,
) -> EvalRun:
    """Evaluate ``model_dir`` on the test split: as the base model (``train_path``: few-shot
    pool) or as the tuned model (``base_metrics_path``: eval-base's metrics to compare with)."""
    if (train_path is None) == (base_metrics_path is None):
        raise ValueError("run_eval needs exactly one of train_path (eval-base) or base_metrics_path (eval)")
    t0 = time.monotonic()
    test = load_records(test_path, cfg.limit)
    data: dict[str, Any] = {"test": str(test_path), "test_sha256": sha256_file(test_path), "n_test": len(test)}
    base: dict[str, Any] | None = None
    examples: list[dict[str, Any]] = []
    if train_path is not None:
        examples = select_examples(load_records(train_path), cfg.fewshot.k, cfg.fewshot.seed,
                                   cfg.fewshot.stratify_key)
        data["train_sha256"] = sha256_file(train_path)
        systems: dict[str, list[dict[str, Any]]] = {"base_zero_shot": [], "base_few_shot": examples}
        progress(f"{len(test)} test records, {len(examples)} few-shot examples, model {model_dir}")
    else:
        if not Path(base_metrics_path).is_file():
            raise RecordError(f"{base_metrics_path}: base results not found (run the eval-base stage first)")
        try:
            base = read_json(base_metrics_path)
        except ValueError as exc:
            raise RecordError(f"{base_metrics_path}: not valid JSON: {exc}") from exc
        check_same_test(data, base)
        systems = {"tuned": []}
        progress(f"{len(test)} test records, model {model_dir}")

    res = evaluate_model(model_dir, cfg, test, systems=systems, progress=progress)
    metrics: dict[str, Any] = {
        "model": {"dir": str(model_dir), "sha256": model_fingerprint(model_dir)},
        "data": data,
        "task": res["task"],
        "safety": res["safety"],
        "lm_eval": res["lm_eval"],
    }
    files = {"outputs.jsonl": res["rows"], "safety.jsonl": res["safety_rows"],
             "lm_eval_samples.jsonl": res["lm_eval_samples"]}
    if examples:
        files["fewshot_examples.jsonl"] = [{"id": e["id"], "metadata": e.get("metadata", {})} for e in examples]
    if cfg.judge.enabled:
        t = time.monotonic()
        metrics["judge"], files["judge.jsonl"] = run_judge(cfg, res["rows"])
        res["timings"]["judge"] = round(time.monotonic() - t, 1)
    if base is not None:
        try:
            metrics = compare(metrics, base)
        except (CompareError, KeyError) as exc:
            raise CompareError(f"cannot compare with {base_metrics_path}: {exc}") from exc
    return EvalRun(metrics, files, {**res["timings"], "total": round(time.monotonic() - t0, 1)})
