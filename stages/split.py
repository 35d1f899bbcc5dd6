"""DVC stage `split`: deterministic stratified train/val/test + dataset version + contamination.

in:  data/dedup/records.jsonl, params split.* (ratios, seed, stratify_key, pin_key, contamination_*)
out: data/split/train.jsonl, data/split/val.jsonl, data/split/test.jsonl,
     data/split/contamination.jsonl (val/test records near-duplicating a train record; reported,
     not dropped), metrics/data.json (sha256 per split file, dataset_version, counts per split
     and per stratum, contamination_pairs, params)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from llmpipe.config import ParamsError, load_stage_params
from llmpipe.data.dedup import DedupError
from llmpipe.data.split import SPLITS, split_file
from llmpipe.io import write_json, write_timings

PARAMS = ["split", "curation"]


def _progress(msg: str) -> None:
    print(f"[split] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=None, help="params file (default: params.yaml)")
    ap.add_argument("--input", default="data/dedup/records.jsonl")
    ap.add_argument("--out-dir", default="data/split", help="where train/val/test.jsonl go")
    ap.add_argument("--out-contamination", default=None,
                    help="contamination report (default: OUT_DIR/contamination.jsonl)")
    ap.add_argument("--metrics", default="metrics/data.json")
    args = ap.parse_args(argv)
    out_dir = Path(args.out_dir)
    contamination_path = Path(args.out_contamination or out_dir / "contamination.jsonl")

    t0 = time.perf_counter()
    try:
        cfg = load_stage_params(PARAMS, args.params)
        if cfg.curation.engine == "ray":  # same outputs, pass 1 on Ray actors (docs/curation.md "Engines")
            from llmpipe.curation.ray_runtime import ray_session
            from llmpipe.curation.ray_split import ray_batch_map

            with ray_session(cfg.curation) as where:
                _progress(f"engine ray ({where})")
                metrics = split_file(args.input, out_dir, cfg.split, _progress,
                                     batch_map=ray_batch_map(cfg.split, cfg.curation),
                                     batch_size=cfg.curation.batch_size, contamination_path=contamination_path)
        else:
            metrics = split_file(args.input, out_dir, cfg.split, _progress, contamination_path=contamination_path)
    except (DedupError, ParamsError, ValueError) as exc:
        print(f"[split] error: {exc}", file=sys.stderr)
        return 2
    metrics = {**metrics, "files": {name: str(out_dir / f"{name}.jsonl") for name in SPLITS}}
    write_json(args.metrics, metrics)
    seconds = time.perf_counter() - t0
    write_timings("split", {"seconds": round(seconds, 3), "records": metrics["records"]})
    counts = ", ".join(f"{s}={metrics['counts'][s]}" for s in SPLITS)
    _progress(
        f"{counts}; dataset_version {metrics['dataset_version'][:12]}; "
        f"{metrics['contamination_pairs']} contamination pairs ({contamination_path}) in {seconds:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
