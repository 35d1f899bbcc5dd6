"""DVC stage `eval-base`: the base model zero-shot and with the prompted few-shot baseline.

in:  models/base/ (HF dir), data/split/test.jsonl, data/split/train.jsonl (few-shot examples),
     bundled data/eval/ (lm-eval tasks, safety set), data/task/support_triage.schema.json,
     params eval.* (NOT lora.*/train.*: `dvc exp run -S lora.r=32` reuses this stage)
out: eval/base/outputs.jsonl (per-example replies + scores, both systems),
     eval/base/safety.jsonl, eval/base/lm_eval_samples.jsonl, eval/base/fewshot_examples.jsonl,
     eval/base/judge.jsonl (only with eval.judge.enabled), metrics/eval_base.json;
     timings/eval-base.json (wall-clock seconds; git-ignored, not a DVC output)
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
    print(f"[eval-base] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=None, help="params file (default: params.yaml)")
    ap.add_argument("--model", default="models/base")
    ap.add_argument("--test", default="data/split/test.jsonl")
    ap.add_argument("--train", default="data/split/train.jsonl")
    ap.add_argument("--out-dir", default="eval/base")
    ap.add_argument("--metrics", default="metrics/eval_base.json")
    ap.add_argument("--timings-root", default=".", help="timings/eval-base.json goes under this directory")
    args = ap.parse_args(argv)
    try:
        cfg = load_stage_params(PARAMS, args.params)
        run = run_eval(cfg.eval, args.model, args.test, train_path=args.train, progress=_progress)
    except (ParamsError, *INPUT_ERRORS) as exc:
        print(f"[eval-base] error: {exc}", file=sys.stderr)
        return 2
    with atomic_dir(args.out_dir) as tmp:
        for name, rows in run.files.items():
            write_jsonl(Path(tmp) / name, rows)
    write_json(args.metrics, run.metrics)
    write_timings("eval-base", run.timings, root=args.timings_root)
    _progress(f"wrote {args.metrics} and {args.out_dir}/ in {run.timings['total']}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
