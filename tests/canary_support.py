"""What the real-server canary tests share (tests/test_canary.py: llama.cpp, tests/test_vllm.py: vLLM).

- ``PROMPTS``: one few-shot support-triage prompt; greedy, the base model answers it with
  schema-valid JSON and a good canary (the same weights) answers like stable;
- ``rollout``: the real router + canary controller + generated traffic until a decision;
- ``deploy_checkout`` / ``run_deploy_stage``: a tiny git checkout with the deploy stage's inputs
  (params, test prompts, reply schema, a passed gate) and ``stages/deploy.py`` run in it.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]

SYSTEM = ("You are a support triage assistant. Read the customer's message and answer with only a JSON "
          "object with the keys \"intent\", \"product\", \"urgency\" and \"order_id\".")
SHOTS = [("My robot vacuum order LM204817 still has not shipped, where is it?",
          '{"intent": "order_status", "product": "robot_vacuum", "urgency": "medium", "order_id": "LM204817"}'),
         ("I was charged twice for my fitness tracker. Please fix this now!",
          '{"intent": "billing_question", "product": "fitness_tracker", "urgency": "high", "order_id": null}')]
PROMPTS = [[{"role": "system", "content": SYSTEM},
            *[m for u, a in SHOTS for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})],
            {"role": "user", "content": "Where is my order KX482913? My e-reader has not arrived."}]]
# small windows, generous latency bounds: real engines on a shared 2-core box
REAL_THR = dict(min_requests=3, min_stable_requests=3, max_error_rate=0.05, max_error_rate_increase=0.02,
                max_p50_ratio=3.0, max_p95_ratio=4.0, latency_slack_ms=3000.0, max_compliance_drop=0.1,
                min_compliance=0.0)


def repo_params(**sections: dict) -> dict:
    """The repository's params.yaml as a dict, with ``sections`` merged in (one level deep)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name, override in sections.items():
        params[name] = {**params[name], **override}
    return params


def rollout(store, stable: dict, canary: dict, *, steps, max_requests: int, canary_timeout_s: float = 60.0,
            max_seconds: float = 150.0, concurrency: int = 2, thresholds: dict | None = None):
    """Router + controller + generated traffic until a decision (or the request budget)."""
    from llmpipe.serve.analysis import Thresholds
    from llmpipe.serve.compliance import DEMO_SCHEMA, ReplyValidator
    from llmpipe.serve.controller import CanaryController
    from llmpipe.serve.router import Backend, Router
    from llmpipe.serve.traffic import drive

    ctl = CanaryController.open(store, Thresholds(**(thresholds or REAL_THR)), stable=stable, canary=canary,
                                steps=steps, baseline_size=200)
    router = Router(Backend(stable["version"], stable["url"]), None, validator=ReplyValidator(DEMO_SCHEMA),
                    canary_timeout_s=canary_timeout_s)
    ctl.attach(router)

    async def go():
        port = await router.start("127.0.0.1", 0)
        try:
            return await drive(f"http://127.0.0.1:{port}", PROMPTS, concurrency=concurrency,
                               max_requests=max_requests, max_seconds=max_seconds, stop=ctl.finished, max_tokens=48)
        finally:
            await router.stop()

    return ctl, router, asyncio.run(go())


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


def deploy_checkout(root: Path, params: dict[str, Any]) -> None:
    """A fresh git checkout with what the deploy stage reads besides the models: ``params``
    (written as params.yaml), one test prompt, the reply schema and a passed gate."""
    from llmpipe.serve.compliance import DEMO_SCHEMA

    root.mkdir(parents=True)
    git(root, "init", "-q", "-b", "main")
    git(root, "config", "user.email", "ci@example.com")
    git(root, "config", "user.name", "CI")
    (root / ".gitignore").write_text("models/\ndeploy/\ntimings/\n")
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "data/split").mkdir(parents=True)
    record = {"id": "t1", "messages": PROMPTS[0] + [{"role": "assistant", "content": SHOTS[0][1]}], "metadata": {}}
    (root / "data/split/test.jsonl").write_text(json.dumps(record) + "\n")
    (root / "data/task").mkdir(parents=True)
    (root / "data/task/support_triage.schema.json").write_text(json.dumps(DEMO_SCHEMA))
    (root / "metrics").mkdir()
    (root / "metrics/gate.json").write_text(json.dumps({"passed": True, "checks": []}))


def commit_pipeline_run(root: Path, outs: dict[str, str], message: str) -> None:
    """Record ``outs`` (path -> DVC md5, as a pipeline run's dvc.lock would) and commit."""
    lock = {"schema": "2.0", "stages": {"pipeline": {"cmd": "x", "outs": [
        {"path": path, "hash": "md5", "md5": md5} for path, md5 in outs.items()]}}}
    (root / "dvc.lock").write_text(yaml.safe_dump(lock))
    git(root, "add", "-A")
    git(root, "commit", "-qm", message)


def run_deploy_stage(root: Path, timeout_s: float = 900) -> dict:
    """``stages/deploy.py`` in ``root`` (as `dvc repro` runs it); its metrics/deploy.json."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, str(ROOT / "stages/deploy.py")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=timeout_s)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((root / "metrics/deploy.json").read_text())
