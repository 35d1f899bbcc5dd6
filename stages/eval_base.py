"""DVC stage `eval-base`: the base model zero-shot and with the prompted few-shot baseline.

in:  models/base/ (HF dir), data/split/test.jsonl, data/split/train.jsonl (few-shot examples),
     bundled data/eval/ (lm-eval tasks, safety set), data/task/support_triage.schema.json,
     params eval.* (NOT lora.*/train.*: `dvc exp run -S lora.r=32` reuses this stage)
out: eval/base/outputs.jsonl (per-example replies + scores, both systems),
     eval/base/safety.jsonl, eval/base/lm_eval_samples.jsonl, eval/base/fewshot_examples.jsonl,
     eval/base/judge.jsonl (only with eval.judge.enabled), metrics/eval_base.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from llmpipe.evaluate.config import EvalConfig
from llmpipe.evaluate.fewshot import select_examples
from llmpipe.evaluate.records import RecordError, load_records
from llmpipe.evaluate.suite import evaluate_model, model_fingerprint, run_judge
from llmpipe.io import atomic_dir, sha256_file, write_json, write_jsonl
from llmpipe.params import ParamsError, load_params, section


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
    args = ap.parse_args(argv)

    t0 = time.monotonic()
    try:
        params = load_params(args.params)
        cfg = EvalConfig.from_params(section(params, "eval"))
        seed = cfg.seed
        test = load_records(args.test, cfg.limit)
        train = load_records(args.train)
        examples = select_examples(train, cfg.fewshot_k, cfg.fewshot_seed, cfg.fewshot_stratify_key)
    except (ParamsError, RecordError, ValueError) as exc:
        print(f"[eval-base] error: {exc}", file=sys.stderr)
        return 2
    _progress(f"{len(test)} test records, {len(examples)} few-shot examples, model {args.model}")
    res = evaluate_model(
        args.model, cfg, test, systems={"base_zero_shot": [], "base_few_shot": examples}, seed=seed,
        progress=_progress,
    )
    judge_rows = None
    if cfg.judge_enabled:
        res["judge"], judge_rows = run_judge(cfg, res["rows"], seed)

    metrics = {
        "model": {"dir": args.model, "sha256": model_fingerprint(args.model)},
        "data": {"test": args.test, "test_sha256": sha256_file(args.test), "n_test": len(test),
                 "train_sha256": sha256_file(args.train)},
        "task": res["task"],
        "safety": res["safety"],
        "lm_eval": res["lm_eval"],
        "timing_s": {**res["timing_s"], "total": round(time.monotonic() - t0, 1)},
    }
    if "judge" in res:
        metrics["judge"] = res["judge"]
    with atomic_dir(args.out_dir) as tmp:
        write_jsonl(Path(tmp) / "outputs.jsonl", res["rows"])
        write_jsonl(Path(tmp) / "safety.jsonl", res["safety_rows"])
        write_jsonl(Path(tmp) / "lm_eval_samples.jsonl", res["lm_eval_samples"])
        write_jsonl(Path(tmp) / "fewshot_examples.jsonl",
                    ({"id": e["id"], "metadata": e.get("metadata", {})} for e in examples))
        if judge_rows is not None:
            write_jsonl(Path(tmp) / "judge.jsonl", judge_rows)
    write_json(args.metrics, metrics)
    _progress(f"wrote {args.metrics} and {args.out_dir}/ in {time.monotonic() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
