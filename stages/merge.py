"""DVC stage `merge`: base model + LoRA adapter -> standalone merged HF safetensors model.

in:  models/base/, models/adapter/, data/split/val.jsonl, params model.max_seq_len, merge.*
out: models/merged/ (weights, tokenizer, chat template), metrics/merge.json;
     timings/merge.json (not tracked)
"""

from __future__ import annotations

import argparse
import sys
import time

from llmpipe.config import ParamsError, load_stage_params
from llmpipe.export.merge import MergeError, merge_with_val_check
from llmpipe.io import write_json, write_timings
from llmpipe.model.source import ModelSourceError
from llmpipe.train.data import DataError

PARAMS = ["model.max_seq_len", "merge"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=None)
    ap.add_argument("--base", default="models/base")
    ap.add_argument("--adapter", default="models/adapter")
    ap.add_argument("--val", default="data/split/val.jsonl")
    ap.add_argument("--out", default="models/merged")
    ap.add_argument("--metrics", default="metrics/merge.json")
    ap.add_argument("--timings-root", default=".", help="timings/merge.json goes under this directory")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    try:
        cfg = load_stage_params(PARAMS, args.params)
        result = merge_with_val_check(args.base, args.adapter, args.out, args.val, cfg.merge, cfg.model.max_seq_len)
    except (ParamsError, DataError, ModelSourceError, MergeError) as exc:
        print(f"[merge] error: {exc}", file=sys.stderr)
        return 2
    seconds = round(time.perf_counter() - t0, 2)
    write_json(args.metrics, result.to_dict())
    write_timings("merge", {"seconds": seconds}, root=args.timings_root)
    print(f"[merge] merged -> {args.out} ({result.dtype}); max |logit diff| {result.max_abs_logit_diff:.3e} "
          f"(saved dtype: {result.max_abs_logit_diff_saved:.3e}) in {seconds}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
