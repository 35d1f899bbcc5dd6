"""GTO registry: promotion with lineage, refusals (failed gate, dirty workspace, dvc status).

Every test runs gto/git against a temporary git repository it creates, never /work/main's git.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmpipe.config.serve import RegistrySection
from llmpipe.registry import PromotionRefused, Registry, promote
from llmpipe.registry.gto_cli import bump

ROOT = Path(__file__).resolve().parents[1]
SRC = str(ROOT / "src")
CFG = RegistrySection(artifact="model", model_path="models/gguf/model-q4_k_m.gguf", stage="canary",
                      prod_stage="prod", bump="minor", initial_version="v1.0.0", gate="metrics/gate.json",
                      eval_metrics="metrics/eval.json", data_metrics="metrics/data.json", check_dvc_status=False)


def repo_params() -> dict:
    """The repository's params.yaml with CFG as its registry section (the CLI validates every section)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"]["name_or_path"] = "embedded:smollm2-135m-instruct"
    params["registry"] = CFG.model_dump()
    return params
MODEL_MD5 = "0123456789abcdef0123456789abcdef"


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


def write(repo: Path, rel: str, obj) -> None:
    p = repo / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj, indent=1))


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    r = tmp_path / "pipe"
    r.mkdir()
    git(r, "init", "-q", "-b", "main")
    git(r, "config", "user.email", "ci@example.com")
    git(r, "config", "user.name", "CI")
    write(r, "params.yaml", yaml.safe_dump(repo_params()))
    write(r, "dvc.lock", yaml.safe_dump({"schema": "2.0", "stages": {
        "quantize": {"cmd": "python stages/quantize.py", "outs": [
            {"path": "models/gguf/model-q4_k_m.gguf", "hash": "md5", "md5": MODEL_MD5, "size": 1234}]},
        "merge": {"cmd": "python stages/merge.py", "outs": [
            {"path": "models/merged", "hash": "md5", "md5": "fedcba.dir", "size": 99, "nfiles": 5}]}}}))
    write(r, "metrics/data.json", {"dataset_version": "ds-5f2a9c", "counts": {"train": 80}})
    write(r, "metrics/eval.json", {"tuned": {"format_compliance": 0.97, "accuracy": 0.9}})
    write(r, "metrics/gate.json", {"passed": True, "checks": [{"name": "format_compliance", "passed": True}]})
    git(r, "add", "-A")
    git(r, "commit", "-qm", "pipeline run 1")
    return r


def cli(repo: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.run([sys.executable, "-m", "llmpipe.cli", "promote", "--repo", str(repo), *args],
                          capture_output=True, text=True, env=env, timeout=600)


def test_promote_registers_version_with_lineage(repo: Path) -> None:
    res = promote(repo, CFG)
    assert (res.version, res.stage, res.created) == ("v1.0.0", "canary", True)
    reg = Registry(repo)
    assert reg.stage_version("model", "canary") == "v1.0.0"
    assert "model@v1.0.0" in git(repo, "tag", "-l")
    # annotated tag, lineage JSON in its message
    assert git(repo, "cat-file", "-t", "model@v1.0.0").strip() == "tag"
    lin = reg.lineage("model", "v1.0.0")
    assert lin["git"]["commit"] == git(repo, "rev-parse", "HEAD").strip()
    assert lin["base_model"] == "embedded:smollm2-135m-instruct"
    assert lin["dataset_version"] == "ds-5f2a9c"
    assert lin["params"]["lora"] == repo_params()["lora"] and len(lin["params_sha256"]) == 64
    assert lin["metrics"]["gate"]["passed"] is True
    assert lin["metrics"]["eval"]["tuned"]["format_compliance"] == 0.97
    assert lin["model"]["dvc_lock"]["md5"] == MODEL_MD5
    assert lin["model"]["sha256"] is None          # the (DVC-managed) model file is not in this repo
    assert lin["artifacts"]["models/merged"]["nfiles"] == 5
    # gto show / history see the version and the stage
    show = json.loads(reg.gto("show", "model", "--json"))
    assert [v["version"] for v in show] == ["v1.0.0"]
    events = [e["event"] for e in reg.history("model")]
    assert "registration" in events and "assignment" in events


def test_second_commit_bumps_version_and_same_commit_reuses(repo: Path) -> None:
    assert promote(repo, CFG).version == "v1.0.0"
    again = promote(repo, CFG)
    assert (again.version, again.created) == ("v1.0.0", False)
    write(repo, "metrics/eval.json", {"tuned": {"format_compliance": 0.99}})
    git(repo, "commit", "-qam", "pipeline run 2")
    res = promote(repo, CFG)
    assert res.version == "v1.1.0" and res.created
    assert Registry(repo).stage_version("model", "canary") == "v1.1.0"
    assert [v.version for v in Registry(repo).versions("model")] == ["v1.0.0", "v1.1.0"]
    assert bump("v1.1.0", "patch") == "v1.1.1" and bump("v1.1.0", "major") == "v2.0.0"


def test_cli_refuses_failed_gate(repo: Path) -> None:
    write(repo, "metrics/gate.json", {"passed": False, "checks": [
        {"name": "format_compliance", "passed": False, "reason": "0.41 < 0.90"},
        {"name": "safety", "passed": True}]})
    git(repo, "commit", "-qam", "gate failed run")
    proc = cli(repo, "--skip-dvc-status")
    assert proc.returncode == 2, proc.stderr
    assert "the gate failed" in proc.stderr and "format_compliance (0.41 < 0.90)" in proc.stderr
    assert "safety" not in proc.stderr
    assert git(repo, "tag", "-l").strip() == ""


def test_cli_refuses_missing_gate(repo: Path) -> None:
    git(repo, "rm", "-q", "metrics/gate.json")
    git(repo, "commit", "-qm", "no gate")
    proc = cli(repo, "--skip-dvc-status")
    assert proc.returncode == 2 and "gate result not found" in proc.stderr


def test_cli_refuses_dirty_workspace_then_promotes_when_clean(repo: Path) -> None:
    write(repo, "params.yaml", (repo / "params.yaml").read_text() + "# a local edit\n")
    proc = cli(repo, "--skip-dvc-status")
    assert proc.returncode == 2
    assert "workspace differs from the committed pipeline" in proc.stderr and "params.yaml" in proc.stderr
    assert git(repo, "tag", "-l").strip() == ""
    git(repo, "commit", "-qam", "commit the change")
    proc = cli(repo, "--skip-dvc-status", "--version", "v2.0.0")
    assert proc.returncode == 0, proc.stderr
    assert "model@v2.0.0 registered; stage 'canary' assigned" in proc.stdout


@pytest.mark.slow
def test_refuses_when_dvc_outputs_differ_from_lock(tmp_path: Path) -> None:
    """A DVC output changed after `dvc repro` (git is clean: outputs are git-ignored)."""
    r = tmp_path / "dvcrepo"
    r.mkdir()
    git(r, "init", "-q", "-b", "main")
    git(r, "config", "user.email", "ci@example.com")
    git(r, "config", "user.name", "CI")
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "init", "-q"], cwd=r, check=True)
    write(r, "in.txt", "hello\n")
    write(r, "dvc.yaml", yaml.safe_dump({"stages": {"copy": {
        "cmd": f"{sys.executable} -c \"import shutil; shutil.copy('in.txt', 'out.txt')\"",
        "deps": ["in.txt"], "outs": ["out.txt"]}}}))
    write(r, "metrics/gate.json", {"passed": True, "checks": []})
    write(r, "params.yaml", "model: {name_or_path: x}\n")
    subprocess.run([*dvc, "repro", "-q"], cwd=r, check=True, capture_output=True)
    git(r, "add", "-A")
    git(r, "commit", "-qm", "run")
    cfg = CFG.model_copy(update={"check_dvc_status": True, "model_path": "out.txt"})
    assert promote(r, cfg).version == "v1.0.0"           # clean: allowed
    (r / "out.txt").write_text("tampered\n")
    assert git(r, "status", "--porcelain", "--untracked-files=no").strip() == ""
    with pytest.raises(PromotionRefused, match="dvc status is not clean"):
        promote(r, cfg, version="v1.1.0")
