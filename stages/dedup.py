"""DVC stage `minhash-dedup`: drop exact and near duplicates, report every removed record.

in:  data/scrubbed/records.jsonl (a file, or a directory of shards), params dedup.*
     (num_perm, threshold, shingle_size, roles), curation.* (engine, shards)
out: data/dedup/records.jsonl (kept records, input order; curation.shards > 1: a directory of
     part-NNNNN.jsonl shards),
     data/dedup/clusters.jsonl (one line per cluster: kept id+source, every removed id+source
     with kind exact|near and estimated Jaccard to the kept record),
     metrics/dedup.json (records_in/out, exact/near duplicates removed, clusters, params)
"""

from __future__ import annotations

import argparse
import sys
import time

from llmpipe.config import ParamsError, load_stage_params
from llmpipe.data.dedup import DedupError, dedup_file
from llmpipe.io import write_json, write_jsonl, write_timings

PARAMS = ["dedup", "curation"]


def _progress(msg: str) -> None:
    print(f"[dedup] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=None, help="params file (default: params.yaml)")
    ap.add_argument("--input", default="data/scrubbed/records.jsonl")
    ap.add_argument("--out-records", default="data/dedup/records.jsonl")
    ap.add_argument("--out-clusters", default="data/dedup/clusters.jsonl")
    ap.add_argument("--metrics", default="metrics/dedup.json")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    try:
        cfg = load_stage_params(PARAMS, args.params)
        shards = cfg.curation.shards
        if cfg.curation.engine == "ray":  # same outputs, on Ray (docs/curation.md "Engines")
            from llmpipe.curation.ray_dedup import dedup_file_ray
            from llmpipe.curation.ray_runtime import ray_session

            with ray_session(cfg.curation) as where:
                _progress(f"engine ray ({where})")
                clusters, metrics = dedup_file_ray(args.input, args.out_records, cfg.dedup, cfg.curation, shards,
                                                   progress=_progress)
        else:  # two streaming passes over the input, memory bounded by the batch (docs/curation.md)
            clusters, metrics = dedup_file(args.input, args.out_records, cfg.dedup, shards, progress=_progress)
    except (DedupError, ParamsError) as exc:
        print(f"[dedup] error: {exc}", file=sys.stderr)
        return 2
    write_jsonl(args.out_clusters, clusters)
    write_json(args.metrics, metrics)
    seconds = time.perf_counter() - t0
    write_timings("minhash-dedup", {"seconds": round(seconds, 3), "records_in": metrics["records_in"]})
    _progress(
        f"{metrics['records_in']} in -> {metrics['records_out']} out "
        f"({metrics['exact_duplicates_removed']} exact, {metrics['near_duplicates_removed']} near, "
        f"{metrics['clusters']} clusters) in {seconds:.1f}s; report: {args.out_clusters}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
