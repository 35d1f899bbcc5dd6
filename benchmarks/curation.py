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
STAGES = ("validate", "pii", "dedup", "pii-long")


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


def make_long_records(n: int, seed: int = 11) -> list[dict]:
    """n long multi-turn technical chats (ShareGPT-like: prose, code, stack traces; ~4-9 KB of
    message text each) from benchmarks/pii_quality.py's generator, with PII planted in every
    third user turn. The long-text corpus for pii-scrub's KB/s."""
    import importlib.util

    from llmpipe.data.records import make_record

    spec = importlib.util.spec_from_file_location("pii_quality", ROOT / "benchmarks" / "pii_quality.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    convs = bench.tech_set(n=max(n, 50) * 3, seed=seed)
    pii = [d.text for d in bench.pii_set(seed=seed)]
    rng = random.Random(seed)
    out = []
    for k in range(n):
        msgs = [{"role": "system", "content": "You are a helpful programming assistant."}]
        for c in range(3):  # three generated conversations make one long chat
            for i, turn in enumerate(convs[(3 * k + c) % len(convs)]):
                text = turn.text
                if i % 2 == 0 and rng.random() < 0.33:
                    text = f"{rng.choice(pii)}\n\n{text}"
                msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
        out.append(make_record(msgs, {}, {"file": "bench-long", "line": k + 1, "format": "messages"}))
    return out


def message_kb(records: list[dict]) -> float:
    return sum(len(m["content"].encode("utf-8")) for r in records for m in r["messages"]) / 1000


def cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def peak_rss_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round((own + kids) / 1024, 1)  # ru_maxrss is KiB on Linux


def run_one(stage: str, n: int) -> dict:
    """Measure one stage on n records in this process; returns the measurement."""
    from llmpipe.config import load_params as load_typed_params

    records = make_long_records(n) if stage == "pii-long" else make_records(n)
    base_rss = peak_rss_mb()
    if stage == "validate":
        from llmpipe.data.formats import RawItem
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
    elif stage in ("pii", "pii-long"):
        from llmpipe.data.pii import scrub_records

        cfg = load_typed_params(ROOT / "params.yaml").pii
        cpu0 = cpu_seconds()
        t0 = time.perf_counter()  # includes spaCy/Presidio start-up in each worker
        _, metrics, _ = scrub_records(records, cfg, progress=False)
        seconds = time.perf_counter() - t0
        cpu = cpu_seconds() - cpu0  # this process + the (joined) pool workers
        detail = {"records_touched": metrics.get("records_touched"), "workers": cfg.workers,
                  "message_kb": round(message_kb(records), 1),
                  "kb_per_s": round(message_kb(records) / seconds, 1),
                  # On a shared box wall time says little; CPU seconds are the scrubber's own.
                  "cpu_seconds": round(cpu, 2), "kb_per_cpu_s": round(message_kb(records) / cpu, 1)}
    elif stage == "dedup":
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
                   **({"median_kb_per_s": statistics.median(x["detail"]["kb_per_s"] for x in runs),
                       "median_kb_per_cpu_s": statistics.median(x["detail"]["kb_per_cpu_s"] for x in runs),
                       "message_kb": runs[0]["detail"]["message_kb"]} if stage == "pii-long" else {}),
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
