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
from llmpipe.data.pii import PiiError, scrub_records
from llmpipe.data.records import read_records
from llmpipe.io import write_json, write_jsonl, write_records, write_timings

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
        records = read_records(args.input, PiiError)
        print(f"pii-scrub: {len(records)} records from {args.input}, entities {cfg.entities}, "
              f"{cfg.workers} worker(s), batch {cfg.batch_size}, engine {params.curation.engine}",
              file=sys.stderr, flush=True)
        if params.curation.engine == "ray":  # same outputs, on Ray Data (docs/curation.md "Engines")
            from llmpipe.curation.ray_pii import scrub_records_ray
            from llmpipe.curation.ray_runtime import ray_session

            with ray_session(params.curation) as where:
                print(f"pii-scrub: engine ray ({where})", file=sys.stderr, flush=True)
                scrubbed, metrics, review = scrub_records_ray(records, cfg)
        else:
            scrubbed, metrics, review = scrub_records(records, cfg, progress=True)
    except (PiiError, ParamsError) as exc:
        print(f"pii-scrub: error: {exc}", file=sys.stderr)
        return 2
    write_records(args.output, scrubbed, params.curation.shards)  # shards > 1: a directory
    write_jsonl(args.review, review)
    write_json(args.metrics, metrics)
    seconds = time.monotonic() - start
    text_kb = sum(len(m["content"].encode("utf-8")) for r in records for m in r["messages"]) / 1000
    write_timings("pii-scrub", {"seconds": round(seconds, 3), "records": len(records),
                                "records_per_s": round(len(records) / seconds, 1),
                                "message_kb": round(text_kb, 1), "kb_per_s": round(text_kb / seconds, 1)})
    print(f"pii-scrub: wrote {len(scrubbed)} records to {args.output} "
          f"({metrics['records_touched']} touched, {metrics['entities_total']} entities) "
          f"and {args.metrics} in {seconds:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
