"""Load benchmark: N concurrent clients for S seconds against a real llama.cpp engine, first
directly, then through the canary router (stable + canary on the same engine, so every request
is real and the split logic runs). Reports throughput, latency, lost requests and router overhead.

Router overhead per request = client-observed latency through the router minus the backend time
the router measured for that request (header x-llmpipe-upstream-ms): the extra hop, parsing,
routing, format scoring and metrics.

    PYTHONPATH=src python benchmarks/router_load.py --clients 32 --seconds 60
writes benchmarks/results/router_load.json
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from llmpipe.io import write_json  # noqa: E402
from llmpipe.serve.analysis import percentile  # noqa: E402
from llmpipe.serve.engines import EngineProcess, LlamaCppSpec, free_port  # noqa: E402
from llmpipe.serve.rollout import gguf_path  # noqa: E402
from llmpipe.serve.traffic import drive  # noqa: E402

PROMPTS = [[{"role": "system", "content": "Answer with only a JSON object with the keys intent, product, "
                                          "urgency and order_id."},
            {"role": "user", "content": f"Where is my order KX48{i:04d}? The e-reader has not arrived."}]
           for i in range(64)]


def summary(res, label: str) -> dict:
    lat = [x * 1000 for x in res.latencies_s]
    out = {
        "label": label, "sent": res.sent, "ok": res.ok, "lost": res.failed, "failures": res.failures[:5],
        "duration_s": round(res.duration_s, 2),
        "throughput_rps": round(res.ok / res.duration_s, 3) if res.duration_s else None,
        "latency_ms": {q: round(percentile(lat, q), 2) if lat else None for q in (50, 95, 99)},
        "by_version": res.by_version,
    }
    if res.overhead_s:
        ov = [x * 1000 for x in res.overhead_s]
        out["router_overhead_ms"] = {"p50": round(percentile(ov, 50), 3), "p99": round(percentile(ov, 99), 3),
                                     "mean": round(sum(ov) / len(ov), 3), "n": len(ov)}
    return out


def start_router(engine_url: str, port: int, weight: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-m", "llmpipe.cli", "router", "--stable", engine_url, "--stable-version", "stable",
           "--canary", engine_url, "--canary-version", "canary", "--weight", str(weight),
           "--port", str(port), "--params", str(ROOT / "params.yaml")]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"router did not start: {proc.stderr.read() if proc.stderr else ''}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--weight", type=float, default=0.1, help="canary share inside the router")
    ap.add_argument("--model", default="embedded:smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads")
    ap.add_argument("--sequential", type=int, default=100, help="requests in the 1-client comparison")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/router_load.json"))
    args = ap.parse_args()

    spec = LlamaCppSpec(model=gguf_path(args.model), port=free_port(), n_ctx=1024, n_threads=args.threads)
    log = Path(tempfile.gettempdir()) / f"router_load_engine_{os.getpid()}.log"
    eng = EngineProcess(spec, log, name="llama.cpp engine").start()
    router = None
    try:
        eng.wait_healthy(180)
        common = dict(concurrency=args.clients, max_seconds=args.seconds, max_tokens=args.max_tokens)
        asyncio.run(drive(eng.url, PROMPTS, concurrency=2, max_requests=8, max_tokens=args.max_tokens))  # warm-up
        print(f"[bench] direct: {args.clients} clients x {args.seconds:.0f}s", file=sys.stderr)
        direct = asyncio.run(drive(eng.url, PROMPTS, **common))
        rport = free_port()
        router = start_router(eng.url, rport, args.weight)
        print(f"[bench] router: {args.clients} clients x {args.seconds:.0f}s", file=sys.stderr)
        routed = asyncio.run(drive(f"http://127.0.0.1:{rport}", PROMPTS, **common))
        # sequential (1 client): end-to-end latency difference without queueing
        seq_direct = asyncio.run(drive(eng.url, PROMPTS[:1], concurrency=1, max_requests=args.sequential,
                                       max_tokens=1))
        seq_router = asyncio.run(drive(f"http://127.0.0.1:{rport}", PROMPTS[:1], concurrency=1,
                                       max_requests=args.sequential, max_tokens=1))
        metrics_text = httpx.get(f"http://127.0.0.1:{rport}/metrics", timeout=5).text
    finally:
        if router is not None:
            router.terminate()
            router.wait(10)
        eng.stop()
    d, r = summary(direct, "direct"), summary(routed, "router")
    result = {
        "setup": {"clients": args.clients, "seconds": args.seconds, "max_tokens": args.max_tokens,
                  "canary_weight": args.weight, "model": args.model, "engine_threads": args.threads,
                  "cpus": os.cpu_count(), "load_avg_at_end": os.getloadavg(), "python": platform.python_version(),
                  "note": "llama.cpp server handles one request at a time; throughput is engine-bound. "
                          "Shared 2-core machine (other jobs running): latency numbers are noisy."},
        "direct": d, "router": r,
        "throughput_ratio_router_vs_direct": round(r["throughput_rps"] / d["throughput_rps"], 3)
        if d["throughput_rps"] else None,
        "latency_p50_diff_ms": round(r["latency_ms"][50] - d["latency_ms"][50], 2)
        if d["latency_ms"][50] is not None and r["latency_ms"][50] is not None else None,
        "sequential_1_client": {
            "direct": summary(seq_direct, "direct"), "router": summary(seq_router, "router"),
            "latency_p50_diff_ms": round(percentile([x * 1000 for x in seq_router.latencies_s], 50)
                                         - percentile([x * 1000 for x in seq_direct.latencies_s], 50), 3),
        },
        "lost_requests": d["lost"] + r["lost"] + seq_direct.failed + seq_router.failed,
        "router_metrics_sample": [l for l in metrics_text.splitlines() if l.startswith("llmpipe_router_requests_total")],
    }
    write_json(args.out, result)
    print(f"[bench] direct {d['throughput_rps']} req/s, router {r['throughput_rps']} req/s, "
          f"overhead {r.get('router_overhead_ms')}, lost {result['lost_requests']} -> {args.out}", file=sys.stderr)
    return 0 if result["lost_requests"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
