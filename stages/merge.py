"""DVC stage `merge`: base model + LoRA adapter -> standalone merged HF safetensors model.

in:  models/base/, models/adapter/, data/split/val.jsonl, params model.max_seq_len, merge.*
out: models/merged/ (weights, tokenizer, chat template), metrics/merge.json
"""

from __future__ import annotations

import argparse
import sys
import time

from llmpipe.export.merge import MergeError, merge_adapter
from llmpipe.io import atomic_dir, write_json
from llmpipe.model.base import load_base_tokenizer
from llmpipe.model.source import ModelSourceError
from llmpipe.params import ParamsError, load_params, section
from llmpipe.train.data import DataError, load_records, tokenize_records


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=None)
    ap.add_argument("--base", default="models/base")
    ap.add_argument("--adapter", default="models/adapter")
    ap.add_argument("--val", default="data/split/val.jsonl")
    ap.add_argument("--out", default="models/merged")
    ap.add_argument("--metrics", default="metrics/merge.json")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    try:
        params = load_params(args.params)
        mp = section(params, "merge")
        max_seq_len = int(section(params, "model")["max_seq_len"])
        n = int(mp.get("verify_examples", 4))
        tokenizer = load_base_tokenizer(args.base)
        val = tokenize_records(tokenizer, load_records(args.val), max_seq_len)
        verify_ids = val.input_ids[:n]
        with atomic_dir(args.out) as tmp:
            result = merge_adapter(args.base, args.adapter, tmp, verify_ids, dtype=str(mp.get("dtype", "float32")),
                                   tolerance=float(mp.get("tolerance", 1e-3)))
    except (ParamsError, KeyError, DataError, ModelSourceError, MergeError) as exc:
        print(f"[merge] error: {exc}", file=sys.stderr)
        return 2
    metrics = result.to_dict()
    metrics["seconds"] = round(time.perf_counter() - t0, 2)
    write_json(args.metrics, metrics)
    print(f"[merge] merged -> {args.out} ({result.dtype}); max |logit diff| {result.max_abs_logit_diff:.3e} "
          f"(saved dtype: {result.max_abs_logit_diff_saved:.3e}) in {metrics['seconds']}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
