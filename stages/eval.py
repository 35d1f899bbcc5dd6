"""DVC stage `eval`: the tuned (merged) model, side by side with the base results.

in:  models/merged/ (HF dir), data/split/test.jsonl, metrics/eval_base.json (from eval-base),
     bundled data/eval/, data/task/support_triage.schema.json, params eval.*
out: eval/tuned/outputs.jsonl (per-example replies + scores), eval/tuned/safety.jsonl,
     eval/tuned/lm_eval_samples.jsonl, eval/tuned/judge.jsonl (only with eval.judge.enabled),
     metrics/eval.json (tuned / base zero-shot / base few-shot task metrics and margins,
     lm-eval scores and drop in points, safety refusal rates; layout in llmpipe.evaluate.compare);
     timings/eval.json (wall-clock seconds; git-ignored, not a DVC output)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llmpipe.config import ParamsError, load_stage_params
from llmpipe.evaluate.run import INPUT_ERRORS, run_eval
from llmpipe.io import atomic_dir, write_json, write_jsonl, write_timings

PARAMS = ["eval"]  # = this stage's params: in dvc.yaml


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
    ap.add_argument("--timings-root", default=".", help="timings/eval.json goes under this directory")
    args = ap.parse_args(argv)
    try:
        cfg = load_stage_params(PARAMS, args.params)
        run = run_eval(cfg.eval, args.model, args.test, base_metrics_path=args.base_metrics, progress=_progress)
    except (ParamsError, *INPUT_ERRORS) as exc:
        print(f"[eval] error: {exc}", file=sys.stderr)
        return 2
    with atomic_dir(args.out_dir) as tmp:
        for name, rows in run.files.items():
            write_jsonl(Path(tmp) / name, rows)
    write_json(args.metrics, run.metrics)
    write_timings("eval", run.timings, root=args.timings_root)
    m = run.metrics
    t = m["task"]
    _progress(
        f"task accuracy tuned {t['tuned']['task_accuracy']:.3f} vs few-shot {t['base_few_shot']['task_accuracy']:.3f} "
        f"vs zero-shot {t['base_zero_shot']['task_accuracy']:.3f}; lm-eval drop {m['lm_eval']['drop_points']:.1f} pts; "
        f"refusal {m['safety']['tuned']['refusal_rate']:.2f} (base {m['safety']['base']['refusal_rate']:.2f}); "
        f"{run.timings['total']}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
