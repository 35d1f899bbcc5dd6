"""End to end: the whole pipeline under real `dvc repro`, on tiny data and a tiny random Llama.

Every stage runs for real (validate, Presidio, MinHash, split, base-model, LoRA training, merge,
llama.cpp GGUF conversion + quantization, eval-base with lm-eval, eval, gate, deploy). The tiny
random model cannot pass the gate, so deploy must refuse to roll anything out: that is checked
too. Then `dvc exp run -S lora.r=8` must re-run only the stages downstream of training.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from test_pipeline_e2e import tiny_raw

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

TRAINING_AND_AFTER = ["deploy", "eval", "gate", "merge", "qlora-train", "quantize", "quantize-awq"]


def build_tiny_model(out: Path) -> None:
    """A 2-layer random Llama (hidden 64) with the real SmolLM2 tokenizer and chat template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmpipe.model.source import load_tokenizer

    tok = load_tokenizer("embedded:smollm2-135m-instruct")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)


def sh(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 1800) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def ran(stdout: str) -> list[str]:
    return sorted(line.split("'")[1] for line in stdout.splitlines() if line.startswith("Running stage"))


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    repo = tmp_path_factory.mktemp("full")
    for item in ("dvc.yaml", "params.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(ROOT / item, repo / item)
    for item in ("stages", "src", "scripts", "data/eval", "data/task"):
        shutil.copytree(ROOT / item, repo / item, ignore=shutil.ignore_patterns("__pycache__"))
    tiny_raw(repo / "data" / "raw")
    build_tiny_model(repo / "tiny-model")

    p = yaml.safe_load((repo / "params.yaml").read_text())
    p["model"]["name_or_path"] = "tiny-model"
    p["pii"]["workers"] = 1
    p["train"].update(max_steps=4, eval_steps=2, save_steps=2, logging_steps=1,
                      per_device_batch_size=2, cpu_threads=1)
    p["quantize"].update(types=["Q8_0"], ppl_max_examples=4, bench_tokens=8, reply_max_tokens=8)
    p["eval"].update(limit=4, max_new_tokens=8, batch_size=4, num_threads=1)
    p["eval"]["lm_eval"]["limit"] = 4
    p["eval"]["safety"]["max_new_tokens"] = 4
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))

    env = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"],
           "PYTHONPATH": str(repo / "src"), "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t", "DVC_NO_ANALYTICS": "1",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    dvc = [sys.executable, "-m", "dvc"]
    sh(["git", "init", "-q"], repo, env)
    sh(dvc + ["init", "-q"], repo, env)
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-qm", "init"], repo, env)
    first = sh(dvc + ["repro"], repo, env)
    return repo, env, first


def test_full_repro_runs_every_stage(project):
    repo, env, first = project
    assert ran(first.stdout) == sorted([
        "validate", "pii-scrub", "minhash-dedup", "split", "base-model", "qlora-train", "merge",
        "quantize", "quantize-awq", "eval-base", "eval", "gate", "deploy"])
    train = json.loads((repo / "metrics/train.json").read_text())
    assert train["mode"] in ("lora", "lora_fp32", "lora-fp32") or "lora" in str(train["mode"]).lower()
    merge = json.loads((repo / "metrics/merge.json").read_text())
    assert merge  # merge equivalence metrics are written
    q = json.loads((repo / "metrics/quantize.json").read_text())
    assert (repo / "models/gguf").is_dir() and any(p.suffix == ".gguf" for p in (repo / "models/gguf").iterdir())
    assert q
    gate = json.loads((repo / "metrics/gate.json").read_text())
    assert gate["passed"] is False  # a random tiny model must not pass
    assert (repo / "reports/gate.md").read_text().strip()
    deploy_log = (repo / "deploy/decisions.jsonl").read_text()
    assert "gate failed" in deploy_log  # nothing is rolled out behind a failing gate
    assert (repo / "dvclive/train/plots/metrics").is_dir()


def test_second_repro_is_a_noop(project):
    repo, env, _ = project
    proc = sh([sys.executable, "-m", "dvc", "repro"], repo, env)
    assert ran(proc.stdout) == []


def _lock_without_deploy_log(repo: Path) -> dict:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    # deploy/ is the deployment's own log (state, decisions with their timestamps): a forced
    # re-run appends to it by design; every other output must be byte-identical
    lock["stages"]["deploy"]["outs"] = [o for o in lock["stages"]["deploy"]["outs"] if o["path"] != "deploy"]
    return lock


def test_forced_rerun_gives_empty_metrics_diff_and_same_outputs(project):
    """Metrics hold results only (timings live in timings/): `dvc repro -f` changes nothing."""
    repo, env, _ = project
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-qm", "first run"], repo, env)
    before = _lock_without_deploy_log(repo)
    proc = sh([sys.executable, "-m", "dvc", "repro", "-f"], repo, env)
    assert "qlora-train" in ran(proc.stdout)
    diff = sh([sys.executable, "-m", "dvc", "metrics", "diff", "--json"], repo, env)
    assert json.loads(diff.stdout or "{}") == {}, diff.stdout
    after = _lock_without_deploy_log(repo)
    changed = [name for name in before["stages"] if before["stages"][name] != after["stages"].get(name)]
    detail = {name: {"before": before["stages"][name], "after": after["stages"].get(name)} for name in changed}
    assert not changed, f"a forced re-run changed the lock entries of {changed}:\n{yaml.safe_dump(detail)}"
    assert (repo / "timings" / "qlora-train.json").is_file() or any((repo / "timings").glob("*.json"))
    status = sh(["git", "status", "--porcelain", "--", "metrics", "reports", "dvclive"], repo, env).stdout
    assert status.strip() == "", status


def test_lora_rank_experiment_reruns_only_training_and_after(project):
    repo, env, _ = project
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-qm", "baseline run"], repo, env)
    proc = sh([sys.executable, "-m", "dvc", "exp", "run", "-S", "lora.r=8"], repo, env)
    assert ran(proc.stdout) == TRAINING_AND_AFTER
    diff = sh([sys.executable, "-m", "dvc", "metrics", "diff", "--json"], repo, env)
    assert "metrics/train.json" in diff.stdout
    # the PR-review flow of the README: eval and gate numbers side by side with the baseline run
    diff_all = json.loads(sh([sys.executable, "-m", "dvc", "metrics", "diff", "--all", "--json"],
                             repo, env).stdout)
    for name in ("metrics/eval.json", "metrics/gate.json"):
        assert name in diff_all, sorted(diff_all)
    assert "task.tuned.task_accuracy" in diff_all["metrics/eval.json"]
    assert "summary.safety_refusal_rate.passed" in diff_all["metrics/gate.json"]
    show = sh([sys.executable, "-m", "dvc", "exp", "show", "--json"], repo, env).stdout
    assert "metrics/gate.json" in show and "metrics/eval.json" in show and '"r": 8' in show
    out = repo / "plots_diff"
    sh([sys.executable, "-m", "dvc", "plots", "diff", "-o", str(out)], repo, env)
    html = (out / "index.html").read_text()
    assert "dvclive/train/plots/metrics" in html
