"""Curation at scale: both engines (local, ray) on a generated corpus, with the same outputs.

Corpus: short support records (~400 characters, benchmarks/curation.py's generator: demo texts
with realistic PII and near duplicates) plus a share of long technical chats (4-9 KB of text,
benchmarks/pii_quality.py's generator) and 2% exact copies. Each (engine, stage, size) runs in
a fresh subprocess, which calls the stage's library function (the local one, or the Ray one
inside an embedded local Ray) on the corpus. Reported per run:

- seconds of the stage call (Ray start-up reported apart, as ``startup_seconds``),
  records/s and KB/s of message text;
- peak memory of all processes together (the run's process tree: driver, pool workers, Ray's
  GCS/raylet/workers), sampled every 0.5 s, as the sum of RSS and the sum of PSS (PSS counts a
  shared page, e.g. Ray's object store, once in all);
- the load average before and after (the box is shared: wall times are not idle-box times);
- a sha256 over the stage's outputs, so the results show both engines wrote the same bytes.

    nice -n 19 python benchmarks/curation_scale.py --sizes 10000 100000 --stages dedup split validate
    nice -n 19 python benchmarks/curation_scale.py --sizes 10000 --stages pii
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "curation_scale.json"
STAGES = ("validate", "pii", "dedup", "split")
ENGINES = ("local", "ray")
LONG_SHARE = 0.02   # long technical chats among the records (every 50th)
EXACT_SHARE = 0.02  # exact copies of earlier records (every 50th)


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_curation", ROOT / "benchmarks" / "curation.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def corpus(n: int) -> list[dict]:
    """n canonical records: short support records, with a long chat at every 50th position
    (k % 50 == 24) and an exact copy of the record 37 places back at every 50th (k % 50 == 49)."""
    from llmpipe.data.records import make_record

    bench = _bench_module()
    short = bench.make_records(n)
    long = bench.make_long_records(max(1, int(n * LONG_SHARE)))
    out = []
    for k in range(n):
        if k % 50 == 24:
            out.append(long[(k // 50) % len(long)])
        elif k % 50 == 49:
            src = out[k - 37]
            out.append(make_record(src["messages"], src["metadata"], {"file": "bench", "line": k + 1, "format": "messages"}))
        else:
            out.append(short[k])
    return out


def message_kb(records: list[dict]) -> float:
    return sum(len(m["content"].encode("utf-8")) for r in records for m in r["messages"]) / 1000


class TreeMemory:
    """Peak sum of RSS and of PSS over this process and all its descendants."""

    def __init__(self, every_s: float = 0.5):
        import psutil

        self.me = psutil.Process()
        self.every_s = every_s
        self.peak_rss = self.peak_pss = 0
        self.cpu: dict[int, float] = {}  # pid -> user+system seconds when last seen
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        import psutil

        rss = pss = 0
        for p in [self.me, *self.me.children(recursive=True)]:
            try:
                info = p.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            rss += info.rss
            pss += getattr(info, "pss", info.rss)
            with_cpu = p.cpu_times()
            self.cpu[p.pid] = with_cpu.user + with_cpu.system
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)

    def cpu_seconds(self) -> float:
        """CPU seconds used so far by the tree (every process as last seen)."""
        self._sample()
        return sum(self.cpu.values())

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.every_s)

    def __enter__(self) -> "TreeMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def digest(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def run_stage(engine: str, stage: str, records: list[dict], params, tmp: Path) -> tuple[str, dict]:
    """Run one stage with one engine; returns (output digest, a few counts)."""
    ray = engine == "ray"
    if stage == "validate":
        from llmpipe.data.validate import TokenCounter, validate_inputs
        from llmpipe.model.source import load_tokenizer

        with open(tmp / "corpus.jsonl", "w", encoding="utf-8") as fh:
            for r in records:
                fh.write(json.dumps({"messages": r["messages"], "metadata": r["metadata"]}, ensure_ascii=False) + "\n")
        # a relative path: records name their source file, and the digests must not see tmp's name
        cfg = params.validate_.model_copy(update={"inputs": ["corpus.jsonl"]})
        cwd = os.getcwd()
        os.chdir(tmp)
        try:
            if ray:
                from llmpipe.curation.ray_validate import validate_inputs_ray

                res = validate_inputs_ray(cfg, params.model.max_seq_len, params.model.name_or_path, params.curation)
            else:
                res = validate_inputs(cfg, params.model.max_seq_len,
                                      TokenCounter(load_tokenizer(params.model.name_or_path)))
        finally:
            os.chdir(cwd)
        return digest(res.records, [r.to_json() for r in res.rejects], res.repairs, res.metrics), {
            "valid": res.metrics["records_valid"], "rejected": res.metrics["records_rejected"]}
    if stage == "pii":
        if ray:
            from llmpipe.curation.ray_pii import scrub_records_ray

            out, metrics, review = scrub_records_ray(records, params.pii)
        else:
            from llmpipe.data.pii import scrub_records

            out, metrics, review = scrub_records(records, params.pii, progress=False)
        return digest(out, metrics, review), {"touched": metrics["records_touched"], "workers": params.pii.workers}
    if stage == "dedup":
        if ray:
            from llmpipe.curation.ray_dedup import dedup_records_ray

            kept, clusters, metrics = dedup_records_ray(records, params.dedup, params.curation)
        else:
            from llmpipe.data.dedup import dedup_records

            kept, clusters, metrics = dedup_records(records, params.dedup)
        return digest(kept, clusters, metrics), {"kept": len(kept), "exact": metrics["exact_duplicates_removed"],
                                                 "near": metrics["near_duplicates_removed"]}
    if stage == "split":
        if ray:
            from llmpipe.curation.ray_split import split_records_ray

            res = split_records_ray(records, params.split, params.curation)
        else:
            from llmpipe.data.split import split_records

            res = split_records(records, params.split)
        return digest({k: hashlib.sha256(v).hexdigest() for k, v in res.files.items()}, res.contamination,
                      res.metrics), {"contamination_pairs": res.metrics["contamination_pairs"]}
    raise SystemExit(f"unknown stage {stage}")


def run_one(engine: str, stage: str, n: int) -> dict:
    import contextlib

    from llmpipe.config import load_params

    params = load_params(ROOT / "params.yaml")
    records = corpus(n)
    # imports are not the stage's work: load every module either engine uses before timing
    import llmpipe.data.dedup, llmpipe.data.pii, llmpipe.data.split, llmpipe.data.validate  # noqa: E401,F401
    if engine == "ray":
        import ray.data  # noqa: F401

        import llmpipe.curation.ray_dedup, llmpipe.curation.ray_pii, llmpipe.curation.ray_split  # noqa: E401,F401
        import llmpipe.curation.ray_validate  # noqa: F401
    kb = message_kb(records)
    load_before = os.getloadavg()
    with TreeMemory() as mem, tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        if engine == "ray":
            from llmpipe.curation.ray_runtime import ray_session

            session = ray_session(params.curation.model_copy(update={"engine": "ray"}))
        else:
            session = contextlib.nullcontext("local")
        with session as where:
            startup = time.perf_counter() - t0
            cpu1 = mem.cpu_seconds()
            t1 = time.perf_counter()
            out_digest, counts = run_stage(engine, stage, records, params, Path(tmp))
            seconds = time.perf_counter() - t1
            cpu = mem.cpu_seconds() - cpu1
    return {"engine": engine, "stage": stage, "records": n, "where": where, "seconds": round(seconds, 3),
            "startup_seconds": round(startup, 3), "records_per_s": round(n / seconds, 1),
            "message_kb": round(kb, 1), "kb_per_s": round(kb / seconds, 1),
            # on the shared box wall time measures the neighbours too; CPU seconds of the whole
            # process tree (Ray's own processes included) do not
            "cpu_seconds": round(cpu, 2), "records_per_cpu_s": round(n / cpu, 1),
            "peak_rss_sum_mb": round(mem.peak_rss / 2**20, 1), "peak_pss_sum_mb": round(mem.peak_pss / 2**20, 1),
            "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()],
            "output_sha256": out_digest, "counts": counts}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--one", nargs=3, metavar=("ENGINE", "STAGE", "N"), help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(RESULTS), help="results JSON; rows are merged by (engine, stage, records)")
    args = ap.parse_args()

    if args.one:
        print(json.dumps(run_one(args.one[0], args.one[1], int(args.one[2]))))
        return 0

    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {"benchmark": "curation_scale", "results": []}
    result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}
    result["corpus"] = {"short_record_chars": 400, "long_share": LONG_SHARE, "exact_copy_share": EXACT_SHARE}
    for n in args.sizes:
        for stage in args.stages:
            for engine in args.engines:
                runs = []
                for r in range(args.repeats):
                    print(f"[bench] {engine} {stage} x {n}, run {r + 1}/{args.repeats}", file=sys.stderr, flush=True)
                    proc = subprocess.run([sys.executable, __file__, "--one", engine, stage, str(n)],
                                          capture_output=True, text=True, cwd=ROOT)
                    if proc.returncode != 0:
                        print(proc.stderr[-3000:], file=sys.stderr)
                        return 1
                    runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                med = statistics.median(x["seconds"] for x in runs)
                row = {"engine": engine, "stage": stage, "records": n, "repeats": len(runs),
                       "median_seconds": med, "median_records_per_s": round(n / med, 1),
                       "median_kb_per_s": round(runs[0]["message_kb"] / med, 1),
                       "median_cpu_seconds": statistics.median(x["cpu_seconds"] for x in runs),
                       "peak_pss_sum_mb": max(x["peak_pss_sum_mb"] for x in runs),
                       "peak_rss_sum_mb": max(x["peak_rss_sum_mb"] for x in runs),
                       "output_sha256": runs[0]["output_sha256"], "runs": runs}
                result["results"] = [x for x in result["results"]
                                     if (x["engine"], x["stage"], x["records"]) != (engine, stage, n)] + [row]
                print(f"[bench] {engine:5s} {stage:8s} {n:>8d}: {row['median_records_per_s']:>9.1f} rec/s "
                      f"{row['median_kb_per_s']:>8.1f} KB/s, {row['median_cpu_seconds']} CPU-s, peak PSS {row['peak_pss_sum_mb']} MB "
                      f"(RSS sum {row['peak_rss_sum_mb']} MB), load {runs[-1]['load_after'][0]}",
                      file=sys.stderr, flush=True)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
