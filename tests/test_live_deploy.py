"""Live deploys (issue 17) on loopback.

A long-running ``llmpipe serve-stack up`` process (router + stable llama.cpp engine + control
API), a separate, bounded user-traffic process (``llmpipe user-traffic``), and the deploy stage
(``stages/deploy.py`` with ``deploy.target`` = the control API URL) run in a throwaway git
checkout whose registry (GTO tags) promotes each canary first. The deploy sends no traffic: it
judges the router's measurements of the users' requests.

The fast tests cover the lock lease, the target check and the safety rails; the slow ones run
real engines (good canary promoted, bad one rolled back, a concurrent deploy refused, a deploy
killed mid-rollout then resumed across a stack restart, users' failures always 0).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from canary_support import deploy_checkout, git, repo_params

from llmpipe.config import ParamsError, parse_params
from llmpipe.stack.state import StackState

ROOT = Path(__file__).resolve().parents[1]
SRC = str(ROOT / "src")
KEY = "control-key-for-tests"
ENGINE_KEY = "engine-key-for-tests"


# -- fast ------------------------------------------------------------------------------------
def test_lock_is_a_lease_that_survives_a_restart(tmp_path: Path) -> None:
    st = StackState(tmp_path / "state.json")
    token, why = st.acquire("deploy A", ttl_s=10, now=100.0)
    assert token and why == ""
    other, why = st.acquire("deploy B", ttl_s=10, now=105.0)
    assert other is None and "deploy lock held by 'deploy A'" in why and "expires in 5s" in why
    assert st.holds(token, 105.0) and not st.holds("forged", 105.0) and not st.holds(None, 105.0)
    assert st.renew(token, 10, now=108.0) and st.lock_holder(117.0) is not None
    st.touch(token, 116.0)                                   # any successful call is a heartbeat
    st.save()
    again = StackState(tmp_path / "state.json")              # a restarted stack keeps the lock
    assert again.load() and again.holds(token, 120.0)
    assert "token" not in json.dumps(again.public(120.0)) and again.public(120.0)["lock"]["owner"] == "deploy A"
    assert again.expired_lock(125.0) is None                 # still valid
    expired = again.expired_lock(127.0)
    assert expired and expired["owner"] == "deploy A" and again.data["lock"] is None
    assert not again.renew(token, 10, now=127.0)             # a dead deploy cannot come back
    new, _ = again.acquire("deploy B", ttl_s=10, now=127.0)
    assert new and again.release(new, 128.0) and again.data["lock"] is None


def test_deploy_target_is_local_or_a_control_url() -> None:
    assert parse_params(repo_params(deploy={"target": "http://127.0.0.1:8010/"})).deploy.target == "http://127.0.0.1:8010"
    with pytest.raises(ParamsError, match="deploy.target: Value error, must be 'local' or the http"):
        parse_params(repo_params(deploy={"target": "prod"}))


def test_stack_refuses_to_start_without_its_control_key(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "LLMPIPE_CONTROL_KEY"}
    proc = subprocess.run([sys.executable, "-m", "llmpipe.cli", "serve-stack", "up", "--params", str(ROOT / "params.yaml"),
                           "--state-dir", str(tmp_path / "stack"), "--stable-url", "http://127.0.0.1:9",
                           "--stable-version", "v0"], env={**env, "PYTHONPATH": SRC}, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 1 and "$LLMPIPE_CONTROL_KEY is empty: the control API needs its own key" in proc.stderr
    assert not (tmp_path / "stack").exists()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
@pytest.mark.parametrize("unit", ["llmpipe-stack.service", "llmpipe-engine@.service"])
def test_systemd_units_verify(tmp_path: Path, unit: str) -> None:
    """The shipped units parse and their commands exist (paths pointed at this checkout)."""
    text = (ROOT / "ops/systemd" / unit).read_text().replace("/opt/llmpipe", str(ROOT))
    name = unit.replace("@.", "@v1.0.0.") if "@" in unit else unit
    (tmp_path / unit).write_text(text)
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", str(tmp_path / name)], capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0 and "ignoring" not in proc.stderr, proc.stderr   # no unknown or bad settings
    assert "llmpipe.cli serve-stack up" in text or "llmpipe.cli serve " in text


def make_checkout(root: Path, params: dict) -> Path:
    """canary_support's deploy checkout, committed (the live target needs a clean workspace)."""
    deploy_checkout(root, params)
    git(root, "add", "-A")
    git(root, "commit", "-qm", "pipeline")
    return root


def run_stage(checkout: Path, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC, "LLMPIPE_CONTROL_KEY": KEY, **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "stages/deploy.py")], cwd=checkout, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_live_target_refused_from_a_dirty_workspace(tmp_path: Path) -> None:
    """The rails hold before anything is contacted: the URL points at a closed port."""
    params = repo_params(deploy={"target": "http://127.0.0.1:9"})
    checkout = make_checkout(tmp_path / "checkout", params)
    (checkout / "data/split/test.jsonl").write_text("{}\n")          # an uncommitted change
    proc = run_stage(checkout)
    assert proc.returncode == 1
    assert "refusing a live deploy from a workspace with uncommitted changes to data/split/test.jsonl" in proc.stderr
    git(checkout, "checkout", "--", "data/split/test.jsonl")
    proc = run_stage(checkout)       # clean now: no canary promoted in the registry, nothing to do
    assert proc.returncode == 0, proc.stderr
    m = json.loads((checkout / "metrics/deploy.json").read_text())
    assert m["decision"] == "nothing_to_deploy" and "no version is assigned to registry stage 'canary'" in m["reason"]


@pytest.mark.slow
def test_live_target_refused_inside_dvc_exp_run(tmp_path: Path) -> None:
    """A real `dvc exp run` of a deploy stage whose target is live: refused, nothing contacted."""
    checkout = make_checkout(tmp_path / "checkout", repo_params(deploy={"target": "http://127.0.0.1:9"}))
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=checkout, check=True)
    (checkout / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"deploy": {
        "cmd": f"{sys.executable} {ROOT / 'stages/deploy.py'}", "params": ["deploy.target"],
        "metrics": [{"metrics/deploy.json": {"cache": False}}]}}}))
    git(checkout, "add", "-A")
    git(checkout, "commit", "-qm", "dvc pipeline")
    env = {**os.environ, "PYTHONPATH": SRC, "LLMPIPE_CONTROL_KEY": KEY}
    proc = subprocess.run([sys.executable, "-m", "dvc", "exp", "run"], cwd=checkout, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "refusing a live deploy inside `dvc exp run`" in proc.stdout + proc.stderr
    assert not (checkout / "metrics/deploy.json").exists()


# -- slow: real engines ----------------------------------------------------------------------
def free_port() -> int:
    from llmpipe.serve.engines import free_port as fp

    return fp()


class Stack:
    """One `llmpipe serve-stack up` process; restartable on the same ports and state dir."""

    def __init__(self, workdir: Path, params_file: Path, stable_url: str) -> None:
        self.dir, self.params_file, self.stable_url = workdir, params_file, stable_url
        self.router_port, self.control_port = free_port(), free_port()
        self.proc: subprocess.Popen | None = None
        self.router = f"http://127.0.0.1:{self.router_port}"
        self.control = f"http://127.0.0.1:{self.control_port}"
        self.http = httpx.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=30)

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": SRC, "LLMPIPE_CONTROL_KEY": KEY, "LLMPIPE_ENGINE_KEY": ENGINE_KEY}
        log = open(self.dir / "stack.log", "ab")
        # the first stable is a remote engine (by URL, with its own key); the canaries it starts itself
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llmpipe.cli", "serve-stack", "up", "--params", str(self.params_file),
             "--state-dir", str(self.dir / "stack"), "--stable-url", self.stable_url, "--stable-version", "v0-base",
             "--stable-key-env", "LLMPIPE_ENGINE_KEY",
             "--router-port", str(self.router_port), "--control-port", str(self.control_port)],
            env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log_tail()
            try:
                if httpx.get(self.router + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise AssertionError("stack did not become healthy:\n" + self.log_tail())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)

    def state(self) -> dict:
        return self.http.get(self.control + "/control/state").json()

    def log_tail(self, n: int = 40) -> str:
        return "\n".join((self.dir / "stack.log").read_text(errors="replace").splitlines()[-n:])

    def events(self) -> list[dict]:
        path = self.dir / "stack/events.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


class Users:
    """A separate user-traffic process, bounded in count and time."""

    def __init__(self, stack: Stack, prompts: Path, out: Path, *, max_requests: int = 2000,
                 max_seconds: float = 1500) -> None:
        self.out = out
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llmpipe.cli", "user-traffic", "--url", stack.router, "--prompts", str(prompts),
             "--max-requests", str(max_requests), "--max-seconds", str(max_seconds), "--concurrency", "2",
             "--max-tokens", "48", "--pause-s", "0.1", "--out", str(out)],
            env={**os.environ, "PYTHONPATH": SRC}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def finish(self) -> dict:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=120)
        assert self.out.is_file(), out
        return json.loads(self.out.read_text())


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """The stack (stable = the embedded base model as v0-base) and a checkout whose deploy targets it."""
    from llmpipe.serve.gguf_variant import write_gguf_variant
    from llmpipe.serve.rollout import gguf_path

    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python not installed (scripts/install_llama_cpp.sh)")
    work = tmp_path_factory.mktemp("live")
    base = gguf_path("embedded:smollm2-135m-instruct")
    models = work / "models"
    models.mkdir()
    # good canaries: the same weights in different bytes (a new build); bad: cut to 2 of 30 blocks
    variants = {name: str(write_gguf_variant(base, models / f"{name}.gguf", metadata={"general.name": name}))
                for name in ("good1", "good2", "good3")}
    variants["bad"] = str(write_gguf_variant(base, models / "bad.gguf", keep_blocks=2,
                                             metadata={"general.name": "bad"}))
    serve = {"host": "127.0.0.1", "n_ctx": 512, "n_threads": 1, "startup_timeout_s": 180,
             "stack": {**yaml.safe_load((ROOT / "params.yaml").read_text())["serve"]["stack"],
                       "health_interval_s": 1.0, "drain_timeout_s": 30}}
    stack_params = work / "stack-params.yaml"
    stack_params.write_text(yaml.safe_dump(repo_params(
        serve=serve, deploy={"reply_schema": str(ROOT / "data/task/support_triage.schema.json")})))
    # v0-base runs as its own service (`llmpipe serve`, e.g. a GPU host's engine unit)
    engine_port = free_port()
    engine = subprocess.Popen(
        [sys.executable, "-m", "llmpipe.cli", "serve", "--params", str(stack_params), "--model", base,
         "--served-model", "v0-base", "--port", str(engine_port), "--api-key-env", "LLMPIPE_ENGINE_KEY",
         "--log", str(work / "engine-v0-base.log")],
        env={**os.environ, "PYTHONPATH": SRC, "LLMPIPE_ENGINE_KEY": ENGINE_KEY},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stack = Stack(work, stack_params, f"http://127.0.0.1:{engine_port}")
    stack.start()       # waits until /health answers, i.e. the remote engine serves v0-base
    params = repo_params(
        registry={"model_path": "models/gguf/model-q4_k_m.gguf", "check_dvc_status": False},
        serve=serve,
        deploy={"target": stack.control, "model": "models/gguf/model-q4_k_m.gguf", "steps": [0.5, 1.0],
                # judged on errors and reply format: on a shared 2-core CI box a cold canary's
                # latency says more about the neighbours than the model (the latency rules have
                # their own unit tests in test_canary.py)
                "thresholds": {"min_requests": 3, "min_stable_requests": 3, "max_error_rate": 0.05,
                               "max_error_rate_increase": 0.02, "max_p50_ratio": 100.0, "max_p95_ratio": 100.0,
                               "latency_slack_ms": 60000, "max_compliance_drop": 0.1, "min_compliance": 0.0},
                "live": {"canary_url": "", "canary_key_env": "", "lock_ttl_s": 15, "poll_s": 0.5,
                         "max_seconds": 900},
                "update_registry": True})
    checkout = make_checkout(work / "checkout", params)
    yield {"stack": stack, "checkout": checkout, "models": variants, "work": work}
    stack.stop()
    engine.send_signal(signal.SIGTERM)
    engine.wait(60)


def build(live: dict, model: str, message: str) -> str:
    """A pipeline run produced ``model``: commit it (dvc.lock hash) and promote it to canary."""
    from llmpipe.registry import promote
    from llmpipe.serve.rollout import md5_file

    checkout = live["checkout"]
    dest = checkout / "models/gguf/model-q4_k_m.gguf"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(live["models"][model], dest)
    lock = {"schema": "2.0", "stages": {"quantize": {"cmd": "x", "outs": [
        {"path": "models/gguf/model-q4_k_m.gguf", "hash": "md5", "md5": md5_file(dest)}]}}}
    (checkout / "dvc.lock").write_text(yaml.safe_dump(lock))
    git(checkout, "add", "-A")
    git(checkout, "commit", "-qm", message)
    return promote(checkout, parse_params(yaml.safe_load((checkout / "params.yaml").read_text())).registry).version


def deploy_events(checkout: Path) -> list[str]:
    path = checkout / "deploy/decisions.jsonl"
    return [json.loads(line)["event"] for line in path.read_text().splitlines()] if path.exists() else []


def stage_registry(checkout: Path, stage: str) -> str | None:
    from llmpipe.registry import Registry

    return Registry(checkout).stage_version("model", stage)


@pytest.mark.slow
def test_good_canary_promoted_then_bad_canary_rolled_back_on_live_traffic(live) -> None:
    stack, checkout = live["stack"], live["checkout"]
    assert stack.state()["health"]["engines"]["stable"] == {"version": "v0-base", "healthy": True, "restarts": 0,
                                                            "managed": False}      # a remote engine by URL
    users = Users(stack, checkout / "data/split/test.jsonl", live["work"] / "users1.json")
    try:
        version = build(live, "good1", "run 1: good model")
        proc = run_stage(checkout)
        assert proc.returncode == 0, proc.stderr[-3000:] + stack.log_tail()
        m = json.loads((checkout / "metrics/deploy.json").read_text())
        assert (m["decision"], m["target"], m["canary_version"], m["stable_version"]) == \
            ("promoted", "live", version, "v0-base"), m
        assert m["steps_passed"] == 2 and m["client_failures"] == 0 and m["final_window"]["canary"]["compliance"] == 1.0
        assert m["registry"] == {"assigned": "prod", "version": version}
        assert stage_registry(checkout, "prod") == version and stage_registry(checkout, "canary") is None
        state = stack.state()
        assert state["stable"]["version"] == version and state["canary"] is None and state["lock"] is None
        assert state["health"]["engines"]["stable"]["version"] == version
        timings = json.loads((checkout / "timings/deploy.json").read_text())
        assert [w["action"] for w in timings["windows"]] == ["pass", "pass"]
        assert all(w["canary"]["n"] >= 3 for w in timings["windows"])      # judged on users' requests

        bad = build(live, "bad", "run 2: broken export")
        proc = run_stage(checkout)
        assert proc.returncode == 0, proc.stderr[-3000:]
        m = json.loads((checkout / "metrics/deploy.json").read_text())
        assert (m["decision"], m["canary_version"], m["stable_version"]) == ("rolled_back", bad, version), m
        assert m["steps_passed"] == 0 and m["final_window"]["canary"]["compliance"] < 0.5
        assert m["registry"] == {"unassigned": "canary", "version": bad}
        assert stage_registry(checkout, "canary") is None and stage_registry(checkout, "prod") == version
        state = stack.state()
        assert state["stable"]["version"] == version and state["rollout"] is None
        assert "canary" not in state["health"]["engines"]
        assert not list((live["work"] / "stack/releases").glob(f"{bad}-*"))   # the bad release is gone
    finally:
        traffic = users.finish()
    assert traffic["failed"] == 0, traffic["failures"]
    # users got the bad canary's (malformed, HTTP 200) replies only within its first window
    assert traffic["by_version"].get(version, 0) >= 3 and 1 <= traffic["by_version"].get(bad, 0) <= 8
    events = deploy_events(checkout)
    assert events == ["start", "roll_forward", "promote", "registry", "start", "rollback", "registry"]
    metrics = httpx.get(stack.router + "/metrics").text
    assert f'llmpipe_stack_engine_up{{role="stable",version="{version}"}} 1.0' in metrics


def wait_for(predicate, what: str, timeout: float = 900, stack: Stack | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}" + ("\n" + stack.log_tail() if stack else ""))


def start_stage(checkout: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC, "LLMPIPE_CONTROL_KEY": KEY}
    return subprocess.Popen([sys.executable, str(ROOT / "stages/deploy.py")], cwd=checkout, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_concurrent_deploy_refused_and_killed_deploy_resumed_across_a_stack_restart(live) -> None:
    stack, checkout = live["stack"], live["checkout"]
    users = Users(stack, checkout / "data/split/test.jsonl", live["work"] / "users2.json")
    try:
        # a second deploy while the first holds the lock is refused, and changes nothing
        version = build(live, "good2", "run 3: good model")
        first = start_stage(checkout)
        wait_for(lambda: (stack.state()["lock"] or {}).get("owner"), "the first deploy's lock", stack=stack)
        second = run_stage(checkout, timeout=120)
        assert second.returncode == 1 and "deploy lock held by" in second.stderr, second.stderr
        assert "concurrent deploys are refused" in second.stderr
        _, err = first.communicate(timeout=600)
        assert first.returncode == 0, err[-3000:]
        assert json.loads((checkout / "metrics/deploy.json").read_text())["decision"] == "promoted"
        assert stack.state()["stable"]["version"] == version

        # a deploy killed (SIGKILL: no cleanup) after its first step passed
        resumed_version = build(live, "good3", "run 4: good model")
        victim = start_stage(checkout)
        st = wait_for(lambda: (s := stack.state())["rollout"] and s["rollout"]["step"] == 1 and s, "step 2",
                      stack=stack)
        assert st["lock"]["owner"].split()[0].endswith(f":{victim.pid}")
        victim.send_signal(signal.SIGKILL)
        victim.communicate(timeout=30)
        st = stack.state()     # consistent: the canary at step 2 of 2, the dead deploy's lock
        assert (st["rollout"]["version"], st["rollout"]["step"], st["rollout"]["weight"]) == (resumed_version, 1, 1.0)
        # the lease runs out (15 s): the stack holds the canary at weight 0 by itself
        st = wait_for(lambda: (s := stack.state())["lock"] is None and s, "lock expiry", timeout=90, stack=stack)
        assert st["rollout"]["status"] == "held" and st["weight"] == 0.0
    finally:
        traffic = users.finish()
    assert traffic["failed"] == 0, traffic["failures"]

    # the stack restarts (weights and canary state come back from its state dir)
    stack.stop()
    stack.start()
    st = stack.state()
    assert st["stable"]["version"] == version and st["rollout"]["version"] == resumed_version
    assert (st["rollout"]["step"], st["rollout"]["status"], st["weight"]) == (1, "held", 0.0)
    assert set(st["health"]["engines"]) == {"stable", "canary"}
    assert [e["event"] for e in stack.events()].count("restart") == 1

    # the next deploy resumes the held step and promotes
    users = Users(stack, checkout / "data/split/test.jsonl", live["work"] / "users3.json")
    try:
        proc = run_stage(checkout)
        assert proc.returncode == 0, proc.stderr[-3000:]
    finally:
        traffic = users.finish()
    assert traffic["failed"] == 0, traffic["failures"]
    m = json.loads((checkout / "metrics/deploy.json").read_text())
    assert (m["decision"], m["canary_version"], m["resumed"], m["steps_passed"]) == \
        ("promoted", resumed_version, True, 2), m
    assert stack.state()["stable"]["version"] == resumed_version
    assert stage_registry(checkout, "prod") == resumed_version
    events = deploy_events(checkout)
    assert events[-3:] == ["resume", "promote", "registry"]
    stack_events = [e["event"] for e in stack.events()]
    assert "lock_refused" in stack_events and "lock_expired" in stack_events
    assert "engine_died" not in stack_events and "engine_restart_failed" not in stack_events   # retired engines stay stopped
