"""A live rollout: the deploy stage against a running serve-stack (``deploy.target: <control URL>``).

The stack (``llmpipe serve-stack up``) runs the router and the stable engine for real users. This
module is its client; it sends no traffic of its own:

1. refuse inside ``dvc exp run`` and from a workspace with uncommitted changes;
2. take the stack's deploy lock (a second deploy is refused while it is held; a heartbeat keeps it);
3. attach the registry's ``canary`` version (the stack starts an engine for its GGUF, or uses the
   running engine at ``deploy.live.canary_url``); a rollout of the same version left by a killed
   deploy is resumed at its step, another version's is rolled back first;
4. for each step: set the canary weight through the control API, then judge the window of live
   requests the router measured (``analyze``, the same rules as the rehearsal);
5. promote (the canary engine becomes stable; registry ``prod``) or roll back (weight 0, engine
   stopped; registry ``canary`` unassigned).

An interrupted deploy (SIGTERM, Ctrl-C, error) puts the canary on hold (weight 0) and releases the
lock; a killed one stops heartbeating, and the stack holds the canary itself when the lock expires.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from llmpipe.config.serve import DeploySection, RegistrySection, ServeSection
from llmpipe.io import sha256_file
from llmpipe.serve.analysis import Sample, WindowStats, analyze
from llmpipe.serve.rollout import (
    DeployError,
    DeployResult,
    apply_to_registry,
    md5_file,
    window_summary,
)
from llmpipe.serve.state import StateStore

EXP_ENV = ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV")   # set by `dvc exp run` for every stage command


class DeployRefused(DeployError):
    """The live target refused this deploy (lock held, unsafe workspace, unknown version)."""


class LockLost(DeployError):
    """The deploy lock expired or was taken over while this deploy was running."""


# -- safety rails ----------------------------------------------------------------------------
def check_live_allowed(root: Path, own_outputs: tuple[str, ...] = ("metrics/deploy.json",)) -> None:
    """Refuse a live target inside ``dvc exp run`` or with uncommitted changes to tracked files."""
    exp = [name for name in EXP_ENV if os.environ.get(name)]
    if exp:
        raise DeployRefused(f"refusing a live deploy inside `dvc exp run` ({exp[0]} is set): experiments never "
                            "touch production; use deploy.target: local to rehearse")
    proc = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise DeployRefused(f"{root}: not a git repository ({proc.stderr.strip()}); a live deploy needs a "
                            "committed workspace")
    dirty = [line[3:] for line in proc.stdout.splitlines() if line.strip() and line[3:] not in own_outputs]
    if dirty:
        raise DeployRefused("refusing a live deploy from a workspace with uncommitted changes to "
                            f"{', '.join(dirty[:8])}{' ...' if len(dirty) > 8 else ''}; commit them first")


def live_canary(root: Path, deploy: DeploySection, registry: RegistrySection, version: str) -> dict[str, Any]:
    """What the stack should run as the canary for registry version ``version``."""
    from llmpipe.registry.gto_cli import GtoError, Registry

    try:
        info = Registry(root).lineage(registry.artifact, version).get("model") or {}
    except GtoError as exc:
        raise DeployRefused(f"{registry.artifact}@{version}: no lineage ({exc})") from exc
    live = deploy.live
    if live.canary_url:
        # a running engine (e.g. on a GPU host) serving this version under its version name
        return {"version": version, "sha256": info.get("sha256") or f"url:{live.canary_url}",
                "url": live.canary_url, "served_model": version, "api_key_env": live.canary_key_env or None}
    model = root / deploy.model
    if not model.is_file():
        raise DeployRefused(f"{model}: missing; the canary's GGUF must be in the workspace (dvc pull)")
    md5, sha = md5_file(model), sha256_file(model)
    if info.get("sha256") != sha and (info.get("dvc_lock") or {}).get("md5") != md5:
        raise DeployRefused(f"{deploy.model} is not the model of {registry.artifact}@{version} (the registry's "
                            f"'{registry.stage}' version); check out its commit and `dvc pull` first")
    return {"version": version, "sha256": sha, "model_path": str(model.resolve())}


# -- the control API client ------------------------------------------------------------------
class ControlClient:
    """JSON over HTTP to the stack's control API, with its own bearer key."""

    def __init__(self, url: str, key: str, timeout_s: float = 600.0) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.Client(timeout=timeout_s, headers={"Authorization": f"Bearer {key}"})

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            r = self._http.request(method, self.url + path, json=body)
        except httpx.HTTPError as exc:
            raise DeployError(f"control API {self.url}{path}: {type(exc).__name__}: {exc}") from exc
        try:
            data = r.json()
        except ValueError:
            data = {"error": {"message": r.text[:300]}}
        if r.status_code == 409:
            raise DeployRefused(f"{self.url}: {data.get('error', {}).get('message', r.text[:300])}")
        if r.status_code == 410:
            raise LockLost(f"{self.url}: {data.get('error', {}).get('message', r.text[:300])}")
        if r.status_code != 200:
            raise DeployError(f"control API {path}: HTTP {r.status_code}: {data.get('error', {}).get('message', data)}")
        return data

    def state(self) -> dict[str, Any]:
        return self._call("GET", "/control/state")

    def window(self) -> dict[str, Any]:
        return self._call("GET", "/control/window")

    def post(self, action: str, **body: Any) -> dict[str, Any]:
        return self._call("POST", f"/control/{action}", body)

    def close(self) -> None:
        self._http.close()


class Heartbeat(threading.Thread):
    """Renews the deploy lock every ``ttl/3`` seconds; ``lost`` is set when it cannot."""

    def __init__(self, client: ControlClient, token: str, ttl_s: float) -> None:
        super().__init__(daemon=True, name="deploy-lock-heartbeat")
        self.client, self.token, self.ttl_s = client, token, ttl_s
        self.lost = threading.Event()
        self._stop = threading.Event()

    def run(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.client.post("lock/renew", token=self.token, ttl_s=self.ttl_s)
            except LockLost:
                self.lost.set()
                return
            except DeployError as exc:   # transient (e.g. the stack restarting): retry until the TTL
                print(f"[deploy] lock renewal failed, retrying: {exc}", file=sys.stderr)

    def stop(self) -> None:
        self._stop.set()


# -- the rollout -----------------------------------------------------------------------------
class LiveRollout:
    """Drive one canary through the steps on the stack, judging the router's measured windows."""

    def __init__(self, client: ControlClient, token: str, beat: Heartbeat, store: StateStore,
                 deploy: DeploySection, target: str) -> None:
        self.client, self.token, self.beat, self.store = client, token, beat, store
        self.deploy, self.target = deploy, target
        self.last: dict[str, Any] = {}
        self.windows: list[dict[str, Any]] = []

    def log(self, event: str, **fields: Any) -> None:
        entry = self.store.log({"event": event, "target": self.target, **fields})
        reasons = "; ".join(entry.get("reasons", [])[:3])
        print(f"[deploy] {event}: {reasons}", file=sys.stderr)
        if event in ("roll_forward", "promote", "rollback"):
            self.last = entry

    def judge(self, step: int, deadline: float) -> tuple[str, list[str], dict[str, Any]]:
        """Poll the router's window for ``step`` until the analysis passes or fails (or time runs out)."""
        thr = self.deploy.thresholds
        while True:
            if self.beat.lost.is_set():
                raise LockLost("the deploy lock was lost (heartbeat failed past its TTL)")
            win = self.client.window()
            if win.get("step") != step or win.get("status") != "running":
                raise DeployError(f"the stack's rollout changed under this deploy: {win.get('status')} at "
                                  f"step {win.get('step')} (expected step {step})")
            canary = WindowStats.of(Sample(*s) for s in win["canary"])
            stable = WindowStats.of(Sample(*s) for s in win["stable"])
            verdict = analyze(canary, stable, thr)
            numbers = {"canary": verdict.canary, "stable": verdict.stable}
            if verdict.action != "wait":
                self.windows.append({"step": step, "action": verdict.action, **numbers})
                return verdict.action, verdict.reasons, numbers
            if time.monotonic() >= deadline:
                why = (f"inconclusive: deploy.live.max_seconds ({self.deploy.live.max_seconds:.0f}s) "
                       f"passed; {verdict.reasons[0]}")
                return "inconclusive", [why], numbers
            time.sleep(self.deploy.live.poll_s)

    def run(self, canary: dict[str, Any]) -> dict[str, Any]:
        """Roll ``canary`` out; returns the outcome (decision, steps passed, resumed, stable before)."""
        deploy, version = self.deploy, canary["version"]
        state = self.client.state()
        stable_before = state["stable"]["version"]
        if stable_before == version:
            self.log("noop", stable=stable_before, canary=version,
                     reasons=[f"{version} is already the stable version of {self.target}"])
            return {"decision": "noop", "stable_before": stable_before, "steps_passed": 0, "resumed": False}
        current = state.get("rollout")
        resumed = bool(current and current["version"] == version and current["sha256"] == canary["sha256"])
        if current and not resumed:
            self.client.post("rollback", token=self.token, reason=f"superseded by {version}")
            self.log("rollback", stable=stable_before, canary=current["version"], step=current["step"],
                     reasons=[f"an unfinished rollout of {current['version']} was superseded by {version}"])
        state = self.client.post("canary", token=self.token, steps=deploy.steps,
                                 baseline_size=deploy.baseline_size, **canary)
        first = state["rollout"]["step"] if resumed else 0
        self.log("resume" if resumed else "start", stable=stable_before, canary=version, step=first, reasons=[
            (f"resuming {version} at step {first + 1}/{len(deploy.steps)} (it was {current['status']}); "
             if resumed and current else f"canary {version} vs stable {stable_before}: steps {deploy.steps}; ")
            + f"min {deploy.thresholds.min_requests} live canary requests per step"])
        deadline = time.monotonic() + deploy.live.max_seconds
        try:
            for step in range(first, len(deploy.steps)):
                weight = deploy.steps[step]
                self.client.post("weight", token=self.token, step=step, weight=weight)
                action, reasons, numbers = self.judge(step, deadline)
                if action != "pass":
                    self.client.post("rollback", token=self.token, reason=reasons[0])
                    self.log("rollback", step=step, from_weight=weight, to_weight=0.0, stable=stable_before,
                             canary=version, reasons=reasons, numbers=numbers)
                    return {"decision": "rolled_back", "stable_before": stable_before, "steps_passed": step,
                            "resumed": resumed}
                if step + 1 < len(deploy.steps):
                    self.log("roll_forward", step=step, from_weight=weight, to_weight=deploy.steps[step + 1],
                             stable=stable_before, canary=version, reasons=reasons, numbers=numbers)
            self.client.post("promote", token=self.token)
        except BaseException as exc:
            # interrupted (SIGTERM, Ctrl-C, lost lock, control API error): keep users off the canary
            self.hold(f"deploy interrupted: {type(exc).__name__}: {exc}"[:300])
            raise
        self.log("promote", step=len(deploy.steps) - 1, from_weight=1.0, to_weight=0.0, stable=version,
                 canary=version, reasons=reasons + ["canary passed every step on live traffic: it is now stable"],
                 numbers=numbers)
        return {"decision": "promoted", "stable_before": stable_before, "steps_passed": len(deploy.steps),
                "resumed": resumed}

    def hold(self, reason: str) -> None:
        try:
            self.client.post("hold", token=self.token, reason=reason)
        except DeployError as exc:
            print(f"[deploy] could not put the canary on hold ({exc}); the stack holds it when the lock "
                  "expires", file=sys.stderr)
            return
        self.log("hold", to_weight=0.0, reasons=[reason, "the next deploy resumes this step or rolls it back"])


def registry_canary(root: Path, registry: RegistrySection) -> str | None:
    from llmpipe.registry.gto_cli import GtoError, Registry

    try:
        return Registry(root).stage_version(registry.artifact, registry.stage)
    except GtoError as exc:
        raise DeployRefused(f"registry not readable: {exc}") from exc


def update_live_registry(root: Path, registry: RegistrySection, deploy: DeploySection, store: StateStore,
                         target: str, version: str, decision: str) -> dict[str, Any]:
    """promoted/noop: assign prod; rolled back: unassign the canary stage. Failures are returned."""
    if not deploy.update_registry:
        return {"skipped": "deploy.update_registry is false"}
    action = "rollback" if decision == "rolled_back" else "promote"
    release = {"version": version, "registered": True}
    try:
        result = apply_to_registry(root, registry, {"stable": release, "canary": release}, action)
    except Exception as exc:  # recorded; the stage fails after writing its metrics
        result = {"error": str(exc)}
    store.log({"event": "registry", "action": action, "result": result, "target": target})
    return result


def run_live(target: str, deploy: DeploySection, serve: ServeSection, registry: RegistrySection, *,
             root: Path, store: StateStore) -> DeployResult:
    """The live rollout of the registry's canary version on the stack at ``target``."""
    check_live_allowed(root)
    key = os.environ.get(serve.stack.control_key_env)
    if not key:
        raise DeployError(f"${serve.stack.control_key_env} is not set: the control API key is required")
    t_start = time.monotonic()
    version = registry_canary(root, registry)
    metrics: dict[str, Any] = {"target": "live", "canary_version": version, "client_failures": 0}
    if version is None:
        reason = f"no version is assigned to registry stage '{registry.stage}' (llmpipe promote); nothing to roll out"
        store.log({"event": "skip", "target": target, "reasons": [reason]})
        return DeployResult({**metrics, "decision": "nothing_to_deploy", "reason": reason})
    canary = live_canary(root, deploy, registry, version)
    client = ControlClient(target, key)
    owner = f"{socket.gethostname()}:{os.getpid()} deploy of {registry.artifact}@{version}"
    token = client.post("lock", owner=owner, ttl_s=deploy.live.lock_ttl_s)["token"]
    beat = Heartbeat(client, token, deploy.live.lock_ttl_s)
    beat.start()
    rollout = LiveRollout(client, token, beat, store, deploy, target)
    try:
        failures_before = client.state()["counts"]["client_failures"]
        outcome = rollout.run(canary)
        failures_after = client.state()["counts"]["client_failures"]
        # still under the lock, so two deploys never race on the registry's stages
        registry_result = update_live_registry(root, registry, deploy, store, target, version, outcome["decision"])
    finally:
        beat.stop()
        try:
            client.post("lock/release", token=token)
        except DeployError as exc:
            print(f"[deploy] lock release failed ({exc}); it expires after {deploy.live.lock_ttl_s:.0f}s",
                  file=sys.stderr)
        client.close()

    decision = outcome["decision"]
    metrics.update(decision=decision, stable_version=outcome["stable_before"], steps=deploy.steps,
                   steps_passed=outcome["steps_passed"], resumed=outcome["resumed"],
                   # router-made errors during the rollout (the count restarts with the stack)
                   client_failures=failures_after - failures_before if failures_after >= failures_before
                   else failures_after,
                   final_window=window_summary(rollout.last.get("numbers")), registry=registry_result)
    timings = {"duration_s": round(time.monotonic() - t_start, 1), "windows": rollout.windows,
               "final_reasons": rollout.last.get("reasons")}
    error = f"the decision was made but the registry update failed: {registry_result['error']}" \
        if "error" in registry_result else None
    return DeployResult(metrics, timings, error=error)
