"""DVC stage `eval`: the tuned (merged) model, side by side with the base results.

in:  models/merged/ (HF dir), data/split/test.jsonl, metrics/eval_base.json (from eval-base),
     bundled data/eval/, data/task/support_triage.schema.json, params eval.*
out: eval/tuned/outputs.jsonl (per-example replies + scores), eval/tuned/safety.jsonl,
     eval/tuned/lm_eval_samples.jsonl, eval/tuned/judge.jsonl (only with eval.judge.enabled),
     metrics/eval.json (tuned / base zero-shot / base few-shot task metrics and margins,
     lm-eval scores and drop in points, safety refusal rates; layout in llmpipe.evaluate.compare)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from llmpipe.evaluate.compare import CompareError, compare
from llmpipe.evaluate.config import EvalConfig
from llmpipe.evaluate.records import RecordError, load_records
from llmpipe.evaluate.suite import evaluate_model, model_fingerprint, run_judge
from llmpipe.io import atomic_dir, read_json, sha256_file, write_json, write_jsonl
from llmpipe.params import ParamsError, load_params, section


def _progress(msg: str) -> None:
    print(f"[eval] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=None, help="params file (default: params.yaml)")
    ap.add_argument("--model", default="models/merged")
    ap.add_argument("--test", default="data/split/test.jsonl")
    ap.add_argument("--base-metrics", default="metrics/eval_base.json")
    ap.add_argument("--out-dir", default="eval/tuned")
    ap.add_argument("--metrics", default="metrics/eval.json")
    args = ap.parse_args(argv)

    t0 = time.monotonic()
    try:
        params = load_params(args.params)
        cfg = EvalConfig.from_params(section(params, "eval"))
        seed = cfg.seed
        test = load_records(args.test, cfg.limit)
        if not Path(args.base_metrics).is_file():
            raise RecordError(f"{args.base_metrics}: base results not found (run the eval-base stage first)")
        base = read_json(args.base_metrics)
    except (ParamsError, RecordError, ValueError) as exc:
        print(f"[eval] error: {exc}", file=sys.stderr)
        return 2
    _progress(f"{len(test)} test records, model {args.model}")
    res = evaluate_model(args.model, cfg, test, systems={"tuned": []}, seed=seed, progress=_progress)
    judge_rows = None
    if cfg.judge_enabled:
        res["judge"], judge_rows = run_judge(cfg, res["rows"], seed)
    tuned = {
        "model": {"dir": args.model, "sha256": model_fingerprint(args.model)},
        "data": {"test": args.test, "test_sha256": sha256_file(args.test), "n_test": len(test)},
        "task": res["task"],
        "safety": res["safety"],
        "lm_eval": res["lm_eval"],
    }
    if "judge" in res:
        tuned["judge"] = res["judge"]
    try:
        metrics = compare(tuned, base)
    except (CompareError, KeyError) as exc:
        print(f"[eval] error: cannot compare with {args.base_metrics}: {exc}", file=sys.stderr)
        return 2
    metrics["timing_s"] = {**res["timing_s"], "total": round(time.monotonic() - t0, 1)}
    with atomic_dir(args.out_dir) as tmp:
        write_jsonl(Path(tmp) / "outputs.jsonl", res["rows"])
        write_jsonl(Path(tmp) / "safety.jsonl", res["safety_rows"])
        write_jsonl(Path(tmp) / "lm_eval_samples.jsonl", res["lm_eval_samples"])
        if judge_rows is not None:
            write_jsonl(Path(tmp) / "judge.jsonl", judge_rows)
    write_json(args.metrics, metrics)
    t = metrics["task"]
    _progress(
        f"task accuracy tuned {t['tuned']['task_accuracy']:.3f} vs few-shot {t['base_few_shot']['task_accuracy']:.3f} "
        f"vs zero-shot {t['base_zero_shot']['task_accuracy']:.3f}; lm-eval drop {metrics['lm_eval']['drop_points']:.1f} pts; "
        f"refusal {metrics['safety']['tuned']['refusal_rate']:.2f} (base {metrics['safety']['base']['refusal_rate']:.2f}); "
        f"{time.monotonic() - t0:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
