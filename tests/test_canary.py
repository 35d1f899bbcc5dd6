"""Canary analysis, controller decisions, state persistence and restart.

The first part drives the real controller + state store with samples directly (no servers).
The second part (marked slow) runs real llama.cpp engines behind the real router on loopback.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmpipe.serve.analysis import Sample, Thresholds, WindowStats, analyze, percentile
from llmpipe.serve.controller import CanaryController
from llmpipe.serve.router import Backend
from llmpipe.serve.state import StateError, StateStore

# shared with tests/test_vllm.py
from canary_support import PROMPTS, SYSTEM, commit_pipeline_run, deploy_checkout, git, repo_params, rollout, \
    run_deploy_stage
from canary_support import REAL_THR as REAL_THR_VALUES

THR = Thresholds(min_requests=4, min_stable_requests=4, max_error_rate=0.05, max_error_rate_increase=0.02,
                 max_p50_ratio=1.5, max_p95_ratio=2.0, latency_slack_ms=50.0, max_compliance_drop=0.1,
                 min_compliance=0.0)
ROOT = Path(__file__).resolve().parents[1]
STABLE = {"version": "v1.0.0", "url": "http://127.0.0.1:1", "sha256": "aaa", "model": "a.gguf", "api_key": "k1"}
CANARY = {"version": "v1.1.0", "url": "http://127.0.0.1:2", "sha256": "bbb", "model": "b.gguf", "api_key": "k2"}


def good(ms: float = 100.0) -> Sample:
    return Sample(ok=True, latency_s=ms / 1000.0, compliant=True)


def feed(ctl: CanaryController, role: str, samples: list[Sample]) -> None:
    rel = CANARY if role == "canary" else STABLE
    b = Backend(rel["version"], rel["url"])
    for s in samples:
        ctl.observe(role, b, s)


def test_percentile_and_window_stats() -> None:
    assert percentile([], 50) is None
    assert percentile([5.0, 1.0, 3.0, 2.0, 4.0], 50) == 3.0
    assert percentile([float(i) for i in range(1, 101)], 95) == 95.0
    w = WindowStats.of([good(10), good(30), Sample(False, 0.5, None, "http 500: boom"),
                        Sample(True, 0.02, False, "malformed reply: not JSON")])
    assert (w.n, w.errors, w.scored, w.compliant) == (4, 1, 3, 2)
    assert w.p50_ms == pytest.approx(20.0) and w.compliance == pytest.approx(2 / 3)
    assert w.top_reasons == {"http 500": 1, "malformed reply": 1}


def test_analyze_rules() -> None:
    base = WindowStats.of([good(100)] * 10)
    assert analyze(WindowStats.of([good(100)] * 3), base, THR).action == "wait"
    assert analyze(WindowStats.of([good(100)] * 4), base, THR).action == "pass"
    # one error already exceeds floor(0.05 * 4) = 0 allowed: early rollback, before the window fills
    v = analyze(WindowStats.of([Sample(False, 0.1, None, "connection: refused")]), base, THR)
    assert v.action == "fail" and "errors" in v.reasons[0] and "connection" in v.reasons[0]
    slow = analyze(WindowStats.of([good(400)] * 4), base, THR)
    assert slow.action == "fail" and any(r.startswith("FAIL latency p50") for r in slow.reasons)
    bad = analyze(WindowStats.of([Sample(True, 0.1, False, "malformed reply: not JSON")] * 4), base, THR)
    assert bad.action == "fail" and any(r.startswith("FAIL format compliance 0.000") for r in bad.reasons)
    # slightly lower compliance within the allowed drop still passes
    mixed = WindowStats.of([good(100)] * 19 + [Sample(True, 0.1, False, "x")])
    assert analyze(mixed, base, THR).action == "pass"
    from llmpipe.config import ParamsError, parse_params

    bad = repo_params(deploy={"thresholds": {**THR.model_dump(), "min_request": 3}})
    with pytest.raises(ParamsError, match=r"deploy.thresholds.min_request: unknown key \(did you mean 'deploy.thresholds.min_requests'"):
        parse_params(bad)


def test_good_canary_rolls_forward_to_promotion(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.json", tmp_path / "decisions.jsonl")
    ctl = CanaryController.open(store, THR, stable=STABLE, canary=CANARY, steps=[0.1, 0.5, 1.0], baseline_size=200)
    feed(ctl, "stable", [good(100)] * 8)
    for step_weight in (0.5, 1.0):
        feed(ctl, "canary", [good(105)] * 4)
        assert ctl.state["canary_weight"] == step_weight
        assert store.load()["canary_weight"] == step_weight          # persisted at each decision
    feed(ctl, "canary", [good(105)] * 4)
    state = store.load()
    assert state["phase"] == "promoted" and state["stable"]["version"] == "v1.1.0"
    assert state["canary"] is None and state["previous_stable"]["version"] == "v1.0.0"
    assert "api_key" not in json.dumps(state)                         # secrets never persisted
    events = [d["event"] for d in store.decisions()]
    assert events == ["start", "roll_forward", "roll_forward", "promote"]
    last = store.decisions()[-1]
    assert last["numbers"]["canary"]["n"] == 4 and last["numbers"]["canary"]["p50_ms"] == 105.0
    assert any("latency p50" in r for r in last["reasons"]) and ctl.finished.is_set()


def test_bad_canary_rolled_back_and_logged(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.json", tmp_path / "decisions.jsonl")
    ctl = CanaryController.open(store, THR, stable=STABLE, canary=CANARY, steps=[0.25, 1.0], baseline_size=200)
    feed(ctl, "stable", [good(100)] * 8)
    feed(ctl, "canary", [Sample(True, 0.1, False, "malformed reply: not JSON: Expecting value")] * 4)
    state = store.load()
    assert state["phase"] == "rolled_back" and state["canary_weight"] == 0.0
    assert state["stable"]["version"] == "v1.0.0"
    rb = store.decisions()[-1]
    assert rb["event"] == "rollback" and rb["numbers"]["canary"]["compliance"] == 0.0
    assert rb["numbers"]["stable"]["compliance"] == 1.0
    feed(ctl, "canary", [good()] * 10)           # ignored after the decision
    assert len(store.decisions()) == 2


def test_state_survives_controller_restart(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.json", tmp_path / "decisions.jsonl")
    ctl = CanaryController.open(store, THR, stable=STABLE, canary=CANARY, steps=[0.1, 0.5, 1.0], baseline_size=200)
    feed(ctl, "stable", [good()] * 8)
    feed(ctl, "canary", [good()] * 4)
    feed(ctl, "canary", [good()] * 2)            # half of step 2's window, then a "crash"
    assert store.load()["step"] == 1
    del ctl
    # new process, engines on new ports: state wins for step/weight, URLs are refreshed
    moved = {**CANARY, "url": "http://127.0.0.1:3"}
    ctl2 = CanaryController.open(StateStore(tmp_path / "state.json", tmp_path / "decisions.jsonl"), THR,
                                 stable=STABLE, canary=moved, steps=[0.1, 0.5, 1.0], baseline_size=200)
    assert (ctl2.state["step"], ctl2.state["canary_weight"], ctl2.state["restarts"]) == (1, 0.5, 1)
    assert ctl2.state["canary"]["url"] == "http://127.0.0.1:3"
    assert ctl2.release_backend("canary").api_key == "k2"
    assert ctl2.snapshot()["window"] == {"canary": 0, "stable": 8}   # baseline restored, canary window fresh
    assert "baseline" not in ctl2.snapshot()
    assert store.decisions()[-1]["event"] == "resume"
    feed(ctl2, "stable", [good()] * 4)
    feed(ctl2, "canary", [good()] * 8)
    assert store.load()["phase"] == "promoted"
    # a different canary model starts a fresh rollout instead of resuming
    ctl3 = CanaryController.open(store, THR, stable=STABLE, canary={**CANARY, "sha256": "ccc"}, steps=[0.1, 1.0], baseline_size=200)
    assert ctl3.state["step"] == 0 and ctl3.state["restarts"] == 0


def test_corrupt_state_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text('{"phase": "canary",')
    with pytest.raises(StateError, match=r"state.json:1: corrupt state file"):
        StateStore(tmp_path / "state.json", tmp_path / "d.jsonl").load()
    with pytest.raises(ValueError, match="end at 1.0"):
        CanaryController.open(StateStore(tmp_path / "s2.json", tmp_path / "d.jsonl"), THR,
                              stable=STABLE, canary=CANARY, steps=[0.1, 0.5], baseline_size=200)


# ---------------------------------------------------------------------------------------------
# Real llama.cpp engines behind the real router (loopback, bounded; each test owns its servers)
# ---------------------------------------------------------------------------------------------
import asyncio  # noqa: E402
import importlib.util  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import subprocess  # noqa: E402

llama_required = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                    reason="llama-cpp-python not installed (scripts/install_llama_cpp.sh)")
# PROMPTS (canary_support): one few-shot prompt, greedy decoding: the base model answers it with
# schema-valid JSON, a good canary (same weights) answers exactly like stable, and llama.cpp
# reuses the cached prompt.
REAL_THR = Thresholds(**REAL_THR_VALUES)


def base_gguf() -> str:
    from llmpipe.serve.rollout import gguf_path

    return gguf_path("embedded:smollm2-135m-instruct")


@pytest.fixture(scope="module")
def broken_gguf(tmp_path_factory) -> str:
    """A real but broken model: the base GGUF cut to its first 2 of 30 blocks (a bad export)."""
    from llmpipe.serve.gguf_variant import write_gguf_variant

    path = tmp_path_factory.mktemp("models") / "broken-2-blocks.gguf"
    return str(write_gguf_variant(base_gguf(), path, keep_blocks=2, metadata={"general.name": "broken"}))


def engine(tmp_path: Path, name: str, model: str):
    from llmpipe.serve.engines import EngineProcess, LlamaCppSpec, free_port

    spec = LlamaCppSpec(model=model, port=free_port(), api_key=f"key-{name}", served_model=name,
                        n_ctx=512, n_threads=1)
    return EngineProcess(spec, tmp_path / f"{name}.log", name=name).start()


def release(eng, version: str, sha: str) -> dict:
    return {"version": version, "url": eng.url, "served_model": eng.spec.served_model,
            "api_key": eng.spec.api_key, "sha256": sha, "model": eng.spec.model}


@pytest.mark.slow
@llama_required
def test_real_good_canary_promoted_to_full_traffic(tmp_path: Path) -> None:
    stable_e, canary_e = engine(tmp_path, "stable", base_gguf()), engine(tmp_path, "canary", base_gguf())
    try:
        stable_e.wait_healthy(120)
        canary_e.wait_healthy(120)
        store = StateStore(tmp_path / "state.json", tmp_path / "decisions.jsonl")
        ctl, router, traffic = rollout(store, release(stable_e, "v1.0.0", "s"), release(canary_e, "v1.1.0", "c"),
                                       steps=[0.5, 1.0], max_requests=40)
    finally:
        stable_e.stop()
        canary_e.stop()
    state = store.load()
    events = [d["event"] for d in store.decisions()]
    assert state["phase"] == "promoted", (events, store.decisions()[-1])
    assert state["stable"]["version"] == "v1.1.0" and events == ["start", "roll_forward", "promote"]
    assert traffic.failed == 0 and traffic.by_version.get("v1.1.0", 0) >= 6
    assert router.counts["retries"] == 0


@pytest.mark.slow
@llama_required
def test_real_bad_canary_rolled_back_without_client_failures(tmp_path: Path, broken_gguf: str) -> None:
    stable_e, canary_e = engine(tmp_path, "stable", base_gguf()), engine(tmp_path, "canary", broken_gguf)
    try:
        stable_e.wait_healthy(120)
        canary_e.wait_healthy(120)
        store = StateStore(tmp_path / "state.json", tmp_path / "decisions.jsonl")
        ctl, router, traffic = rollout(store, release(stable_e, "v1.0.0", "s"), release(canary_e, "v1.1.0", "c"),
                                       steps=[0.25, 0.5, 1.0], max_requests=60)
    finally:
        stable_e.stop()
        canary_e.stop()
    state = store.load()
    rb = store.decisions()[-1]
    assert state["phase"] == "rolled_back" and state["canary_weight"] == 0.0, rb
    assert rb["event"] == "rollback" and rb["step"] == 0
    assert rb["numbers"]["canary"]["compliance"] < rb["numbers"]["stable"]["compliance"]
    assert any(r.startswith("FAIL format compliance") for r in rb["reasons"])
    # bounded: decided within the first window (3 canary requests at 25%, plus in-flight ones)
    assert router.counts["canary"] <= REAL_THR.min_requests + 2
    assert traffic.sent <= 20 and traffic.failed == 0


@pytest.mark.slow
@llama_required
def test_real_crashing_and_slow_canaries_rolled_back_and_retried_on_stable(tmp_path: Path) -> None:
    stable_e = engine(tmp_path, "stable", base_gguf())
    crashed = engine(tmp_path, "crashed", base_gguf())
    try:
        stable_e.wait_healthy(120)
        crashed.wait_healthy(120)
        # slow canary: a real engine that takes longer than canary_timeout_s for every reply
        store = StateStore(tmp_path / "slow.json", tmp_path / "slow.jsonl")
        _, router, traffic = rollout(store, release(stable_e, "v1.0.0", "s"), release(crashed, "v1.1.0", "slow"),
                                     steps=[0.5, 1.0], max_requests=20, canary_timeout_s=0.02)
        assert store.load()["phase"] == "rolled_back" and traffic.failed == 0
        assert router.counts["retries"] >= 1 and "timeout" in json.dumps(store.decisions()[-1]["reasons"])
        # crashing canary: the engine process dies; its requests are retried on stable
        crashed.stop()
        store = StateStore(tmp_path / "crash.json", tmp_path / "crash.jsonl")
        _, router, traffic = rollout(store, release(stable_e, "v1.0.0", "s"), release(crashed, "v1.2.0", "crash"),
                                     steps=[0.5, 1.0], max_requests=20)
    finally:
        stable_e.stop()
        crashed.stop()
    rb = store.decisions()[-1]
    assert store.load()["phase"] == "rolled_back" and traffic.failed == 0
    assert "connection" in json.dumps(rb["reasons"]) and router.counts["retries"] >= 1
    assert router.counts["canary"] <= 3          # early rollback on the first canary error


@pytest.mark.slow
@llama_required
def test_deploy_stage_promotes_then_rolls_back_with_registry(tmp_path: Path, broken_gguf: str) -> None:
    """stages/deploy.py on a fresh checkout: promote a good model (registry: prod), then roll a
    broken one back (registry: canary unassigned), then do nothing for the same broken model."""
    import shutil

    from llmpipe.registry import Registry, promote
    from llmpipe.serve.rollout import md5_file

    root = tmp_path / "checkout"
    params = repo_params(
        validate={"default_system_prompt": SYSTEM},
        registry={"model_path": "models/gguf/model-q4_k_m.gguf", "check_dvc_status": False},
        serve={"host": "127.0.0.1", "n_ctx": 512, "n_threads": 1, "canary_timeout_s": 60, "startup_timeout_s": 120},
        deploy={"target": "local", "model": "models/gguf/model-q4_k_m.gguf", "bootstrap_stable": broken_gguf,
                "prompts": "data/split/test.jsonl", "reply_schema": "data/task/support_triage.schema.json",
                "steps": [0.5, 1.0],
                # the 2-block bootstrap stable is far faster than any real model: judge format here
                "thresholds": {**REAL_THR.model_dump(), "max_p50_ratio": 100.0, "max_p95_ratio": 100.0,
                               "min_requests": 2, "min_stable_requests": 2},
                "traffic": {"concurrency": 2, "max_tokens": 48, "max_requests": 40, "max_seconds": 150},
                "update_registry": True})
    from llmpipe.config import parse_params

    reg_cfg = parse_params(params).registry
    deploy_checkout(root, params)
    model = root / "models/gguf/model-q4_k_m.gguf"
    model.parent.mkdir(parents=True)

    def pipeline_run(source: str, message: str, do_promote: bool = True) -> str | None:
        shutil.copyfile(source, model)
        commit_pipeline_run(root, {"models/gguf/model-q4_k_m.gguf": md5_file(model)}, message)
        return promote(root, reg_cfg).version if do_promote else None

    deploy = run_deploy_stage

    reg = Registry(root)
    # 1) `dvc repro` deploys the pipeline's (good) model before anyone promoted it; stable is the
    #    broken bootstrap model: rolled out under an unregistered label
    pipeline_run(base_gguf(), "run 1", do_promote=False)
    m = deploy(root)
    assert m["decision"] == "promoted" and m["client_failures"] == 0, m
    assert m["canary_version"].startswith("unregistered-") and "skipped" in m["registry"]
    timings = json.loads((root / "timings/deploy.json").read_text())       # wall clock is not a metric
    assert "duration_s" not in m and timings["requests"] >= 4 and timings["final_numbers"]["canary"]["p50_ms"] > 0
    state = json.loads((root / "deploy/state.json").read_text())
    release = root / state["stable"]["model"]
    assert state["phase"] == "promoted" and release.parent.name == "releases"
    assert release.stat().st_size == model.stat().st_size
    #    promoted afterwards: the next deploy records it as v1.0.0 and assigns prod, no new rollout
    assert promote(root, reg_cfg).version == "v1.0.0"
    m = deploy(root)
    assert m["decision"] == "noop" and m["registry"] == {"assigned": "prod", "version": "v1.0.0"}
    assert reg.stage_version("model", "prod") == "v1.0.0" and reg.stage_version("model", "canary") is None
    assert json.loads((root / "deploy/state.json").read_text())["stable"]["version"] == "v1.0.0"
    # 2) the next pipeline run produces a broken model: rolled back, no client failure
    assert pipeline_run(broken_gguf, "run 2") == "v1.1.0"
    assert reg.stage_version("model", "canary") == "v1.1.0"
    m = deploy(root)
    assert m["decision"] == "rolled_back" and m["client_failures"] == 0, m
    assert m["stable_version"] == "v1.0.0" and m["canary_version"] == "v1.1.0"
    assert m["registry"] == {"unassigned": "canary", "version": "v1.1.0"}
    assert reg.stage_version("model", "canary") is None and reg.stage_version("model", "prod") == "v1.0.0"
    assert any("!" in t for t in git(root, "tag", "-l").split())      # model#canary!#N records it
    events = [json.loads(line)["event"] for line in (root / "deploy/decisions.jsonl").read_text().splitlines()]
    assert events.count("promote") == 1 and events.count("rollback") == 1 and events.count("registry") == 3
    # 3) the same broken model again: nothing to do
    assert deploy(root)["decision"] == "noop_rolled_back"


@pytest.mark.slow
@llama_required
def test_router_process_killed_mid_rollout_resumes_from_state(tmp_path: Path) -> None:
    """`llmpipe.cli router --control` is SIGKILLed after step 1; a new process resumes at step 2."""
    import signal
    import time

    import httpx
    import yaml

    from llmpipe.serve.compliance import DEMO_SCHEMA
    from llmpipe.serve.engines import free_port
    from llmpipe.serve.traffic import drive

    (tmp_path / "schema.json").write_text(json.dumps(DEMO_SCHEMA))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(repo_params(serve={"host": "127.0.0.1"}, deploy={
        "steps": [0.5, 1.0], "reply_schema": str(tmp_path / "schema.json"), "thresholds": REAL_THR.model_dump()})))
    eng = engine(tmp_path, "engine", base_gguf())
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "ENGINE_KEY": "key-engine"}
    procs: list[subprocess.Popen] = []

    def start_router() -> str:
        port = free_port()
        # stable and canary are two versions served by one engine (saves a second engine here)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "llmpipe.cli", "router", "--params", str(tmp_path / "params.yaml"),
             "--stable", eng.url, "--stable-version", "v1.0.0", "--canary", eng.url, "--canary-version", "v1.1.0",
             "--upstream-key-env", "ENGINE_KEY", "--control", "--port", str(port),
             "--state", str(tmp_path / "state.json"), "--decisions", str(tmp_path / "decisions.jsonl")],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    return url
            except httpx.HTTPError:
                time.sleep(0.2)
        raise AssertionError("router did not start")

    def send(url: str, n: int):
        return asyncio.run(drive(url, PROMPTS, concurrency=1, max_requests=n, max_tokens=4))

    try:
        eng.wait_healthy(120)
        url = start_router()
        first = send(url, 6)                     # 3 canary requests at 50%: step 1 passes
        assert first.failed == 0
        assert httpx.get(url + "/v1/deploy/state").json()["step"] == 1
        procs[-1].send_signal(signal.SIGKILL)    # crash: no chance to clean up
        procs[-1].wait(10)
        url = start_router()
        state = httpx.get(url + "/v1/deploy/state").json()
        assert (state["phase"], state["step"], state["canary_weight"], state["restarts"]) == ("canary", 1, 1.0, 1)
        assert httpx.get(url + "/health").json()["canary_weight"] == 1.0
        second = send(url, 3)                    # step 2 (100%) completes: promoted
        assert second.failed == 0 and second.by_version == {"v1.1.0": 3}
        final = httpx.get(url + "/v1/deploy/state").json()
        assert final["phase"] == "promoted" and final["stable"]["version"] == "v1.1.0"
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(10)
        eng.stop()
    events = [json.loads(line)["event"] for line in (tmp_path / "decisions.jsonl").read_text().splitlines()]
    assert events == ["start", "roll_forward", "resume", "promote"]
