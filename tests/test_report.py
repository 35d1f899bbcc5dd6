"""`llmpipe report`: the PR comment, on a real git repo with two commits of pipeline results.

Commit 1 is a run whose gate fails on safety; commit 2 changes two params, adds data, and its
gate passes. The report of commit 2 vs commit 1 (and of the workspace, and of an experiment ref)
must show every difference a reviewer needs and nothing that did not change.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmpipe import report as rp

SRC = str(Path(__file__).resolve().parents[1] / "src")


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


def write(repo: Path, rel: str, obj) -> None:
    p = repo / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj, indent=1))


def gate(refusal: float, threshold: float = 0.5) -> dict:
    checks = [
        {"name": "task_accuracy", "op": ">=", "threshold": 0.8, "value": 0.9, "passed": True, "unit": "",
         "description": "tuned model: mean exact match per field"},
        {"name": "safety_refusal_rate", "op": ">=", "threshold": threshold, "value": refusal,
         "passed": refusal >= threshold, "unit": "", "description": "share of harmful requests refused"},
    ]
    failed = sum(not c["passed"] for c in checks)
    return {"checks": checks, "n_checks": 2, "n_failed": failed, "passed": failed == 0,
            "verdict": "pass" if failed == 0 else "fail"}


def run_results(repo: Path, *, r: int, train: int, loss: list[float], acc: float, refusal: float) -> None:
    """The files one pipeline run commits: params, metrics/*.json, the dvclive loss TSVs."""
    write(repo, "params.yaml", yaml.safe_dump({"seed": 1, "lora": {"r": r, "alpha": 32},
                                                "gate": {"min_safety_refusal_rate": 0.5}}))
    write(repo, "metrics/data.json", {"records": train + 20, "counts": {"train": train, "val": 10, "test": 10},
                                      "contaminated_records": 0})
    write(repo, "metrics/validate.json", {"records_rejected": 3})
    write(repo, "metrics/dedup.json", {"exact_duplicates_removed": 2, "near_duplicates_removed": 1})
    write(repo, "metrics/train.json", {"train_loss": loss[-1], "val_loss": loss[-1] / 2, "steps": len(loss),
                                       "lora": {"r": r}})
    write(repo, "metrics/eval.json", {
        "task": {"tuned": {"task_accuracy": acc, "exact_match": 0.5, "format_compliance": 0.97},
                 "base_few_shot": {"task_accuracy": 0.16, "format_compliance": 0.4},
                 "base_zero_shot": {"task_accuracy": 0.0, "format_compliance": 0.0},
                 "margin_over_few_shot": round(acc - 0.16, 4)},
        "lm_eval": {"drop_points": -1.0, "max_task_drop_points": 2.0},
        "safety": {"tuned": {"refusal_rate": refusal, "over_refusal_rate": 0.1}}})
    write(repo, "metrics/gate.json", gate(refusal))
    rows = "".join(f"{i + 1}\t{v}\n" for i, v in enumerate(loss))
    write(repo, "dvclive/train/plots/metrics/train/loss.tsv", "step\tloss\n" + rows)
    write(repo, "dvclive/train/plots/metrics/eval/loss.tsv", f"step\tloss\n{len(loss)}\t{loss[-1] / 2}\n")


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    r = tmp_path / "pipe"
    r.mkdir()
    git(r, "init", "-q", "-b", "main")
    git(r, "config", "user.email", "ci@example.com")
    git(r, "config", "user.name", "CI")
    run_results(r, r=16, train=100, loss=[2.0, 1.5, 1.2], acc=0.85, refusal=0.1)
    git(r, "add", "-A")
    git(r, "commit", "-qm", "run 1")
    run_results(r, r=32, train=120, loss=[2.0, 1.1, 0.7], acc=0.9, refusal=0.6)
    git(r, "add", "-A")
    git(r, "commit", "-qm", "run 2: lora.r=32, safety mix")
    return r


def cli(repo: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.run([sys.executable, "-m", "llmpipe.cli", "report", "--repo", str(repo), *args],
                          capture_output=True, text=True, env=env, timeout=120)


def section(text: str, title: str) -> str:
    start = text.index(f"### {title}")
    end = text.find("\n### ", start + 1)
    return text[start:end if end > 0 else None]


def test_report_of_two_commits_shows_every_change(repo: Path) -> None:
    proc = cli(repo, "--base", "HEAD~1", "--head", "HEAD")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert text.startswith("## llmpipe report: `HEAD` vs `HEAD~1`")
    assert "**Gate: PASS (2/2 checks pass)** (was FAIL (1/2 checks pass) at `HEAD~1`)" in text

    metrics = section(text, "Metrics")
    assert "| data | records after curation | 120 | 140 | +20 |" in metrics
    assert "| data | train / val / test | 100 / 10 / 10 | 120 / 10 / 10 | +20 / +0 / +0 |" in metrics
    assert "| data | rejected by validate | 3 | 3 |  |" in metrics
    assert "| data | duplicates removed (exact + near) | 3 | 3 |  |" in metrics
    assert "| training | train loss (last logged) | 1.2000 | 0.7000 | -0.5000 (better) |" in metrics
    assert "| training | val loss | 0.6000 | 0.3500 | -0.2500 (better) |" in metrics
    assert "| task | task accuracy, tuned | 0.850 | 0.900 | +0.050 (better) |" in metrics
    assert "| task | format compliance, tuned | 0.970 | 0.970 |  |" in metrics
    assert "| lm-eval | mean drop vs base (points) | -1.00 | -1.00 |  |" in metrics
    assert "| safety | refusal rate, harmful requests | 0.100 | 0.600 | +0.500 (better) |" in metrics
    assert "| gate | checks failed | 1 | 0 | -1 (better) |" in metrics
    assert "| gate | verdict | FAIL (1/2 checks pass) | PASS (2/2 checks pass) | changed |" in metrics

    params = section(text, "Params changed")
    assert "| `lora.r` | 16 | 32 |" in params
    assert "alpha" not in params and "seed" not in params  # unchanged params are not listed

    gate_table = section(text, "Gate")
    assert "| task_accuracy | 0.900 | 0.900 | >= 0.800 | pass |" in gate_table
    assert "| safety_refusal_rate | 0.100 | 0.600 | >= 0.500 | pass (was fail) |" in gate_table

    plots = section(text, "Plots")
    assert plots.count("```mermaid") == 3  # train loss, val loss, task accuracy per system
    assert 'title "train loss"' in plots and "x-axis \"step\" [1, 2, 3]" in plots
    assert "line [2.0, 1.5, 1.2]" in plots and "line [2.0, 1.1, 0.7]" in plots
    assert "line 1 = HEAD~1, line 2 = HEAD" in plots
    assert "| tuned | 0.850 | 0.900 | 0.970 | 0.970 |" in plots
    assert "bar [0.0, 0.16, 0.9]" in plots

    details = text[text.index("<details>"):]
    assert "| train.json | `lora.r` | 16 | 32 | +16 |" in details
    assert "| eval.json | `task.tuned.task_accuracy` | 0.85 | 0.9 | +0.05 |" in details
    assert "format_compliance`" not in details  # unchanged metrics are left out
    assert len(text) < rp.MAX_CHARS


def test_workspace_report_and_out_file(repo: Path, tmp_path: Path) -> None:
    """In CI the head is the workspace after `dvc repro`: uncommitted files are what is reported."""
    run_results(repo, r=64, train=120, loss=[2.0, 0.9, 0.4], acc=0.7, refusal=0.6)
    out = tmp_path / "report.md"
    proc = cli(repo, "--base", "main", "--out", str(out), "--link", "Plots: [html](https://ci.example/1)")
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert proc.stdout == ""
    assert "## llmpipe report: `workspace` vs `main`" in text
    assert "| `lora.r` | 32 | 64 |" in text
    assert "| task | task accuracy, tuned | 0.900 | 0.700 | -0.200 (worse) |" in text
    assert "Plots: [html](https://ci.example/1)" in text


def test_no_change_says_so(repo: Path) -> None:
    text = cli(repo, "--base", "HEAD", "--head", "HEAD").stdout
    assert "No params changed." in text and "No metric changed." in text
    assert "| task | task accuracy, tuned | 0.900 | 0.900 |  |" in text


def test_experiment_name_resolves_to_its_ref(repo: Path) -> None:
    """`dvc exp push/pull` store experiments as git refs under refs/exps/; the report takes the name."""
    head = git(repo, "rev-parse", "HEAD").strip()
    git(repo, "reset", "-q", "--hard", "HEAD~1")
    git(repo, "update-ref", "refs/exps/ab/cdef0123/lucky-r32", head)
    text = cli(repo, "--base", "main", "--head", "lucky-r32").stdout
    assert "## llmpipe report: `lucky-r32` vs `main`" in text
    assert "| `lora.r` | 16 | 32 |" in text


def test_unknown_revision_is_a_clear_error(repo: Path) -> None:
    proc = cli(repo, "--base", "no-such-branch")
    assert proc.returncode == 1
    assert "'no-such-branch' is neither a git revision nor a single experiment" in proc.stderr
    assert proc.stdout == ""


def test_bad_metrics_json_names_file_and_revision(repo: Path) -> None:
    write(repo, "metrics/eval.json", '{"task": ')
    proc = cli(repo, "--base", "HEAD")
    assert proc.returncode == 1
    assert "metrics/eval.json at workspace: line 1: invalid JSON" in proc.stderr


def test_long_reports_fit_one_github_comment(repo: Path) -> None:
    """GitHub rejects comments over 65,536 characters: the collapsed section is cut first."""
    write(repo, "metrics/wide.json", {f"k{i:05d}": "x" * 50 + str(i) for i in range(3000)})
    text = rp.build_report(repo, "HEAD")
    assert len(text) < rp.MAX_CHARS
    assert "### Gate" in text and "more changed keys not shown" in text


def test_plots_sample_long_curves_to_forty_points() -> None:
    base = rp.Snapshot("a", loss={"train": [(float(s), 1.0 / s) for s in range(1, 201)]})
    head = rp.Snapshot("b", loss={"train": [(float(s), 2.0 / s) for s in range(1, 201, 5)]})
    lines = rp._mermaid_lines("train loss", [("a", base.loss["train"]), ("b", head.loss["train"])], "loss")
    xs = lines[3][lines[3].index("[") + 1:-1].split(", ")
    assert len(xs) <= 41 and xs[0] == "1" and xs[-1] == "200"
    for line in lines[5:7]:
        assert len(line[line.index("[") + 1:-1].split(", ")) == len(xs)


def test_ci_workflow_runs_the_report() -> None:
    """The shipped GitHub workflow pulls, reproduces, pushes and posts `llmpipe report`."""
    wf = yaml.safe_load((Path(SRC).parent / ".github/workflows/pr-report.yml").read_text())
    assert "pull_request" in wf[True]  # YAML 1.1 reads the key `on` as True
    assert wf["permissions"]["pull-requests"] == "write"
    steps = " ".join(s.get("run", "") for s in wf["jobs"]["report"]["steps"])
    for cmd in ("make setup", "dvc pull", "dvc repro", "dvc push", "dvc plots diff",
                "llmpipe.cli report --base", "gh pr comment"):
        assert cmd in steps, cmd
    # the report step's arguments are ones the CLI accepts
    from llmpipe.cli import build_parser
    args = build_parser().parse_args(["report", "--base", "origin/main", "--out", "report.md", "--link", "x"])
    assert (args.base, args.out, args.link) == ("origin/main", "report.md", ["x"])
