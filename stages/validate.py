"""DVC stage `validate`: raw files (messages / Alpaca / ShareGPT) -> repaired canonical records.

in:  validate.inputs (data/raw), params validate.* (repair policy: validate.repair.*),
     model.name_or_path (tokenizer), model.max_seq_len
out: data/validated/records.jsonl (curation.shards > 1: a directory of shards),
     data/validated/rejects.jsonl (reason per rejected item),
     data/validated/repairs.jsonl (what was repaired in which kept record), metrics/validate.json
"""

from __future__ import annotations

import argparse
import sys
import time

from llmpipe.config import ParamsError, load_stage_params
from llmpipe.data.validate import (
    StrictValidationError,
    TokenCounter,
    ValidateOutputs,
    Validator,
    local_batch_map,
    stderr_progress,
    validate_files,
)
from llmpipe.io import write_json, write_timings
from llmpipe.model.source import ModelSourceError, load_tokenizer

PARAMS = ["model.name_or_path", "model.max_seq_len", "validate", "curation"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=None)
    ap.add_argument("--out-records", default="data/validated/records.jsonl")
    ap.add_argument("--out-rejects", default="data/validated/rejects.jsonl")
    ap.add_argument("--out-repairs", default="data/validated/repairs.jsonl")
    ap.add_argument("--metrics", default="metrics/validate.json")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    out = ValidateOutputs(args.out_records, args.out_rejects, args.out_repairs)  # shards > 1: records is a dir
    try:
        cfg = load_stage_params(PARAMS, args.params)
        counter = TokenCounter(load_tokenizer(cfg.model.name_or_path))
        if cfg.curation.engine == "ray":  # same outputs, on a Ray actor pool (docs/curation.md "Engines")
            from llmpipe.curation.ray_runtime import ray_session
            from llmpipe.curation.ray_validate import ray_batch_map

            with ray_session(cfg.curation) as where:
                print(f"[validate] engine ray ({where}): batches of {cfg.curation.batch_size} items on "
                      f"{cfg.curation.workers} actors", file=sys.stderr)
                batch_map = ray_batch_map(cfg.validate, cfg.model.max_seq_len, counter.tokenizer,
                                          cfg.curation.workers)
                summary = validate_files(cfg.validate, out, batch_map, cfg.curation.batch_size,
                                         cfg.curation.shards, stderr_progress())
        else:  # one item at a time: strict mode stops at the first bad record
            batch_map = local_batch_map(Validator(cfg.validate, cfg.model.max_seq_len, counter))
            summary = validate_files(cfg.validate, out, batch_map, 1, cfg.curation.shards, stderr_progress())
    except (ParamsError, ModelSourceError) as exc:
        print(f"[validate] error: {exc}", file=sys.stderr)
        return 2
    except (StrictValidationError, FileNotFoundError) as exc:
        print(f"[validate] error: {exc}", file=sys.stderr)
        return 1
    metrics = summary.metrics
    write_json(args.metrics, metrics)
    seconds = time.perf_counter() - t0
    write_timings("validate", {"seconds": round(seconds, 3), "items_read": metrics["items_read"]})
    print(
        f"[validate] {metrics['records_valid']} valid ({metrics['records_repaired']} repaired), "
        f"{metrics['records_rejected']} rejected {metrics['rejected_by_reason']} in {seconds:.1f}s",
        file=sys.stderr,
    )
    for r in summary.first_rejects:
        print(f"[validate] rejected {r.describe()}", file=sys.stderr)
    if metrics["records_rejected"] > len(summary.first_rejects):
        print(f"[validate] ... {metrics['records_rejected'] - len(summary.first_rejects)} more in "
              f"{args.out_rejects}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
