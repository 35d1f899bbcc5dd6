"""Generated client traffic for canary analysis and load tests: prompts from a split JSONL file
(system + user turns of each record), sent by N concurrent async clients, bounded in count/time."""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp


class TrafficError(RuntimeError):
    """Prompts cannot be read."""


def load_prompts(path: str | Path, limit: int | None = None, system_prompt: str | None = None
                 ) -> list[list[dict[str, str]]]:
    """Chat prompts (the messages before the final assistant reply) from a canonical JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise TrafficError(f"{path}: prompt file not found (run the split stage first)")
    prompts: list[list[dict[str, str]]] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                messages = json.loads(line)["messages"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise TrafficError(f"{path}:{lineno}: not a canonical record with 'messages' ({exc})") from exc
            if messages and messages[-1].get("role") == "assistant":
                messages = messages[:-1]          # the reply is what the model must produce
            turns = [{"role": m["role"], "content": m["content"]} for m in messages]
            if system_prompt and not any(m["role"] == "system" for m in turns):
                turns.insert(0, {"role": "system", "content": system_prompt})
            if any(m["role"] == "user" for m in turns):
                prompts.append(turns)
            if limit and len(prompts) >= limit:
                break
    if not prompts:
        raise TrafficError(f"{path}: no records with a user turn")
    return prompts


@dataclass
class TrafficResult:
    sent: int = 0
    ok: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)
    overhead_s: list[float] = field(default_factory=list)   # client latency - router-reported backend time
    by_version: dict[str, int] = field(default_factory=dict)
    duration_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"sent": self.sent, "ok": self.ok, "failed": self.failed, "failures": self.failures[:20],
                "by_version": dict(sorted(self.by_version.items())), "duration_s": round(self.duration_s, 3)}


async def drive(url: str, prompts: list[list[dict[str, str]]], *, concurrency: int = 4,
                max_requests: int | None = None, max_seconds: float = 60.0,
                stop: threading.Event | None = None, max_tokens: int = 64, model: str = "llmpipe",
                api_key: str | None = None, temperature: float = 0.0, timeout_s: float = 300.0,
                extra: dict[str, Any] | None = None, pause_s: float = 0.0) -> TrafficResult:
    """Send chat completions to ``url`` (base URL) until a limit is hit or ``stop`` is set;
    each client waits ``pause_s`` between its requests (a paced user rather than a load test)."""
    result = TrafficResult()
    counter = itertools.count()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    deadline = time.monotonic() + max_seconds
    t_start = time.monotonic()

    async def worker(session: aiohttp.ClientSession) -> None:
        while True:
            if stop is not None and stop.is_set():
                return
            if time.monotonic() >= deadline:
                return
            i = next(counter)
            if max_requests is not None and i >= max_requests:
                return
            body = {"model": model, "messages": prompts[i % len(prompts)], "max_tokens": max_tokens,
                    "temperature": temperature, "seed": i, **(extra or {})}
            result.sent += 1
            t0 = time.perf_counter()
            try:
                async with session.post(url + "/v1/chat/completions", data=json.dumps(body),
                                        headers=headers) as resp:
                    raw = await resp.read()
                    elapsed = time.perf_counter() - t0
                    if resp.status != 200:
                        raise RuntimeError(f"HTTP {resp.status}: {raw[:200].decode(errors='replace')}")
                    data = json.loads(raw)
                    if not data.get("choices"):
                        raise RuntimeError("response without choices")
                    version = resp.headers.get("x-llmpipe-version", "direct")
                    upstream = resp.headers.get("x-llmpipe-upstream-ms")
            except Exception as exc:  # every failure is counted and reported, never hidden
                result.failed += 1
                result.failures.append(f"request {i}: {type(exc).__name__}: {exc}"[:300])
                continue
            result.ok += 1
            if pause_s > 0:
                await asyncio.sleep(pause_s)
            result.latencies_s.append(elapsed)
            if upstream is not None:
                result.overhead_s.append(elapsed - float(upstream) / 1000.0)
            result.by_version[version] = result.by_version.get(version, 0) + 1

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    result.duration_s = time.monotonic() - t_start
    return result
