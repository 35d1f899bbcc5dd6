"""DVC stage `validate`: raw files (messages / Alpaca / ShareGPT) -> canonical records + rejects.

in:  validate.inputs (data/raw), params validate.*, model.name_or_path, model.max_seq_len
out: data/validated/records.jsonl, data/validated/rejects.jsonl, metrics/validate.json
"""

from __future__ import annotations

import argparse
import sys
import time


from llmpipe.data.validate import (
    StrictValidationError,
    TokenCounter,
    ValidateConfig,
    iter_inputs,
    stderr_progress,
    validate_items,
)
from llmpipe.io import write_json, write_jsonl
from llmpipe.model.source import ModelSourceError, load_tokenizer
from llmpipe.params import load_params


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=None)
    ap.add_argument("--out-records", default="data/validated/records.jsonl")
    ap.add_argument("--out-rejects", default="data/validated/rejects.jsonl")
    ap.add_argument("--metrics", default="metrics/validate.json")
    args = ap.parse_args(argv)

    params = load_params(args.params)
    cfg = ValidateConfig.from_params(params)
    t0 = time.perf_counter()
    try:
        tokenizer = load_tokenizer(params["model"]["name_or_path"])
    except ModelSourceError as exc:
        print(f"[validate] error: {exc}", file=sys.stderr)
        return 2
    try:
        result = validate_items(iter_inputs(cfg), cfg, TokenCounter(tokenizer), stderr_progress())
    except (StrictValidationError, FileNotFoundError) as exc:
        print(f"[validate] error: {exc}", file=sys.stderr)
        return 1
    write_jsonl(args.out_records, result.records)
    write_jsonl(args.out_rejects, (r.to_json() for r in result.rejects))
    metrics = result.metrics  # no timings here: keep `dvc metrics diff` free of noise
    write_json(args.metrics, metrics)
    print(
        f"[validate] {metrics['records_valid']} valid, {metrics['records_rejected']} rejected "
        f"{metrics['rejected_by_reason']} in {time.perf_counter() - t0:.1f}s",
        file=sys.stderr,
    )
    for r in result.rejects[:20]:
        print(f"[validate] rejected {r.describe()}", file=sys.stderr)
    if len(result.rejects) > 20:
        print(f"[validate] ... {len(result.rejects) - 20} more in {args.out_rejects}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
