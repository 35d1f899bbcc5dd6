"""Curation throughput: records/s and peak memory of validate, pii-scrub and minhash-dedup.

Records are ~400-character support messages built deterministically from the demo generator's
texts (two messages joined and cut at a word boundary, so they carry realistic PII), in the
canonical chat format with the demo system prompt and JSON reply.

Each (stage, size) measurement runs in a fresh subprocess so its peak RSS is its own (pool
workers included, via RUSAGE_CHILDREN). Results go to benchmarks/results/curation.json.

    python benchmarks/curation.py                      # 10k (3 repeats) and 100k (1 repeat)
    python benchmarks/curation.py --sizes 10000 --repeats 1 --stages dedup
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "curation.json"
STAGES = ("validate", "pii", "dedup")


def make_records(n: int, seed: int = 7, chars: int = 400) -> list[dict]:
    """n canonical records with ~``chars``-character user turns drawn from the demo texts."""
    from llmpipe.demo import support as demo
    from llmpipe.data.records import make_record

    ds = demo.generate()
    texts = [e.user for e in ds.examples if e.kind == "base"]
    replies = [e.reply for e in ds.examples if e.kind == "base"]
    rng = random.Random(seed)
    out = []
    for k in range(n):
        i, j = rng.randrange(len(texts)), rng.randrange(len(texts))
        text = f"{texts[i]} Also: {texts[j]}"
        if len(text) > chars:
            text = text[: text.rfind(" ", 0, chars)]
        msgs = [{"role": "system", "content": demo.SYSTEM_PROMPT},
                {"role": "user", "content": f"[{k}] {text}"},
                {"role": "assistant", "content": replies[i]}]
        out.append(make_record(msgs, {"intent": json.loads(replies[i])["intent"]},
                               {"file": "bench", "line": k + 1, "format": "messages"}))
    return out


def peak_rss_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round((own + kids) / 1024, 1)  # ru_maxrss is KiB on Linux


def run_one(stage: str, n: int) -> dict:
    """Measure one stage on n records in this process; returns the measurement."""
    from llmpipe.params import load_params

    params = load_params(ROOT / "params.yaml")
    records = make_records(n)
    base_rss = peak_rss_mb()
    if stage == "validate":
        from llmpipe.data.formats import RawItem
        from llmpipe.config import load_params as load_typed_params
        from llmpipe.data.validate import TokenCounter, validate_items
        from llmpipe.model.source import load_tokenizer

        typed = load_typed_params(ROOT / "params.yaml")
        cfg, max_seq_len = typed.validate_, typed.model.max_seq_len
        counter = TokenCounter(load_tokenizer(typed.model.name_or_path))
        items = [RawItem("bench.jsonl", i + 1, {"messages": r["messages"], "metadata": r["metadata"]})
                 for i, r in enumerate(records)]
        t0 = time.perf_counter()
        result = validate_items(items, cfg, max_seq_len, counter)
        seconds = time.perf_counter() - t0
        detail = {"valid": result.metrics["records_valid"], "rejected": result.metrics["records_rejected"]}
    elif stage == "pii":
        from llmpipe.config import load_params as load_typed_params
        from llmpipe.data.pii import scrub_records

        cfg = load_typed_params(ROOT / "params.yaml").pii
        t0 = time.perf_counter()  # includes spaCy/Presidio start-up in each worker
        _, metrics = scrub_records(records, cfg, progress=False)
        seconds = time.perf_counter() - t0
        detail = {"records_touched": metrics.get("records_touched"), "workers": cfg.workers}
    elif stage == "dedup":
        from llmpipe.config import load_params as load_typed_params
        from llmpipe.data.dedup import dedup_records

        cfg = load_typed_params(ROOT / "params.yaml").dedup
        t0 = time.perf_counter()
        kept, _, metrics = dedup_records(records, cfg)
        seconds = time.perf_counter() - t0
        detail = {"kept": len(kept), "near_removed": metrics["near_duplicates_removed"],
                  "exact_removed": metrics["exact_duplicates_removed"]}
    else:
        raise SystemExit(f"unknown stage {stage}")
    return {"stage": stage, "records": n, "seconds": round(seconds, 3),
            "records_per_s": round(n / seconds, 1), "peak_rss_mb": peak_rss_mb(),
            "rss_before_stage_mb": base_rss, "detail": detail}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--repeats", type=int, default=None,
                    help="runs per (stage, size); default 3 for <=10k records, 1 above")
    ap.add_argument("--one", nargs=2, metavar=("STAGE", "N"), help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()

    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]))))
        return 0

    rows = []
    for n in args.sizes:
        for stage in args.stages:
            repeats = args.repeats or (3 if n <= 10_000 else 1)
            runs = []
            for r in range(repeats):
                print(f"[bench] {stage} x {n} records, run {r + 1}/{repeats}", file=sys.stderr, flush=True)
                proc = subprocess.run([sys.executable, __file__, "--one", stage, str(n)],
                                      capture_output=True, text=True, cwd=ROOT)
                if proc.returncode != 0:
                    print(proc.stderr[-3000:], file=sys.stderr)
                    return 1
                runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            med = statistics.median(x["seconds"] for x in runs)
            row = {"stage": stage, "records": n, "repeats": repeats, "median_seconds": med,
                   "median_records_per_s": round(n / med, 1),
                   "peak_rss_mb": max(x["peak_rss_mb"] for x in runs), "runs": runs}
            rows.append(row)
            print(f"[bench] {stage:8s} {n:>7d} records: {row['median_records_per_s']:>9.1f} rec/s "
                  f"(median {med:.2f}s of {repeats}), peak RSS {row['peak_rss_mb']} MB", file=sys.stderr)
    result = {
        "benchmark": "curation",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "record_chars": 400,
        "load_average_at_end": os.getloadavg(),
        "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"[bench] wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
