"""The deploy stage's library: one canary rollout, decided on measured requests.

``run_deploy`` runs four named steps:

1. ``gate_blocker``: nothing is deployed unless metrics/gate.json says the gate passed;
2. ``identify_canary`` / ``stable_release``: which model is the canary (the pipeline's GGUF for
   llama.cpp; for vLLM the merged HF model dir or the LoRA adapter dir, ``deploy.vllm.model``),
   labelled with the registry version whose lineage hash matches it, and which is stable (the
   deployment state, or the bootstrap model on a fresh checkout);
3. the rollout itself:
   - ``deploy.target: local`` (``rehearse``): start the engines ``serve.engine`` names (llama.cpp:
     one per GGUF; vLLM: one per HF model dir, a LoRA adapter joins its base model's server) and
     the router on loopback, drive generated traffic until the controller promotes or rolls back
     (or the traffic budget is spent: rollback), stop everything;
   - ``deploy.target: <URL>``: a live rollout on a running serve-stack (``llmpipe.serve.live``);
4. ``update_registry``: promote => assign ``registry.prod_stage``; rollback => unassign the canary.

The result separates what reviewers diff (``metrics``) from wall-clock and traffic-dependent
numbers (``timings``); the decision log keeps every decision with its numbers.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmpipe.config.serve import DeploySection, RegistrySection, ServeSection
from llmpipe.io import read_json, sha256_file
from llmpipe.model.source import resolve
from llmpipe.serve.compliance import ReplyValidator
from llmpipe.serve.controller import CanaryController
from llmpipe.serve.engines import EngineProcess, start_release_engines
from llmpipe.serve.router import Backend, Router, run_async
from llmpipe.serve.state import StateStore
from llmpipe.serve.traffic import TrafficResult, drive, load_prompts
from llmpipe.serve.vllm_engine import VllmError, model_dir_sha256


class DeployError(RuntimeError):
    """The deployment cannot run (missing model, bad params, engine failure, refused target)."""


@dataclass(frozen=True)
class DeployPaths:
    """Where the deploy stage keeps its state, relative to the repository root."""

    state: str = "deploy/state.json"
    log: str = "deploy/decisions.jsonl"
    releases: str = "deploy/releases"
    work: str = "deploy/logs"


@dataclass
class DeployResult:
    metrics: dict[str, Any]                                  # results: metrics/deploy.json
    timings: dict[str, Any] = field(default_factory=dict)    # wall clock, request counts: timings/deploy.json
    error: str | None = None                                 # decided, but the registry update failed


def md5_file(path: str | Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def dvc_dir_md5(path: str | Path) -> str:
    """DVC 3's hash of a directory output, as dvc.lock records it (``<md5>.dir``): the md5 of the
    sorted ``[{"md5": file md5, "relpath": ...}]`` list as JSON."""
    root = Path(path)
    entries = sorted(({"md5": md5_file(p), "relpath": p.relative_to(root).as_posix()}
                      for p in root.rglob("*") if p.is_file()), key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() + ".dir"


def release_sha256(path: str | Path) -> str:
    """A release's identity: the file's sha256 (GGUF), or the content hash of a model/adapter dir."""
    return model_dir_sha256(path) if Path(path).is_dir() else sha256_file(path)


def canary_model(deploy: DeploySection, serve: ServeSection) -> str:
    """The pipeline's model the engine serves: the GGUF (llama.cpp) or an HF/adapter dir (vLLM)."""
    return deploy.vllm.model if serve.engine == "vllm" else deploy.model


def serves(serve: ServeSection, path: Path) -> bool:
    """Whether ``serve.engine`` can serve this release model (a GGUF file / an HF or adapter dir)."""
    return path.is_dir() if serve.engine == "vllm" else path.is_file()


def gguf_path(spec: str) -> str:
    """A GGUF path from a params value: a .gguf file or an ``embedded:`` model."""
    src = resolve(spec)
    if not src.is_gguf:
        raise DeployError(f"{spec}: the CPU engine needs a GGUF file (got an HF model directory)")
    return os.path.join(src.path, src.gguf_file)


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


# -- step 1: the gate ------------------------------------------------------------------------
def gate_blocker(root: Path, registry: RegistrySection) -> str | None:
    """Why nothing may be deployed (gate file missing or failed), or None."""
    gate_file = root / registry.gate
    gate = read_json(gate_file) if gate_file.is_file() else None
    if gate is None:
        return f"{registry.gate}: gate file missing"
    if gate.get("passed") is not True:
        return f"{registry.gate}: gate failed"
    return None


# -- step 2: which versions ------------------------------------------------------------------
def identify_version(root: Path, model: Path, artifact: str, canary_stage: str) -> tuple[str, bool, str]:
    """(version, registered, note): the registry version whose lineage hash matches ``model``.

    A file (GGUF) matches the artifact's sha256 taken at promotion or its md5 in dvc.lock; a
    directory (vLLM: merged model, LoRA adapter) matches the DVC hash of any output recorded in
    the version's lineage (its dvc.lock outputs, e.g. ``models/merged``).
    """
    from llmpipe.registry.gto_cli import GtoError, Registry

    is_dir = model.is_dir()
    md5, sha = (dvc_dir_md5(model), model_dir_sha256(model)) if is_dir else (md5_file(model), sha256_file(model))
    fallback = f"unregistered-{md5[:8]}"
    try:
        reg = Registry(root)
        versions = reg.versions(artifact)
        canary = reg.stage_version(artifact, canary_stage)
    except (GtoError, OSError) as exc:
        return fallback, False, f"registry not readable ({str(exc).splitlines()[0]})"
    matches = []
    for v in versions:
        try:
            lineage = reg.lineage(artifact, v.version)
        except GtoError:
            continue
        info = lineage.get("model") or {}
        if is_dir:  # the DVC hash of a directory output of that pipeline run
            if any((out or {}).get("md5") == md5 for out in (lineage.get("artifacts") or {}).values()):
                matches.append(v.version)
        # sha256 of the file taken at promotion, or the file's md5 recorded in dvc.lock
        elif info.get("sha256") == sha or (info.get("dvc_lock") or {}).get("md5") == md5:
            matches.append(v.version)
    if not matches:
        return fallback, False, f"no registered {artifact} version has this model (sha256 {sha[:12]}); promote it first"
    best = canary if canary in matches else matches[-1]
    return best, True, f"{artifact}@{best} (model hash matches its lineage)"


def identify_canary(root: Path, deploy: DeploySection, registry: RegistrySection,
                    serve: ServeSection) -> tuple[dict[str, Any], str]:
    """The canary release (the pipeline's GGUF, or HF/adapter dir for vLLM) and a note on how its
    version was identified."""
    rel_path = canary_model(deploy, serve)
    model = root / rel_path
    if not serves(serve, model):
        what = ("HF model or LoRA adapter directory (deploy.vllm.model; run the merge / qlora-train stage)"
                if serve.engine == "vllm" else "GGUF model (run the quantize stage)")
        raise DeployError(f"{model}: the pipeline's {what} is missing")
    version, registered, note = identify_version(root, model, registry.artifact, registry.stage)
    print(f"[deploy] canary {version}: {note}", file=sys.stderr)
    return {"version": version, "model": rel_path, "sha256": release_sha256(model), "registered": registered}, note


def stable_release(prev: dict[str, Any] | None, deploy: DeploySection, root: Path,
                   serve: ServeSection) -> dict[str, Any]:
    """The deployed stable release (from the state) if ``serve.engine`` can serve it, else the
    bootstrap model (a fresh checkout, or the engine changed: a GGUF stable cannot run on vLLM)."""
    if prev and prev.get("stable") and serves(serve, Path(root / prev["stable"]["model"])):
        return {k: prev["stable"][k] for k in ("version", "model", "sha256", "registered") if k in prev["stable"]}
    if serve.engine == "vllm":
        spec = deploy.vllm.bootstrap_stable
        if not (root / spec).is_dir():
            raise DeployError(f"{root / spec}: the bootstrap stable model dir (deploy.vllm.bootstrap_stable) "
                              "is missing (run the base-model stage)")
        label = safe_name(spec.strip("/").replace("/", "-"))
        return {"version": f"base-{label}", "model": spec, "sha256": model_dir_sha256(root / spec),
                "registered": False}
    spec = deploy.bootstrap_stable
    path = gguf_path(spec)
    label = Path(spec).stem if spec.endswith(".gguf") else spec.replace("embedded:", "")
    return {"version": f"base-{safe_name(label)}", "model": path, "sha256": sha256_file(path), "registered": False}


# -- step 3 (local): the rehearsal -----------------------------------------------------------
def settle_without_rollout(store: StateStore, prev: dict[str, Any] | None, stable: dict[str, Any],
                           canary: dict[str, Any], note: str, deploy: DeploySection, registry: RegistrySection,
                           root: Path) -> dict[str, Any] | None:
    """The outcome when no rollout is needed (None when one is)."""
    version = canary["version"]
    if stable["sha256"] == canary["sha256"]:
        store.log({"event": "noop", "stable": stable["version"], "canary": version,
                   "reasons": ["the pipeline's model is already the stable version"]})
        result: dict[str, Any] = {"decision": "noop"}
        if canary["registered"] and prev and prev.get("phase") == "promoted" and deploy.update_registry:
            # Rolled out before it was promoted (labelled unregistered-<md5>): record it as the
            # registered version now, and assign prod, without a second rollout.
            prev["stable"].update(version=version, registered=True)
            store.save(prev)
            result["registry"] = apply_to_registry(root, registry, prev, "promote")
            store.log({"event": "registry", "action": "promote", "result": result["registry"],
                       "reasons": [f"stable model is {note}"]})
        return result
    if prev and prev.get("phase") == "rolled_back" and (prev.get("canary") or {}).get("sha256") == canary["sha256"]:
        store.log({"event": "noop", "stable": stable["version"], "canary": version,
                   "reasons": ["this exact model was already rolled back; build a new one to retry"]})
        return {"decision": "noop_rolled_back"}
    return None


def start_engines(stable: dict[str, Any], canary: dict[str, Any], deploy: DeploySection, serve: ServeSection,
                  root: Path, work_dir: Path) -> list[EngineProcess]:
    """The engines for both releases (``engines.start_release_engines``: own port and key per
    engine; vLLM LoRA adapters on one ``deploy.vllm.lora_base`` server), healthy; fills each
    release's url/served_model/api_key. Model paths stay as given in the releases (the state)."""
    def absolute(path: str) -> str:
        return path if os.path.isabs(path) else str(root / path)

    started = {role: {**rel, "model": absolute(rel["model"])} for role, rel in (("stable", stable), ("canary", canary))}
    lora_base = absolute(deploy.vllm.lora_base) if serve.engine == "vllm" else None
    try:
        engines = start_release_engines(serve, started["stable"], started["canary"], work_dir, lora_base=lora_base)
    except VllmError as exc:  # an adapter the server refused (e.g. rank above serve.vllm.max_lora_rank)
        raise DeployError(str(exc)) from exc
    for role, rel in (("stable", stable), ("canary", canary)):
        rel.update({k: started[role][k] for k in ("url", "served_model", "api_key")})
    return engines


def rehearse(store: StateStore, stable: dict[str, Any], canary: dict[str, Any], deploy: DeploySection,
             serve: ServeSection, system_prompt: str | None, root: Path, work_dir: Path
             ) -> tuple[CanaryController, Router, TrafficResult]:
    """Engines + router + controller on loopback, generated traffic until a decision or the budget."""
    validator = ReplyValidator.from_file(root / deploy.reply_schema)
    prompts = load_prompts(root / deploy.prompts, system_prompt=system_prompt)
    engines = start_engines(stable, canary, deploy, serve, root, work_dir)
    try:
        ctl = CanaryController.open(store, deploy.thresholds, stable=stable, canary=canary,
                                    steps=deploy.steps, baseline_size=deploy.baseline_size)
        router = Router(Backend(stable["version"], stable["url"]), None, validator=validator,
                        public_model=serve.public_model, timeout_s=serve.timeout_s,
                        canary_timeout_s=serve.canary_timeout_s)
        ctl.attach(router)
        traffic = run_async(_drive_rollout(router, ctl, prompts, serve.host, deploy))
        if not ctl.finished.is_set():
            ctl.abort(f"traffic budget spent ({traffic.sent} requests, {traffic.duration_s:.0f}s) "
                      f"before step {ctl.state['step'] + 1}/{len(ctl.state['steps'])} was decided")
    finally:
        for eng in engines:
            eng.stop()
    return ctl, router, traffic


async def _drive_rollout(router: Router, ctl: CanaryController, prompts: list, host: str,
                         deploy: DeploySection) -> TrafficResult:
    port = await router.start(host, 0)
    t = deploy.traffic
    try:
        return await drive(f"http://{host}:{port}", prompts, concurrency=t.concurrency,
                           max_requests=t.max_requests, max_seconds=t.max_seconds,
                           stop=ctl.finished, max_tokens=t.max_tokens)
    finally:
        await router.stop()


def keep_release(store: StateStore, state: dict[str, Any], model: Path, root: Path, releases_dir: Path) -> None:
    """Copy the promoted model into deploy/releases/ (the next run's stable), drop older ones.

    A GGUF becomes ``<version>.gguf``; a directory (vLLM: merged model or LoRA adapter) is copied
    whole to ``<version>/``. Copied to a hidden temporary name first, then renamed into place.
    """
    releases_dir.mkdir(parents=True, exist_ok=True)
    name = safe_name(state["stable"]["version"])
    if model.is_dir():
        dest = releases_dir / name
        tmp = releases_dir / f".{name}.tmp"
        _remove(tmp)
        shutil.copytree(model, tmp)
        _remove(dest)
    else:
        dest = releases_dir / f"{name}.gguf"
        tmp = dest.with_name("." + dest.name + ".tmp")
        shutil.copyfile(model, tmp)
    os.replace(tmp, dest)
    for old in releases_dir.iterdir():   # older releases of either engine
        if old != dest:
            _remove(old)
    state["stable"]["model"] = str(dest.relative_to(root))
    store.save(state)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


# -- step 4: the registry --------------------------------------------------------------------
def apply_to_registry(root: Path, registry: RegistrySection, state: dict[str, Any], action: str) -> dict[str, Any]:
    """promote: assign prod (and retire the canary stage); rollback: unassign the canary stage."""
    from llmpipe.registry.gto_cli import Registry

    reg = Registry(root)
    artifact = registry.artifact
    if action == "promote":
        rel = state["stable"]
        if not rel.get("registered"):
            return {"skipped": f"{rel['version']} is not a registered version"}
        if reg.stage_version(artifact, registry.prod_stage) != rel["version"]:
            reg.assign(artifact, rel["version"], registry.prod_stage,
                       f"deploy: canary {rel['version']} passed every step")
        if reg.stage_version(artifact, registry.stage) == rel["version"]:
            reg.unassign(artifact, rel["version"], registry.stage,
                         f"deploy: {rel['version']} graduated to {registry.prod_stage}")
        return {"assigned": registry.prod_stage, "version": rel["version"]}
    rel = state.get("canary") or {}
    if not rel.get("registered"):
        return {"skipped": f"{rel.get('version')} is not a registered version"}
    if reg.stage_version(artifact, registry.stage) != rel["version"]:
        return {"skipped": f"{artifact}@{rel['version']} is not assigned to {registry.stage}"}
    reg.unassign(artifact, rel["version"], registry.stage, f"deploy: rolled back {rel['version']}")
    return {"unassigned": registry.stage, "version": rel["version"]}


def update_registry(store: StateStore, root: Path, registry: RegistrySection, deploy: DeploySection,
                    state: dict[str, Any], action: str) -> dict[str, Any]:
    """Apply the decision to the registry (unless disabled); a failure is returned, not raised."""
    if not deploy.update_registry:
        return {"skipped": "deploy.update_registry is false"}
    try:
        result = apply_to_registry(root, registry, state, action)
    except Exception as exc:  # recorded; the stage fails after writing its metrics
        result = {"error": str(exc)}
    store.log({"event": "registry", "action": action, "result": result})
    return result


def window_summary(numbers: dict[str, Any] | None) -> dict[str, Any] | None:
    """The last decision's result numbers without latencies (those are timings)."""
    if not numbers:
        return None
    return {role: {k: (numbers.get(role) or {}).get(k) for k in ("error_rate", "compliance")}
            for role in ("canary", "stable")}


# -- the stage -------------------------------------------------------------------------------
def run_deploy(deploy: DeploySection, serve: ServeSection, registry: RegistrySection, *,
               system_prompt: str | None, root: str | Path = ".", paths: DeployPaths = DeployPaths(),
               target: str | None = None) -> DeployResult:
    """One deployment decision: gate, versions, rollout (``target``, default ``deploy.target``), registry."""
    root = Path(root)
    target = target or deploy.target
    store = StateStore(root / paths.state, root / paths.log)
    blocker = gate_blocker(root, registry)
    if blocker:
        store.log({"event": "skip", "reasons": [f"{blocker}; nothing is deployed"]})
        return DeployResult({"decision": "skipped", "reason": blocker, "client_failures": 0})
    if target != "local":
        from llmpipe.serve.live import run_live

        return run_live(target, deploy, serve, registry, root=root, store=store)
    t_start = time.monotonic()
    canary, note = identify_canary(root, deploy, registry, serve)
    prev = store.load()
    stable = stable_release(prev, deploy, root, serve)
    metrics: dict[str, Any] = {"stable_version": stable["version"], "canary_version": canary["version"],
                               "registry_note": note, "client_failures": 0}
    settled = settle_without_rollout(store, prev, stable, canary, note, deploy, registry, root)
    if settled is not None:
        return DeployResult({**metrics, **settled}, error=_registry_error(settled.get("registry")))

    ctl, router, traffic = rehearse(store, stable, canary, deploy, serve, system_prompt, root, root / paths.work)
    state = ctl.state
    action = "promote" if state["phase"] == "promoted" else "rollback"
    if action == "promote":
        keep_release(store, state, root / canary_model(deploy, serve), root, root / paths.releases)
    registry_result = update_registry(store, root, registry, deploy, state, action)
    last = next((d for d in reversed(store.decisions()) if d.get("event") in ("roll_forward", "promote", "rollback")),
                {})
    metrics.update(
        decision="promoted" if action == "promote" else "rolled_back",
        steps=state["steps"], steps_passed=state["step"] + (1 if action == "promote" else 0),
        client_failures=traffic.failed, final_window=window_summary(last.get("numbers")), registry=registry_result,
    )
    timings = {"duration_s": round(time.monotonic() - t_start, 1), "requests": traffic.sent,
               "served_by": dict(sorted(traffic.by_version.items())), "canary_requests": router.counts["canary"],
               "canary_retried_on_stable": router.counts["retries"], "client_failure_examples": traffic.failures[:5],
               "final_numbers": last.get("numbers"), "final_reasons": last.get("reasons")}
    return DeployResult(metrics, timings, error=_registry_error(registry_result))


def _registry_error(result: dict[str, Any] | None) -> str | None:
    if result and "error" in result:
        return f"the decision was made but the registry update failed: {result['error']}"
    return None
