"""The serving stack as a long-running service: router + stable engine + control API.

``llmpipe serve-stack up`` runs one ``ServingStack``:

- the public router (OpenAI-compatible, ``serve.host:serve.router_port``) with ``/health`` (engine
  checks; 503 when the stable engine is down) and ``/metrics`` (Prometheus: router and stack);
- engines: llama.cpp servers it starts itself for GGUF releases (bound to loopback, own keys,
  restarted when they die), or remote OpenAI-compatible engines given by URL (e.g. vLLM on GPU
  hosts), health-checked every ``serve.stack.health_interval_s``;
- the control API (``serve.stack.control_host:control_port``, loopback by default) that deploys
  use, with its own bearer key (``$serve.stack.control_key_env``, required):

  | endpoint | body | does |
  |---|---|---|
  | GET /control/state | | releases, rollout, lock, router counts |
  | GET /control/window | | the current step's canary samples + the stable baseline |
  | POST /control/lock | owner, ttl_s | take the deploy lock (409 while another deploy holds it) |
  | POST /control/lock/renew, /lock/release | token | heartbeat / give it back |
  | POST /control/canary | token, version, sha256, steps, baseline_size, model_path or url | start or attach the canary (weight 0) |
  | POST /control/weight | token, step, weight | set the canary's share; starts a fresh window |
  | POST /control/hold | token, reason | weight 0, rollout kept for the next deploy |
  | POST /control/promote, /control/rollback | token (reason) | canary becomes stable / is removed |

  Mutations need the lock's token (410 when the caller lost it).

Everything a restart needs is in ``<state_dir>/state.json`` (``llmpipe.stack.state``); GGUF
releases are copied into ``<state_dir>/releases/`` so the stack never depends on a workspace.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import hmac
import json
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from aiohttp import web
from prometheus_client import Counter, Gauge

from llmpipe.config.serve import ServeSection
from llmpipe.io import sha256_file, write_json
from llmpipe.serve.analysis import Sample
from llmpipe.serve.compliance import ReplyValidator
from llmpipe.serve.engines import EngineError, EngineProcess, LlamaCppSpec, free_port
from llmpipe.serve.metrics import RouterMetrics
from llmpipe.serve.router import Backend, Router
from llmpipe.stack.state import StackState, append_event

Handler = Callable[[web.Request], Awaitable[web.Response]]
UNHEALTHY_AFTER = 3   # consecutive failed health checks before an engine counts as down


class StackError(RuntimeError):
    """The stack cannot start (no key, no stable release, engine failure)."""


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _log(msg: str) -> None:
    print(f"[serve-stack] {time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message}}, status=status)


@dataclass
class Engine:
    """One engine serving one release: a process this stack started, or a remote URL."""

    role: str
    release: dict[str, Any]
    url: str
    api_key: str | None
    proc: EngineProcess | None = None
    healthy: bool = True
    restarts: int = 0
    failed_checks: int = 0      # consecutive; a busy single-threaded engine may miss one check
    retired: bool = False       # left the router (promote/rollback): never restarted again

    @property
    def version(self) -> str:
        return self.release["version"]

    def backend(self) -> Backend:
        return Backend(self.version, self.url, self.release.get("served_model") or self.version, self.api_key)


class ServingStack:
    def __init__(self, serve: ServeSection, validator: ReplyValidator, control_key: str, *,
                 state_dir: str | Path, router_port: int | None = None, control_port: int | None = None,
                 router_api_key: str | None = None) -> None:
        if not control_key:
            raise StackError(f"${serve.stack.control_key_env} is empty: the control API needs its own key")
        self.serve = serve
        self.validator = validator
        self.control_key = control_key
        self.dir = Path(state_dir)
        self.state = StackState(self.dir / "state.json")
        self.events_path = self.dir / "events.jsonl"
        self.router_port = serve.router_port if router_port is None else router_port
        self.control_port = serve.stack.control_port if control_port is None else control_port
        self.router_api_key = router_api_key
        self.engines: dict[str, Engine] = {}
        self.router: Router | None = None
        self.canary_window: list[Sample] = []
        self.baseline: collections.deque[Sample] = collections.deque(maxlen=200)
        self.mutex = asyncio.Lock()
        self.stopping = asyncio.Event()
        self.metrics = RouterMetrics()
        reg = self.metrics.registry
        self.g_up = Gauge("llmpipe_stack_engine_up", "1 when the engine answers its health check",
                          ["role", "version"], registry=reg)
        self.c_restarts = Counter("llmpipe_stack_engine_restarts_total", "Engines restarted after they died",
                                  ["role"], registry=reg)
        self.g_lock = Gauge("llmpipe_stack_deploy_lock_held", "1 while a deploy holds the lock", registry=reg)
        self.g_step = Gauge("llmpipe_stack_rollout_step", "Current rollout step (-1: none)", registry=reg)
        self._runners: list[web.AppRunner] = []

    # -- events and persistence ------------------------------------------------------------
    def event(self, kind: str, **fields: Any) -> None:
        entry = append_event(self.events_path, {"event": kind, **fields})
        _log(f"{kind}: " + json.dumps({k: v for k, v in entry.items() if k not in ("ts", "event")},
                                      sort_keys=True)[:400])

    def save(self) -> None:
        rollout = self.state.data.get("rollout")
        if rollout is not None:
            rollout["baseline"] = [[s.ok, round(s.latency_s, 6), s.compliant, s.reason[:80]] for s in self.baseline]
        self.state.save()
        self.g_lock.set(1 if self.state.lock_holder(time.time()) else 0)
        self.g_step.set(rollout["step"] if rollout else -1)

    # -- engines ---------------------------------------------------------------------------
    def adopt_model(self, version: str, sha256: str | None, source: str) -> dict[str, Any]:
        """Copy a GGUF into releases/ (checked against ``sha256`` when given): the stack's own copy."""
        src = Path(source)
        if not src.is_file():
            raise StackError(f"{src}: model file not found")
        releases = self.dir / "releases"
        releases.mkdir(parents=True, exist_ok=True)
        digest = sha256_file(src)
        if sha256 and digest != sha256:
            raise StackError(f"{src}: sha256 {digest[:12]} differs from the release's {sha256[:12]}")
        dest = releases / f"{_safe(version)}-{digest[:12]}.gguf"
        if not dest.is_file():
            tmp = dest.with_name("." + dest.name + ".tmp")
            shutil.copyfile(src, tmp)
            os.replace(tmp, dest)
        return {"version": version, "sha256": digest, "model": str(dest.relative_to(self.dir))}

    def _start_engine(self, role: str, release: dict[str, Any]) -> Engine:
        """Blocking (run in a thread): start a managed engine or check a remote one."""
        if release.get("model"):
            if self.serve.engine != "llamacpp":
                raise StackError(f"serve.engine={self.serve.engine}: the stack starts llama.cpp engines only; "
                                 "start vLLM with `llmpipe serve --engine vllm` and give its URL")
            key = os.urandom(16).hex()
            spec = LlamaCppSpec(model=str(self.dir / release["model"]), host="127.0.0.1", port=free_port(),
                                api_key=key, served_model=release["version"], n_ctx=self.serve.n_ctx,
                                n_threads=self.serve.n_threads)
            proc = EngineProcess(spec, self.dir / "logs" / f"{role}-{_safe(release['version'])}.log",
                                 name=f"{role} engine {release['version']}")
            proc.start().wait_healthy(self.serve.startup_timeout_s)
            return Engine(role, release, proc.url, key, proc)
        key = os.environ.get(release["api_key_env"]) if release.get("api_key_env") else None
        engine = Engine(role, release, release["url"].rstrip("/"), key)
        deadline = time.monotonic() + self.serve.startup_timeout_s
        while True:     # a remote engine (its own service) may still be starting
            try:
                served = self._models(engine)
                break
            except StackError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(1.0)
        want = release.get("served_model") or release["version"]
        if want not in served:
            raise StackError(f"{engine.url} serves {served}, not '{want}' (the served model name must be the version)")
        return engine

    def _models(self, engine: Engine) -> list[str]:
        headers = {"Authorization": f"Bearer {engine.api_key}"} if engine.api_key else {}
        try:
            r = httpx.get(engine.url + "/v1/models", headers=headers, timeout=5.0)
            r.raise_for_status()
            return [m.get("id") for m in r.json().get("data", [])]
        except (httpx.HTTPError, ValueError) as exc:
            raise StackError(f"{engine.url}/v1/models: {type(exc).__name__}: {exc}") from exc

    async def start_engine(self, role: str, release: dict[str, Any]) -> Engine:
        loop = asyncio.get_running_loop()
        try:
            engine = await loop.run_in_executor(None, self._start_engine, role, release)
        except EngineError as exc:
            raise StackError(str(exc)) from exc
        self.engines[role] = engine
        self.g_up.labels(role, engine.version).set(1)
        self.event("engine_up", role=role, version=engine.version, url=engine.url,
                   managed=engine.proc is not None)
        return engine

    async def retire(self, engine: Engine) -> None:
        """Stop an engine that left the router, once its in-flight requests are done."""
        assert self.router is not None
        engine.retired = True
        drained = await self.router.drain(engine.url, self.serve.stack.drain_timeout_s)
        if engine.proc is not None:
            await asyncio.get_running_loop().run_in_executor(None, engine.proc.stop)
        self._unlabel(engine.role, engine.version)
        self.event("engine_stopped", role=engine.role, version=engine.version, drained=drained)

    def _unlabel(self, role: str, version: str) -> None:
        try:
            self.g_up.remove(role, version)
        except KeyError:
            pass

    def _delete_release(self, release: dict[str, Any] | None) -> None:
        if release and release.get("model"):
            path = self.dir / release["model"]
            if path.parent == self.dir / "releases":
                path.unlink(missing_ok=True)

    # -- routing ---------------------------------------------------------------------------
    def apply_routing(self) -> None:
        """Point the router at the engines with the state's weight (0 unless the rollout runs)."""
        assert self.router is not None
        rollout = self.state.data.get("rollout")
        canary = self.engines.get("canary")
        weight = rollout["weight"] if rollout and rollout["status"] == "running" and canary else 0.0
        self.router.set_backends(self.engines["stable"].backend(), canary.backend() if canary else None, weight)

    def observe(self, role: str, backend: Backend, sample: Sample) -> None:
        rollout = self.state.data.get("rollout")
        if role == "stable":
            self.baseline.append(sample)
        elif rollout and rollout["status"] == "running" and backend.version == rollout["version"]:
            self.canary_window.append(sample)

    def new_window(self) -> None:
        self.canary_window = []
        self.state.data["window"] = int(self.state.data.get("window") or 0) + 1

    def health(self) -> dict[str, Any]:
        engines = {role: {"version": e.version, "healthy": e.healthy, "restarts": e.restarts,
                          "managed": e.proc is not None} for role, e in self.engines.items()}
        rollout = self.state.data.get("rollout")
        stable_ok = self.engines.get("stable") is not None and self.engines["stable"].healthy
        return {"status": "ok" if stable_ok else "degraded", "engines": engines,
                "rollout": {k: rollout[k] for k in ("version", "step", "weight", "status")} if rollout else None,
                "deploy_locked": self.state.lock_holder(time.time()) is not None}

    # -- supervision -----------------------------------------------------------------------
    async def supervise(self) -> None:
        """Every health interval: expire a dead deploy's lock (hold its canary), check engines."""
        while not self.stopping.is_set():
            try:
                await asyncio.wait_for(self.stopping.wait(), self.serve.stack.health_interval_s)
            except TimeoutError:
                pass
            if self.stopping.is_set():
                return
            async with self.mutex:
                self.expire_lock()
            for role, engine in list(self.engines.items()):
                await self.check_engine(role, engine)

    def expire_lock(self) -> None:
        lock = self.state.expired_lock(time.time())
        if lock is None:
            return
        rollout = self.state.data.get("rollout")
        if rollout and rollout["status"] == "running":
            rollout.update(status="held", weight=0.0)
            self.new_window()
            self.apply_routing()
        self.save()
        self.event("lock_expired", owner=lock["owner"],
                   held=bool(rollout), reasons=["the deploy stopped renewing its lock; canary held at weight 0"
                                                if rollout else "the deploy stopped renewing its lock"])

    async def check_engine(self, role: str, engine: Engine) -> None:
        loop = asyncio.get_running_loop()
        if engine.retired or self.engines.get(role) is not engine:
            return      # replaced or removed since the supervisor listed it
        if engine.proc is not None and engine.proc.proc is not None and engine.proc.proc.poll() is not None:
            engine.healthy = False
            self.g_up.labels(role, engine.version).set(0)
            self.event("engine_died", role=role, version=engine.version, code=engine.proc.proc.returncode,
                       log_tail=engine.proc.log_tail(5))
            try:
                await loop.run_in_executor(None, engine.proc.start)
                await loop.run_in_executor(None, engine.proc.wait_healthy, self.serve.startup_timeout_s)
            except EngineError as exc:
                self.event("engine_restart_failed", role=role, version=engine.version, error=str(exc)[:300])
                return
            engine.restarts += 1
            self.c_restarts.labels(role).inc()
            if engine.retired:      # retired while it restarted
                await loop.run_in_executor(None, engine.proc.stop)
                return
        try:
            await loop.run_in_executor(None, self._models, engine)
            engine.failed_checks = 0
        except StackError:
            engine.failed_checks += 1
        ok = engine.failed_checks < UNHEALTHY_AFTER
        if engine.retired:
            return
        if ok != engine.healthy:
            self.event("engine_healthy" if ok else "engine_unhealthy", role=role, version=engine.version)
        engine.healthy = ok
        self.g_up.labels(role, engine.version).set(1 if ok else 0)

    # -- control API -----------------------------------------------------------------------
    def control_app(self) -> web.Application:
        app = web.Application()
        routes = [("GET", "/control/state", self.c_state), ("GET", "/control/window", self.c_window),
                  ("POST", "/control/lock", self.c_lock), ("POST", "/control/lock/renew", self.c_renew),
                  ("POST", "/control/lock/release", self.c_release), ("POST", "/control/canary", self.c_canary),
                  ("POST", "/control/weight", self.c_weight), ("POST", "/control/hold", self.c_hold),
                  ("POST", "/control/promote", self.c_promote), ("POST", "/control/rollback", self.c_rollback)]
        for method, path, handler in routes:
            app.router.add_route(method, path, self._guard(handler, needs_lock=method == "POST"
                                                           and path not in ("/control/lock",)))
        return app

    def _guard(self, handler: Callable[[web.Request, dict[str, Any]], Awaitable[web.Response]],
               needs_lock: bool) -> Handler:
        @functools.wraps(handler)
        async def wrapped(request: web.Request) -> web.Response:
            got = request.headers.get("Authorization", "")
            if not hmac.compare_digest(got.encode(), f"Bearer {self.control_key}".encode()):
                return _error(401, "invalid control API key")
            body: dict[str, Any] = {}
            if request.method == "POST":
                try:
                    body = await request.json()
                    assert isinstance(body, dict)
                except (ValueError, AssertionError):
                    return _error(400, "body must be a JSON object")
            async with self.mutex:
                self.expire_lock()
                if needs_lock and not self.state.holds(body.get("token"), time.time()):
                    return _error(410, "this deploy does not hold the deploy lock (expired or taken over)")
                try:
                    response = await handler(request, body)
                except (StackError, KeyError, TypeError, ValueError) as exc:
                    return _error(400, f"{type(exc).__name__}: {exc}")
                # a holder's successful call counts as a heartbeat (a canary start can outlast the TTL)
                if needs_lock and self.state.data.get("lock") and response.status == 200:
                    self.state.touch(body.get("token"), time.time())
                    self.save()
                return response
        return wrapped

    def _snapshot(self) -> dict[str, Any]:
        assert self.router is not None
        return {**self.state.public(time.time()), "weight": self.router.weight, "counts": dict(self.router.counts),
                "health": self.health()}

    async def c_state(self, _r: web.Request, _b: dict[str, Any]) -> web.Response:
        return web.json_response(self._snapshot())

    async def c_window(self, _r: web.Request, _b: dict[str, Any]) -> web.Response:
        rollout = self.state.data.get("rollout") or {}
        pack = lambda s: [s.ok, s.latency_s, s.compliant, s.reason]
        return web.json_response({"window": self.state.data.get("window"), "step": rollout.get("step"),
                                  "status": rollout.get("status"), "version": rollout.get("version"),
                                  "canary": [pack(s) for s in self.canary_window],
                                  "stable": [pack(s) for s in self.baseline]})

    async def c_lock(self, _r: web.Request, body: dict[str, Any]) -> web.Response:
        token, why = self.state.acquire(str(body["owner"])[:200], float(body["ttl_s"]), time.time())
        if token is None:
            self.event("lock_refused", owner=str(body.get("owner"))[:200], reasons=[why])
            return _error(409, why)
        self.save()
        self.event("lock", owner=body["owner"], ttl_s=body["ttl_s"])
        return web.json_response({"token": token, "state": self._snapshot()})

    async def c_renew(self, _r: web.Request, body: dict[str, Any]) -> web.Response:
        self.state.renew(body["token"], float(body["ttl_s"]), time.time())
        self.save()
        return web.json_response({"ok": True})

    async def c_release(self, _r: web.Request, body: dict[str, Any]) -> web.Response:
        owner = self.state.data["lock"]["owner"]
        self.state.release(body["token"], time.time())
        self.save()
        self.event("unlock", owner=owner)
        return web.json_response({"ok": True})

    async def c_canary(self, _r: web.Request, body: dict[str, Any]) -> web.Response:
        version, sha = str(body["version"]), str(body["sha256"])
        stable = self.state.data["stable"]
        rollout = self.state.data.get("rollout")
        if version == stable["version"]:
            return _error(409, f"{version} is already the stable version")
        if rollout and (rollout["version"] != version or rollout["sha256"] != sha):
            return _error(409, f"another canary ({rollout['version']}) is attached: roll it back first")
        if rollout is None:
            if body.get("model_path"):
                loop = asyncio.get_running_loop()
                release = await loop.run_in_executor(None, self.adopt_model, version, sha, body["model_path"])
            else:
                release = {"version": version, "sha256": sha, "url": str(body["url"]),
                           "served_model": body.get("served_model") or version,
                           "api_key_env": body.get("api_key_env")}
            steps = [float(s) for s in body["steps"]]
            self.state.data["canary"] = release
            self.state.data["rollout"] = {"version": version, "sha256": sha, "steps": steps, "step": 0,
                                          "weight": 0.0, "status": "attached", "started_at": time.time()}
            self.baseline = collections.deque(self.baseline, maxlen=int(body["baseline_size"]))
            self.save()
        if "canary" not in self.engines:   # new, or restarted stack whose canary engine failed to start
            try:
                await self.start_engine("canary", self.state.data["canary"])
            except StackError as exc:
                self._delete_release(self.state.data["canary"])
                self.state.data.update(canary=None, rollout=None)
                self.save()
                self.event("canary_failed", version=version, error=str(exc)[:500])
                return _error(502, f"canary engine for {version} did not start: {exc}")
        self.apply_routing()
        self.event("canary", version=version, step=self.state.data["rollout"]["step"],
                   status=self.state.data["rollout"]["status"])
        return web.json_response(self._snapshot())

    async def c_weight(self, _r: web.Request, body: dict[str, Any]) -> web.Response:
        rollout = self.state.data.get("rollout")
        if rollout is None or "canary" not in self.engines:
            return _error(409, "no canary is attached")
        weight, step = float(body["weight"]), int(body["step"])
        if not 0.0 <= weight <= 1.0 or not 0 <= step < len(rollout["steps"]):
            return _error(400, f"weight {weight} / step {step} out of range")
        rollout.update(step=step, weight=weight, status="running")
        self.new_window()
        self.apply_routing()
        self.save()
        self.event("weight", version=rollout["version"], step=step, weight=weight, window=self.state.data["window"])
        return web.json_response({"window": self.state.data["window"], "weight": weight, "step": step})

    async def c_hold(self, _r: web.Request, body: dict[str, Any]) -> web.Response:
        rollout = self.state.data.get("rollout")
        if rollout is not None:
            rollout.update(status="held", weight=0.0)
            self.new_window()
            self.apply_routing()
            self.save()
        self.event("hold", version=(rollout or {}).get("version"), reasons=[str(body.get("reason", ""))[:300]])
        return web.json_response(self._snapshot())

    async def c_rollback(self, _r: web.Request, body: dict[str, Any]) -> web.Response:
        rollout, canary = self.state.data.get("rollout"), self.state.data.get("canary")
        engine = self.engines.pop("canary", None)
        self.state.data.update(rollout=None, canary=None)
        self.new_window()
        self.apply_routing()
        self.save()
        if engine is not None:
            await self.retire(engine)
        self._delete_release(canary)
        self.event("rollback", version=(rollout or {}).get("version"), step=(rollout or {}).get("step"),
                   reasons=[str(body.get("reason", ""))[:300]])
        return web.json_response(self._snapshot())

    async def c_promote(self, _r: web.Request, body: dict[str, Any]) -> web.Response:
        rollout = self.state.data.get("rollout")
        if rollout is None or "canary" not in self.engines:
            return _error(409, "no canary is attached")
        old_release = self.state.data["stable"]
        old, new = self.engines.pop("stable"), self.engines.pop("canary")
        new.role = "stable"
        self.engines["stable"] = new
        self._unlabel("canary", new.version)
        self.g_up.labels("stable", new.version).set(1)
        self.state.data.update(stable=self.state.data["canary"], canary=None, rollout=None,
                               previous_stable=old_release["version"])
        self.baseline.clear()
        self.new_window()
        self.apply_routing()
        self.save()
        await self.retire(old)
        self._delete_release(old_release)
        self.event("promote", version=new.version, previous=old.version)
        return web.json_response(self._snapshot())

    # -- lifecycle -------------------------------------------------------------------------
    async def run(self, seed: dict[str, Any] | None) -> None:
        """Start (or restart from the state file) and serve until SIGTERM/SIGINT."""
        if self.state.load():
            if seed and seed.get("version") != self.state.data["stable"]["version"]:
                _log(f"state.json wins: stable is {self.state.data['stable']['version']} "
                     f"(not the seed {seed.get('version')})")
            self.event("restart", stable=self.state.data["stable"]["version"],
                       rollout=self.state.public(time.time())["rollout"])
        else:
            if seed is None:
                raise StackError(f"{self.state.path}: no state yet; give the first stable release "
                                 "(--stable-model PATH or --stable-url URL, with --stable-version)")
            if seed.get("model"):
                seed = await asyncio.get_running_loop().run_in_executor(
                    None, self.adopt_model, seed["version"], None, seed["model"])
            self.state.data["stable"] = seed
            self.save()
            self.event("init", stable=seed["version"])
        rollout = self.state.data.get("rollout")
        if rollout and rollout.get("baseline"):
            self.baseline.extend(Sample(bool(a), float(b), c, d) for a, b, c, d in rollout["baseline"])
        await self.start_engine("stable", self.state.data["stable"])
        if self.state.data.get("canary"):
            try:
                await self.start_engine("canary", self.state.data["canary"])
            except StackError as exc:   # the next deploy re-attaches (resume) or rolls back
                rollout.update(status="held", weight=0.0)
                self.event("canary_failed", version=rollout["version"], error=str(exc)[:500])
        self.router = Router(self.engines["stable"].backend(), None, validator=self.validator,
                             metrics=self.metrics, observer=self.observe, public_model=self.serve.public_model,
                             api_key=self.router_api_key, timeout_s=self.serve.timeout_s,
                             canary_timeout_s=self.serve.canary_timeout_s)
        self.router.health_provider = self.health
        self.apply_routing()
        self.save()
        router_port = await self.router.start(self.serve.host, self.router_port)
        runner = web.AppRunner(self.control_app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.serve.stack.control_host, self.control_port)
        await site.start()
        self._runners.append(runner)
        control_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        endpoints = {"router": f"http://{self.serve.host}:{router_port}",
                     "control": f"http://{self.serve.stack.control_host}:{control_port}", "pid": os.getpid()}
        write_json(self.dir / "endpoints.json", endpoints)
        self.event("up", **endpoints, weight=self.router.weight)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stopping.set)
        supervisor = asyncio.create_task(self.supervise())
        try:
            await self.stopping.wait()
        finally:
            supervisor.cancel()
            await self.shutdown()

    async def shutdown(self) -> None:
        for runner in self._runners:
            await runner.cleanup()
        if self.router is not None:
            await self.router.stop()
        loop = asyncio.get_running_loop()
        for engine in self.engines.values():
            if engine.proc is not None:
                await loop.run_in_executor(None, engine.proc.stop)
        self.event("down")
