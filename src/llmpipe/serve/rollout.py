"""One bounded canary rollout on loopback: the library behind ``stages/deploy.py``.

Reads the gate and the registry, picks stable (from the deployment state, or the bootstrap base
model on a fresh checkout) and canary (the pipeline's GGUF, labelled with the registry version
whose dvc.lock hash matches it), starts both llama.cpp engines and the router, drives generated
traffic until the controller promotes or rolls back (or the traffic budget is spent: rollback),
stops everything it started, applies the outcome to the registry and returns the metrics.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from llmpipe.io import read_json, sha256_file, write_json
from llmpipe.model.source import resolve
from llmpipe.serve.analysis import Thresholds
from llmpipe.serve.compliance import ReplyValidator
from llmpipe.serve.controller import CanaryController, public_release
from llmpipe.serve.engines import EngineProcess, LlamaCppSpec, free_port
from llmpipe.serve.router import Backend, Router, run_async
from llmpipe.serve.state import StateStore
from llmpipe.serve.traffic import drive, load_prompts


class DeployError(RuntimeError):
    """The deployment cannot run (missing model, bad params, engine failure)."""


def md5_file(path: str | Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def gguf_path(spec: str) -> str:
    """A GGUF path from a params value: a .gguf file or an ``embedded:`` model."""
    src = resolve(spec)
    if not src.is_gguf:
        raise DeployError(f"{spec}: the CPU engine needs a GGUF file (got an HF model directory)")
    return os.path.join(src.path, src.gguf_file)


def identify_version(root: Path, model: Path, artifact: str) -> tuple[str, bool, str]:
    """(version, registered, note): the registry version whose lineage hash matches ``model``."""
    from llmpipe.registry.gto_cli import GtoError, Registry

    md5, sha = md5_file(model), sha256_file(model)
    fallback = f"unregistered-{md5[:8]}"
    try:
        reg = Registry(root)
        versions = reg.versions(artifact)
        canary = reg.stage_version(artifact, "canary")
    except (GtoError, OSError) as exc:
        return fallback, False, f"registry not readable ({str(exc).splitlines()[0]})"
    matches = []
    for v in versions:
        try:
            info = reg.lineage(artifact, v.version).get("model") or {}
        except GtoError:
            continue
        # sha256 of the file taken at promotion, or the file's md5 recorded in dvc.lock
        if info.get("sha256") == sha or (info.get("dvc_lock") or {}).get("md5") == md5:
            matches.append(v.version)
    if not matches:
        return fallback, False, f"no registered {artifact} version has this model (sha256 {sha[:12]}); promote it first"
    best = canary if canary in matches else matches[-1]
    return best, True, f"{artifact}@{best} (model hash matches its lineage)"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _stable_release(prev: dict[str, Any] | None, cfg: dict[str, Any], root: Path) -> dict[str, Any]:
    if prev and prev.get("stable") and Path(root / prev["stable"]["model"]).is_file():
        return {k: prev["stable"][k] for k in ("version", "model", "sha256", "registered") if k in prev["stable"]}
    spec = cfg.get("bootstrap_stable", "embedded:smollm2-135m-instruct")
    path = gguf_path(spec)
    label = Path(spec).stem if spec.endswith(".gguf") else spec.replace("embedded:", "")
    return {"version": f"base-{_safe(label)}", "model": path,
            "sha256": sha256_file(path), "registered": False}


def _registry_apply(root: Path, rcfg: dict[str, Any], state: dict[str, Any], action: str) -> dict[str, Any]:
    from llmpipe.registry.gto_cli import Registry

    reg = Registry(root)
    artifact = rcfg.get("artifact", "model")
    if action == "promote":
        rel = state["stable"]
        if not rel.get("registered"):
            return {"skipped": f"{rel['version']} is not a registered version"}
        stage = rcfg.get("prod_stage", "prod")
        reg.assign(artifact, rel["version"], stage, f"deploy: canary {rel['version']} passed every step")
        canary_stage = rcfg.get("stage", "canary")
        if reg.stage_version(artifact, canary_stage) == rel["version"]:
            reg.unassign(artifact, rel["version"], canary_stage, f"deploy: {rel['version']} graduated to {stage}")
        return {"assigned": stage, "version": rel["version"]}
    rel = state.get("canary") or {}
    if not rel.get("registered"):
        return {"skipped": f"{rel.get('version')} is not a registered version"}
    stage = rcfg.get("stage", "canary")
    if reg.stage_version(artifact, stage) != rel["version"]:
        return {"skipped": f"{artifact}@{rel['version']} is not assigned to {stage}"}
    reg.unassign(artifact, rel["version"], stage, f"deploy: rolled back {rel['version']}")
    return {"unassigned": stage, "version": rel["version"]}


def _finish(metrics_path: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    write_json(metrics_path, metrics)
    return metrics


def run_deploy(params: dict[str, Any], root: str | Path = ".", *, state_path: str = "deploy/state.json",
               log_path: str = "deploy/decisions.jsonl", releases_dir: str = "deploy/releases",
               metrics_path: str = "metrics/deploy.json", work_dir: str = "deploy/logs") -> dict[str, Any]:
    root = Path(root)
    cfg, scfg = params.get("deploy") or {}, params.get("serve") or {}
    rcfg = params.get("registry") or {}
    tcfg = cfg.get("traffic") or {}
    store = StateStore(root / state_path, root / log_path)
    t_start = time.monotonic()
    metrics: dict[str, Any] = {"decision": None, "client_failures": 0}

    gate_file = root / rcfg.get("gate", "metrics/gate.json")
    gate = read_json(gate_file) if gate_file.is_file() else None
    if not gate or gate.get("passed") is not True:
        why = "gate file missing" if gate is None else "gate failed"
        store.log({"event": "skip", "reasons": [f"{gate_file}: {why}; nothing is deployed"]})
        return _finish(root / metrics_path, {**metrics, "decision": "skipped", "reason": why})

    if scfg.get("engine", "llamacpp") != "llamacpp":
        raise DeployError(f"serve.engine={scfg.get('engine')!r}: the deploy stage runs the CPU engine (llamacpp); "
                          "on GPU start vLLM with `llmpipe.cli serve --engine vllm` and run "
                          "`llmpipe.cli router --control` in front of it")
    model = root / cfg.get("model", "models/gguf/support-triage-q4_k_m.gguf")
    if not model.is_file():
        raise DeployError(f"{model}: the pipeline's GGUF model is missing (run the quantize stage)")
    canary_sha = sha256_file(model)
    version, registered, note = identify_version(root, model, rcfg.get("artifact", "model"))
    print(f"[deploy] canary {version}: {note}", file=sys.stderr)
    prev = store.load()
    stable = _stable_release(prev, cfg, root)
    canary = {"version": version, "model": str(model.relative_to(root) if not model.is_absolute() else model),
              "sha256": canary_sha, "registered": registered}
    metrics.update(stable_version=stable["version"], canary_version=version, registry_note=note)

    if stable["sha256"] == canary_sha:
        store.log({"event": "noop", "stable": stable["version"], "canary": version,
                   "reasons": ["the pipeline's model is already the stable version"]})
        result: dict[str, Any] = {"decision": "noop"}
        if registered and prev and prev.get("phase") == "promoted" and cfg.get("update_registry", True):
            # Rolled out before it was promoted (labelled unregistered-<md5>): record it as the
            # registered version now, and assign prod, without a second rollout.
            prev["stable"].update(version=version, registered=True)
            store.save(prev)
            result["registry"] = _registry_apply(root, rcfg, prev, "promote")
            store.log({"event": "registry", "action": "promote", "result": result["registry"],
                       "reasons": [f"stable model is {note}"]})
        return _finish(root / metrics_path, {**metrics, **result})
    if prev and prev.get("phase") == "rolled_back" and (prev.get("canary") or {}).get("sha256") == canary_sha:
        store.log({"event": "noop", "stable": stable["version"], "canary": version,
                   "reasons": ["this exact model was already rolled back; build a new one to retry"]})
        return _finish(root / metrics_path, {**metrics, "decision": "noop_rolled_back"})

    thresholds = Thresholds.from_params(cfg.get("thresholds") or {})
    validator = ReplyValidator.from_file(root / cfg.get("reply_schema", "data/task/support_triage.schema.json"))
    prompts = load_prompts(root / cfg.get("prompts", "data/split/test.jsonl"),
                           limit=tcfg.get("max_prompts"), system_prompt=(params.get("validate") or {}).get("default_system_prompt"))
    host = scfg.get("host", "127.0.0.1")
    engines: list[EngineProcess] = []
    try:
        for role, rel in (("stable", stable), ("canary", canary)):
            key = secrets.token_hex(16)
            path = rel["model"] if os.path.isabs(rel["model"]) else str(root / rel["model"])
            spec = LlamaCppSpec(model=path, host=host, port=free_port(host), api_key=key,
                                served_model=rel["version"], n_ctx=int(scfg.get("n_ctx", 2048)),
                                n_threads=scfg.get("n_threads"))
            eng = EngineProcess(spec, root / work_dir / f"{role}.log", name=f"{role} engine ({rel['version']})")
            engines.append(eng.start())
            rel.update(url=eng.url, served_model=rel["version"], api_key=key)
        for eng in engines:
            eng.wait_healthy(float(scfg.get("startup_timeout_s", 180)))

        ctl = CanaryController.open(store, thresholds, stable=stable, canary=canary,
                                    steps=cfg.get("steps", [0.25, 0.5, 1.0]),
                                    baseline_size=int(cfg.get("baseline_size", 200)))
        router = Router(Backend(stable["version"], stable["url"]), None, validator=validator,
                        public_model=scfg.get("public_model", "llmpipe"),
                        timeout_s=float(scfg.get("timeout_s", 300)),
                        canary_timeout_s=float(scfg.get("canary_timeout_s", 60)))
        ctl.attach(router)
        traffic = run_async(_drive_rollout(router, ctl, prompts, host, tcfg))
        if not ctl.finished.is_set():
            ctl.abort(f"traffic budget spent ({traffic.sent} requests, {traffic.duration_s:.0f}s) "
                      f"before step {ctl.state['step'] + 1}/{len(ctl.state['steps'])} was decided")
    finally:
        for eng in engines:
            eng.stop()

    state = ctl.state
    action = "promote" if state["phase"] == "promoted" else "rollback"
    if action == "promote":
        rel_dir = root / releases_dir
        rel_dir.mkdir(parents=True, exist_ok=True)
        dest = rel_dir / f"{_safe(state['stable']['version'])}.gguf"
        tmp = dest.with_name("." + dest.name + ".tmp")
        shutil.copyfile(model, tmp)
        os.replace(tmp, dest)
        for old in rel_dir.glob("*.gguf"):
            if old != dest:
                old.unlink()
        state["stable"]["model"] = str(dest.relative_to(root))
        store.save(state)
    registry_result: dict[str, Any] = {"skipped": "deploy.update_registry is false"}
    if cfg.get("update_registry", True):
        try:
            registry_result = _registry_apply(root, rcfg, state, action)
        except Exception as exc:  # recorded, then re-raised after metrics are written
            registry_result = {"error": str(exc)}
        store.log({"event": "registry", "action": action, "result": registry_result})
    decisions = [d for d in store.decisions() if d.get("event") in ("roll_forward", "promote", "rollback")]
    metrics.update(
        decision="promoted" if action == "promote" else "rolled_back",
        steps=state["steps"], steps_passed=state["step"] + (1 if action == "promote" else 0),
        requests=traffic.sent, client_failures=traffic.failed, client_failure_examples=traffic.failures[:5],
        canary_requests=router.counts["canary"], canary_retried_on_stable=router.counts["retries"],
        served_by=traffic.by_version, final_numbers=(decisions[-1].get("numbers") if decisions else None),
        final_reasons=(decisions[-1].get("reasons") if decisions else None),
        registry=registry_result, duration_s=round(time.monotonic() - t_start, 1),
        stable=public_release(state.get("stable")), canary=public_release(state.get("canary")),
    )
    _finish(root / metrics_path, metrics)
    if "error" in registry_result:
        raise DeployError(f"deploy decided '{action}' but the registry update failed: {registry_result['error']}")
    return metrics


async def _drive_rollout(router: Router, ctl: CanaryController, prompts: list, host: str, tcfg: dict):
    port = await router.start(host, 0)
    try:
        return await drive(f"http://{host}:{port}", prompts,
                           concurrency=int(tcfg.get("concurrency", 4)),
                           max_requests=tcfg.get("max_requests", 400),
                           max_seconds=float(tcfg.get("max_seconds", 300)),
                           stop=ctl.finished, max_tokens=int(tcfg.get("max_tokens", 64)))
    finally:
        await router.stop()
