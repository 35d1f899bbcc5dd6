"""DVC stage pii-scrub: replace PII in every message with typed placeholders (Presidio + spaCy).

in:  data/validated/records.jsonl (canonical records; a file or a directory of shards), params.yaml pii.*
out: data/scrubbed/records.jsonl (same records, same order, scrubbed text, recomputed ids;
       curation.shards > 1: a directory of shards)
     data/scrubbed/review.jsonl (sample of replaced spans with context, per entity: for review,
       holds raw PII, a DVC out and never a metric)
     metrics/pii.json (records in/out/touched, messages touched, counts per entity and role)
     timings/pii-scrub.json (seconds, records/s, KB/s of message text; not a metric)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from llmpipe.config import ParamsError, load_stage_params
from llmpipe.data.pii import PiiError, scrub_file
from llmpipe.io import write_json, write_jsonl, write_timings

PARAMS = ["pii", "curation"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", type=Path, default=Path("data/validated/records.jsonl"))
    ap.add_argument("--output", type=Path, default=Path("data/scrubbed/records.jsonl"))
    ap.add_argument("--review", type=Path, default=Path("data/scrubbed/review.jsonl"))
    ap.add_argument("--metrics", type=Path, default=Path("metrics/pii.json"))
    ap.add_argument("--params", type=Path, default=None, help="params file (default params.yaml)")
    args = ap.parse_args(argv)

    start = time.monotonic()
    try:
        params = load_stage_params(PARAMS, args.params)
        cfg = params.pii
        print(f"pii-scrub: {args.input} -> {args.output}, entities {cfg.entities}, {cfg.workers} worker(s), "
              f"batch {cfg.batch_size}, engine {params.curation.engine}", file=sys.stderr, flush=True)
        if params.curation.engine == "ray":  # same outputs, on a Ray actor pool (docs/curation.md "Engines")
            from llmpipe.curation.ray_pii import ray_batch_map
            from llmpipe.curation.ray_runtime import ray_session

            with ray_session(params.curation) as where:
                print(f"pii-scrub: engine ray ({where})", file=sys.stderr, flush=True)
                result = scrub_file(args.input, args.output, cfg, params.curation.shards,
                                    batch_map=ray_batch_map(cfg))
        else:
            result = scrub_file(args.input, args.output, cfg, params.curation.shards)
    except (PiiError, ParamsError) as exc:
        print(f"pii-scrub: error: {exc}", file=sys.stderr)
        return 2
    write_jsonl(args.review, result.review)
    write_json(args.metrics, result.metrics)
    seconds = time.monotonic() - start
    write_timings("pii-scrub", {"seconds": round(seconds, 3), "records": result.records,
                                "records_per_s": round(result.records / seconds, 1),
                                "message_kb": round(result.message_kb, 1),
                                "kb_per_s": round(result.message_kb / seconds, 1)})
    print(f"pii-scrub: wrote {result.records} records to {args.output} "
          f"({result.metrics['records_touched']} touched, {result.metrics['entities_total']} entities) "
          f"and {args.metrics} in {seconds:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
