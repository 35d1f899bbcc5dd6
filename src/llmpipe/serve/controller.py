"""Canary controller: feeds router samples into analysis windows, steps the canary weight, and
persists every decision (state file + JSONL decision log).

Phases: ``canary`` (rolling out, at ``steps[step]``), then ``promoted`` (canary became stable)
or ``rolled_back`` (canary weight 0). A controller restarted on the same state file resumes at
the persisted step with a fresh canary window and the persisted stable baseline.
"""

from __future__ import annotations

import collections
import sys
import threading
from typing import Any, Callable

from llmpipe.serve.analysis import Sample, Thresholds, WindowStats, analyze
from llmpipe.serve.router import Backend, Router
from llmpipe.serve.state import StateStore, initial_state

FinalHook = Callable[[str, dict[str, Any]], None]


def validate_steps(steps: list[float]) -> list[float]:
    steps = [float(s) for s in steps]
    if not steps or any(not 0.0 < s <= 1.0 for s in steps) or steps != sorted(steps) or steps[-1] != 1.0:
        raise ValueError(f"deploy.steps must rise within (0, 1] and end at 1.0, got {steps}")
    return steps


def backend_of(release: dict[str, Any]) -> Backend:
    return Backend(version=release["version"], url=release["url"], model=release.get("served_model"),
                   api_key=release.get("api_key"))


def public_release(release: dict[str, Any] | None) -> dict[str, Any] | None:
    """A release without secrets, for the state file and decision log."""
    if release is None:
        return None
    return {k: v for k, v in release.items() if k != "api_key"}


class CanaryController:
    """Drive one canary rollout; thread-safe for a router running in an event loop."""

    def __init__(self, store: StateStore, thresholds: Thresholds, state: dict[str, Any], *,
                 baseline_size: int, on_final: FinalHook | None = None) -> None:
        self.store = store
        self.thr = thresholds
        self.state = state
        self.on_final = on_final
        self.router: Router | None = None
        self._secrets: dict[str, str | None] = {}
        self._lock = threading.Lock()
        self._canary: list[Sample] = []
        self._stable: collections.deque[Sample] = collections.deque(maxlen=baseline_size)
        # The stable baseline is persisted with each decision, so a controller restarted at the
        # 100% step (where stable gets no traffic) still has something to compare against.
        for ok, latency_s, compliant, reason in state.get("baseline") or []:
            self._stable.append(Sample(bool(ok), float(latency_s), compliant, reason))
        self.finished = threading.Event()
        if state["phase"] != "canary":
            self.finished.set()

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def open(cls, store: StateStore, thresholds: Thresholds, *, stable: dict[str, Any],
             canary: dict[str, Any] | None, steps: list[float], baseline_size: int,
             on_final: FinalHook | None = None) -> "CanaryController":
        """Resume the rollout in ``store`` if it is for the same canary; else start a new one.

        ``stable``/``canary`` are release dicts: version, url, served_model, api_key, model
        (path), sha256. The persisted state wins for versions/step/weight; URLs and keys are
        refreshed, since engines get new ports after a restart.
        """
        steps = validate_steps(steps)
        state = store.load()
        same = (state is not None and canary is not None and state.get("phase") == "canary"
                and (state.get("canary") or {}).get("sha256") == canary.get("sha256"))
        if same:
            assert state is not None
            state["restarts"] = state.get("restarts", 0) + 1
            state["stable"] = {**state["stable"], **{k: stable[k] for k in ("url", "served_model") if k in stable}}
            state["canary"] = {**state["canary"], **{k: canary[k] for k in ("url", "served_model") if k in canary}}
            ctl = cls(store, thresholds, state, baseline_size=baseline_size, on_final=on_final)
            ctl._secrets = {"stable": stable.get("api_key"), "canary": canary.get("api_key")}
            ctl._decide_log("resume", state["canary_weight"], state["canary_weight"], [
                f"controller restart #{state['restarts']}: resuming step {state['step'] + 1}/{len(state['steps'])} "
                f"at canary weight {state['canary_weight']} with a fresh analysis window"], None)
            return ctl
        state = initial_state(public_release(stable), public_release(canary), steps)
        ctl = cls(store, thresholds, state, baseline_size=baseline_size, on_final=on_final)
        ctl._secrets = {"stable": stable.get("api_key"), "canary": (canary or {}).get("api_key")}
        if canary is None:
            ctl._decide_log("serve_stable", 0.0, 0.0, ["no canary: serving stable only"], None)
        else:
            ctl._decide_log("start", 0.0, state["canary_weight"], [
                f"canary {canary['version']} vs stable {stable['version']}: steps {steps}, "
                f"min {thresholds.min_requests} canary requests per step"], None)
        return ctl

    def release_backend(self, role: str) -> Backend | None:
        rel = self.state.get(role)
        if rel is None:
            return None
        return backend_of({**rel, "api_key": self._secrets.get(role)})

    def attach(self, router: Router) -> None:
        """Point ``router`` at the state's backends and weight, and feed it into this controller."""
        self.router = router
        stable = self.release_backend("stable")
        assert stable is not None
        canary = self.release_backend("canary") if self.state["phase"] == "canary" else None
        router.set_backends(stable, canary, self.state["canary_weight"] if canary else 0.0)
        router.observer = self.observe
        router.state_provider = self.snapshot

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            public = {k: v for k, v in self.state.items() if k != "baseline"}
            return {**public, "window": {"canary": len(self._canary), "stable": len(self._stable)}}

    # -- analysis --------------------------------------------------------------------------
    def observe(self, role: str, backend: Backend, sample: Sample) -> None:
        with self._lock:
            if self.state["phase"] != "canary":
                return
            canary = self.state.get("canary") or {}
            if role == "canary" and backend.version == canary.get("version"):
                self._canary.append(sample)
                self._evaluate()
            elif role == "stable":
                self._stable.append(sample)

    def _evaluate(self) -> None:
        verdict = analyze(WindowStats.of(self._canary), WindowStats.of(self._stable), self.thr)
        if verdict.action == "wait":
            return
        steps, step = self.state["steps"], self.state["step"]
        numbers = {"canary": verdict.canary, "stable": verdict.stable}
        old = self.state["canary_weight"]
        if verdict.action == "fail":
            self.state.update(phase="rolled_back", canary_weight=0.0)
            self._decide_log("rollback", old, 0.0, verdict.reasons, numbers)
            self._apply()
            self._final("rollback")
        elif step + 1 < len(steps):
            self.state.update(step=step + 1, canary_weight=steps[step + 1])
            self._canary = []
            self._decide_log("roll_forward", old, steps[step + 1], verdict.reasons, numbers)
            self._apply()
        else:
            previous = self.state["stable"]
            self.state.update(phase="promoted", canary_weight=0.0, stable=self.state["canary"],
                              canary=None, previous_stable=previous)
            self._secrets = {"stable": self._secrets.get("canary"), "canary": None}
            self._decide_log("promote", old, 0.0, verdict.reasons
                             + ["canary passed every step: it is now the stable version"], numbers)
            self._apply()
            self._final("promote")

    def abort(self, reason: str) -> None:
        """End an undecided rollout conservatively: canary weight 0 (e.g. traffic budget spent)."""
        with self._lock:
            if self.state["phase"] != "canary":
                return
            old = self.state["canary_weight"]
            numbers = {"canary": WindowStats.of(self._canary).as_dict(),
                       "stable": WindowStats.of(self._stable).as_dict()}
            self.state.update(phase="rolled_back", canary_weight=0.0)
            self._decide_log("rollback", old, 0.0, [f"inconclusive: {reason}"], numbers)
            self._apply()
            self._final("rollback")

    # -- effects ---------------------------------------------------------------------------
    def _decide_log(self, event: str, old: float, new: float, reasons: list[str], numbers: dict | None) -> None:
        self.state["decisions"] = self.state.get("decisions", 0) + 1
        entry = self.store.log({
            "event": event,
            "step": self.state["step"],
            "from_weight": old,
            "to_weight": new,
            "stable": (self.state.get("stable") or {}).get("version"),
            "canary": (self.state.get("canary") or (self.state.get("stable") if event == "promote" else {}) or {}).get("version"),
            "reasons": reasons,
            "numbers": numbers,
        })
        self.state["last_decision"] = {k: entry[k] for k in ("ts", "event", "to_weight")}
        self.state["baseline"] = [[s.ok, round(s.latency_s, 6), s.compliant, s.reason[:80]] for s in self._stable]
        self.store.save(self.state)
        print(f"[deploy] {event}: weight {old} -> {new}; " + "; ".join(reasons[:3]), file=sys.stderr)

    def _apply(self) -> None:
        if self.router is None:
            return
        stable = self.release_backend("stable")
        assert stable is not None
        canary = self.release_backend("canary") if self.state["phase"] == "canary" else None
        self.router.set_backends(stable, canary, self.state["canary_weight"] if canary else 0.0)

    def _final(self, action: str) -> None:
        self.finished.set()
        if self.on_final is not None:
            self.on_final(action, dict(self.state))
