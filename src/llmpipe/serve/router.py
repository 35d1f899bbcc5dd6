"""OpenAI-compatible canary router: weighted split stable/canary, canary failures retried on stable.

Endpoints: POST /v1/chat/completions, POST /v1/completions (JSON or streamed), GET /v1/models,
GET /health, GET /metrics (Prometheus), GET /v1/deploy/state (controller state, if attached).
Requests in flight are counted per backend (``drain``), so a replaced engine stops only when idle.

One aiohttp server and one pooled aiohttp client session; the request body is parsed once (to
rewrite ``model`` to the backend's served name) and a non-streamed reply once (to score its
format). The split is deterministic (smooth weighted round robin): with weight 0.1 exactly every
10th request goes to the canary.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import time
from dataclasses import dataclass
from typing import Any, Callable

import aiohttp
from aiohttp import web

from llmpipe.serve.analysis import Sample
from llmpipe.serve.compliance import ReplyValidator, reply_text
from llmpipe.serve.metrics import RouterMetrics

COMPLETION_PATHS = ("/v1/chat/completions", "/v1/completions")


@dataclass
class Backend:
    """One upstream OpenAI-compatible engine serving one model version."""

    version: str
    url: str                    # base URL, e.g. http://127.0.0.1:8001
    model: str | None = None    # name to send upstream as "model" (None: keep the client's)
    api_key: str | None = None


Observer = Callable[[str, Backend, Sample], None]


def run_async(coro):
    """``asyncio.run`` on uvloop when it is installed (lower per-request overhead), else asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def _error_body(message: str, kind: str = "router_error") -> bytes:
    return json.dumps({"error": {"message": message, "type": kind}}).encode()


class Router:
    def __init__(
        self,
        stable: Backend,
        canary: Backend | None = None,
        *,
        weight: float = 0.0,
        validator: ReplyValidator | None = None,
        metrics: RouterMetrics | None = None,
        observer: Observer | None = None,
        public_model: str = "llmpipe",
        api_key: str | None = None,
        timeout_s: float = 300.0,
        canary_timeout_s: float = 60.0,
        max_connections: int = 256,
    ) -> None:
        self.stable = stable
        self.canary = canary
        self.weight = 0.0
        self.validator = validator
        self.metrics = metrics or RouterMetrics()
        self.observer = observer
        self.public_model = public_model
        self.api_key = api_key
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.canary_timeout = aiohttp.ClientTimeout(total=canary_timeout_s)
        self.max_connections = max_connections
        self.state_provider: Callable[[], dict[str, Any]] | None = None
        # extra health (e.g. the serving stack's engine checks): its "status" != "ok" answers 503
        self.health_provider: Callable[[], dict[str, Any]] | None = None
        self._acc = 0.0
        self.counts = {"requests": 0, "canary": 0, "retries": 0, "client_failures": 0}
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        # requests in flight per backend URL, so a replaced engine is stopped only once drained
        self.inflight: dict[str, int] = {}
        self.set_weight(weight)
        self._publish_backends()

    # -- configuration (called by the controller) -------------------------------------------
    def set_weight(self, weight: float) -> None:
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"canary weight must be in [0, 1], got {weight}")
        self.weight = float(weight) if self.canary else 0.0
        self._acc = 0.0
        self.metrics.weight.set(self.weight)

    def set_backends(self, stable: Backend, canary: Backend | None, weight: float) -> None:
        self.stable, self.canary = stable, canary
        self.set_weight(weight if canary else 0.0)
        self._publish_backends()

    def _publish_backends(self) -> None:
        roles = {"stable": self.stable.version}
        if self.canary:
            roles["canary"] = self.canary.version
        self.metrics.set_backends(roles)

    def pick(self) -> str:
        """Deterministic weighted split: 'canary' for a ``weight`` share of calls, else 'stable'."""
        w = self.weight
        if self.canary is None or w <= 0.0:
            return "stable"
        if w >= 1.0:
            return "canary"
        self._acc += w
        if self._acc >= 1.0 - 1e-9:
            self._acc -= 1.0
            return "canary"
        return "stable"

    # -- server lifecycle -------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        for path in COMPLETION_PATHS:
            app.router.add_post(path, self._completion)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/v1/deploy/state", self._state)
        app.on_startup.append(self._open_session)
        app.on_cleanup.append(self._close_session)
        return app

    async def _open_session(self, _app: web.Application) -> None:
        connector = aiohttp.TCPConnector(limit=self.max_connections, limit_per_host=self.max_connections,
                                         keepalive_timeout=60, ttl_dns_cache=None)
        self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False)

    async def _close_session(self, _app: web.Application) -> None:
        if self._session:
            await self._session.close()
            self._session = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Start serving in the running event loop; returns the bound port."""
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, backlog=1024)
        await site.start()
        return site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()
            self._runner = None

    # -- handlers ---------------------------------------------------------------------------
    def _authorized(self, request: web.Request) -> bool:
        if not self.api_key:
            return True
        got = request.headers.get("Authorization", "")
        return hmac.compare_digest(got.encode(), f"Bearer {self.api_key}".encode())

    async def _models(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.Response(status=401, body=_error_body("invalid API key", "auth_error"),
                                content_type="application/json")
        return web.json_response({"object": "list", "data": [
            {"id": self.public_model, "object": "model", "owned_by": "llmpipe"}]})

    async def _health(self, _request: web.Request) -> web.Response:
        body = {
            "status": "ok",
            "stable": self.stable.version,
            "canary": self.canary.version if self.canary else None,
            "canary_weight": self.weight,
        }
        if self.health_provider is not None:
            body.update(self.health_provider())
        return web.json_response(body, status=200 if body["status"] == "ok" else 503)

    async def _metrics(self, _request: web.Request) -> web.Response:
        resp = web.Response(body=self.metrics.render())
        resp.headers["Content-Type"] = self.metrics.content_type
        return resp

    async def _state(self, _request: web.Request) -> web.Response:
        if self.state_provider is None:
            return web.json_response({"error": {"message": "no controller attached"}}, status=404)
        return web.json_response(self.state_provider())

    async def _completion(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            return web.Response(status=401, body=_error_body("invalid API key", "auth_error"),
                                content_type="application/json")
        raw = await request.read()
        try:
            payload = json.loads(raw)
            if not isinstance(payload, dict):
                raise ValueError("body must be a JSON object")
        except ValueError as exc:
            return web.Response(status=400, body=_error_body(f"invalid JSON body: {exc}", "invalid_request_error"),
                                content_type="application/json")
        path = request.path
        role = self.pick()
        self.counts["requests"] += 1
        if role == "canary":
            self.counts["canary"] += 1
        if payload.get("stream"):
            return await self._stream(request, path, payload, role)
        backend = self.canary if role == "canary" and self.canary else self.stable
        result = await self._call(backend, path, payload, role)
        # Scoring (JSON parse, schema check, metrics, controller) runs right after the reply is
        # written, off the client's latency path.
        record = functools.partial(asyncio.get_running_loop().call_soon, self._record)
        if role == "canary":
            if result[4] is None:
                record("canary", backend, result, path)
            else:
                self.metrics.retries.labels(backend.version).inc()
                self.counts["retries"] += 1
                canary_result = result
                result = await self._call(self.stable, path, payload, "stable")
                # A 4xx that stable answers the same way is the client's error, not the canary's.
                client_error = 400 <= canary_result[0] < 500 and canary_result[0] == result[0]
                if not client_error:
                    record("canary", backend, canary_result, path)
                backend, role = self.stable, "stable"
                record(role, backend, result, path)
        else:
            record(role, backend, result, path)
        status, body, ctype, elapsed, err = result
        if status == 0:
            self.metrics.client_failures.inc()
            self.counts["client_failures"] += 1
            return web.Response(status=502, body=_error_body(f"upstream {backend.version} failed: {err}"),
                                content_type="application/json",
                                headers={"x-llmpipe-version": backend.version})
        return web.Response(status=status, body=body, headers={
            "Content-Type": ctype or "application/json",
            "x-llmpipe-version": backend.version,
            "x-llmpipe-role": role,
            "x-llmpipe-upstream-ms": f"{elapsed * 1000.0:.3f}",
        })

    def _headers(self, backend: Backend) -> dict[str, str]:
        h = {"Content-Type": "application/json"}
        if backend.api_key:
            h["Authorization"] = f"Bearer {backend.api_key}"
        return h

    def _body_for(self, backend: Backend, payload: dict[str, Any]) -> bytes:
        if backend.model:
            payload = {**payload, "model": backend.model}
        return json.dumps(payload).encode()

    async def _call(self, backend: Backend, path: str, payload: dict[str, Any], role: str
                    ) -> tuple[int, bytes, str | None, float, str | None]:
        """POST to ``backend``; returns (status, body, content type, seconds, error or None).

        status 0 means no HTTP answer at all (connection refused, timeout, reset).
        """
        assert self._session is not None, "router not started"
        timeout = self.canary_timeout if role == "canary" else self.timeout
        t0 = time.perf_counter()
        self._enter(backend)
        try:
            async with self._session.post(backend.url + path, data=self._body_for(backend, payload),
                                          headers=self._headers(backend), timeout=timeout) as resp:
                body = await resp.read()
                status, ctype = resp.status, resp.headers.get("Content-Type")
        except asyncio.TimeoutError:
            return 0, b"", None, time.perf_counter() - t0, f"timeout after {timeout.total:.0f}s"
        except aiohttp.ClientError as exc:
            return 0, b"", None, time.perf_counter() - t0, f"connection: {type(exc).__name__}: {exc}"[:300]
        finally:
            self._leave(backend)
        elapsed = time.perf_counter() - t0
        if status >= 400:
            return status, body, ctype, elapsed, f"http {status}: {body[:200].decode(errors='replace')}"
        return status, body, ctype, elapsed, None

    def _enter(self, backend: Backend) -> None:
        self.inflight[backend.url] = self.inflight.get(backend.url, 0) + 1

    def _leave(self, backend: Backend) -> None:
        left = self.inflight.get(backend.url, 1) - 1
        if left > 0:
            self.inflight[backend.url] = left
        else:
            self.inflight.pop(backend.url, None)

    async def drain(self, url: str, timeout_s: float) -> bool:
        """Wait until no request is in flight to ``url`` (call after it left the backends)."""
        deadline = time.monotonic() + timeout_s
        while self.inflight.get(url, 0) > 0:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    def _record(self, role: str, backend: Backend, result: tuple, path: str) -> None:
        status, body, _ctype, elapsed, err = result
        ok, compliant, reason = err is None, None, err or ""
        if ok:
            try:
                data = json.loads(body)
            except ValueError:
                ok, reason = False, "invalid JSON response body"
            else:
                if self.validator is not None:
                    compliant, why = self.validator.check(reply_text(path, data))
                    if not compliant:
                        reason = "malformed reply: " + why
        self.metrics.observe(backend.version, role, ok, elapsed, compliant)
        if self.observer is not None:
            self.observer(role, backend, Sample(ok=ok, latency_s=elapsed, compliant=compliant, reason=reason))

    async def _stream(self, request: web.Request, path: str, payload: dict[str, Any], role: str
                      ) -> web.StreamResponse:
        """Proxy a streamed (SSE) completion; a canary failing before its first byte is retried
        on stable. Streamed replies are not format-scored (compliance None)."""
        assert self._session is not None
        backend = self.canary if role == "canary" and self.canary else self.stable
        for attempt in ("first", "retry"):
            timeout = self.canary_timeout if backend is self.canary else self.timeout
            t0 = time.perf_counter()
            self._enter(backend)
            try:
                resp = await self._session.post(backend.url + path, data=self._body_for(backend, payload),
                                                headers=self._headers(backend), timeout=timeout)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                resp, err = None, f"connection: {type(exc).__name__}: {exc}"[:300]
            else:
                err = None if resp.status < 400 else f"http {resp.status}"
            if err is None:
                break
            self._leave(backend)
            elapsed = time.perf_counter() - t0
            if resp is not None:
                resp.release()
            self.metrics.observe(backend.version, role, False, elapsed, None)
            if self.observer:
                self.observer(role, backend, Sample(ok=False, latency_s=elapsed, reason=err))
            if backend is self.canary and attempt == "first":
                self.metrics.retries.labels(backend.version).inc()
                self.counts["retries"] += 1
                backend, role = self.stable, "stable"
                continue
            self.metrics.client_failures.inc()
            self.counts["client_failures"] += 1
            return web.Response(status=502, body=_error_body(f"upstream {backend.version} failed: {err}"),
                                content_type="application/json")
        assert resp is not None
        out = web.StreamResponse(status=resp.status, headers={
            "Content-Type": resp.headers.get("Content-Type", "text/event-stream"),
            "x-llmpipe-version": backend.version, "x-llmpipe-role": role})
        ok = True
        try:
            await out.prepare(request)
            async for chunk in resp.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
        except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionResetError):
            ok = False
        finally:
            resp.release()
            self._leave(backend)
        elapsed = time.perf_counter() - t0
        self.metrics.observe(backend.version, role, ok, elapsed, None)
        if self.observer:
            self.observer(role, backend, Sample(ok=ok, latency_s=elapsed, reason="" if ok else "stream broken"))
        return out
