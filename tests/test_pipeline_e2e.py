"""End to end: real `dvc repro` of the curation stages on tiny data in a throwaway git+DVC repo.

Checks that the pipeline runs, that a second `dvc repro` is a no-op, that
`dvc exp run -S dedup.threshold=...` re-runs only minhash-dedup and split, and that
`dvc metrics show` lists the data metrics.
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

ROOT = Path(__file__).resolve().parent.parent
SYSTEM = "You are a support triage assistant."
INTENTS = ["order_status", "refund_request", "cancel_order", "technical_issue"]
PRODUCTS = ["robot_vacuum", "e_reader", "coffee_maker", "wireless_earbuds"]

pytestmark = pytest.mark.slow


def reply(intent: str, product: str, urgency: str, order_id: str | None) -> str:
    return json.dumps({"intent": intent, "product": product, "urgency": urgency, "order_id": order_id},
                      separators=(", ", ": "))


def tiny_raw(raw: Path) -> None:
    """~60 records in all three formats, with PII, exact and near duplicates and two bad lines."""
    raw.mkdir(parents=True)
    names = ["Maria Gonzalez", "James Whitaker", "Aiko Tanaka", "Peter Novak", "Fatima Okafor"]
    chats = []
    for i in range(48):
        intent, product = INTENTS[i % 4], PRODUCTS[(i // 4) % 4]
        oid = f"KX{100000 + i * 7919 % 900000:06d}"
        user = (f"Hi, this is {names[i % 5]} (reach me at user{i}@example.com). "
                f"Message number {i}: my {product.replace('_', ' ')} order {oid} needs help with "
                f"{intent.replace('_', ' ')} -- variant {i * 37 % 101} of this note, thanks.")
        chats.append({"messages": [{"role": "system", "content": SYSTEM},
                                   {"role": "user", "content": user},
                                   {"role": "assistant", "content": reply(intent, product, "medium", oid)}],
                      "metadata": {"intent": intent}})
    lines = [json.dumps(c) for c in chats]
    lines.append(json.dumps(chats[3]))  # exact duplicate
    near = json.loads(json.dumps(chats[5]))
    near["messages"][1]["content"] = near["messages"][1]["content"].replace("thanks.", "thank you!")
    lines.append(json.dumps(near))  # near duplicate
    lines.append('{"messages": [{"role": "user"')  # malformed
    lines.append(json.dumps({"messages": [{"role": "user", "content": "hello?"},
                                          {"role": "assistant", "content": "ok"}]}))  # too short
    (raw / "chat.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    alpaca = [{"instruction": "Triage this support message.",
               "input": f"Alpaca message {i}: my e reader will not turn on at all since the update, "
                        f"serial batch {i * 13}.",
               "output": reply("technical_issue", "e_reader", "high", None)} for i in range(6)]
    (raw / "alpaca.json").write_text(json.dumps(alpaca, indent=2), encoding="utf-8")
    sharegpt = [{"conversations": [{"from": "system", "value": SYSTEM},
                                   {"from": "human", "value": f"ShareGPT note {i}: charge me twice for "
                                                              f"the coffee maker? call 415-555-01{i:02d}"},
                                   {"from": "gpt", "value": reply("billing_question", "coffee_maker", "medium", None)}]}
                for i in range(6)]
    (raw / "sharegpt.jsonl").write_text("\n".join(json.dumps(s) for s in sharegpt) + "\n", encoding="utf-8")


def sh(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def tiny_project(repo: Path) -> dict[str, str]:
    """A scratch copy of the pipeline (dvc.yaml, params, stages, src) over ``tiny_raw`` data in
    ``repo``, pii-scrub with one worker; returns the environment its commands run with."""
    repo.mkdir(parents=True, exist_ok=True)
    for item in ("dvc.yaml", "params.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(ROOT / item, repo / item)
    for item in ("stages", "src"):
        shutil.copytree(ROOT / item, repo / item, ignore=shutil.ignore_patterns("__pycache__"))
    tiny_raw(repo / "data" / "raw")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["pii"]["workers"] = 1
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"],
            "PYTHONPATH": str(repo / "src"), "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
            "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t", "DVC_NO_ANALYTICS": "1",
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    repo = tmp_path_factory.mktemp("pipeline")
    env = tiny_project(repo)
    dvc = [sys.executable, "-m", "dvc"]
    sh(["git", "init", "-q"], repo, env)
    sh(dvc + ["init", "-q"], repo, env)
    sh(dvc + ["remote", "add", "-d", "local", str(repo / "storage")], repo, env)
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-qm", "init"], repo, env)
    return repo, env


def _ran(stdout: str) -> list[str]:
    return sorted(line.split("'")[1] for line in stdout.splitlines() if line.startswith("Running stage"))


def test_repro_runs_curation_then_is_a_noop(project):
    repo, env = project
    dvc = [sys.executable, "-m", "dvc"]
    first = sh(dvc + ["repro", "split"], repo, env)
    assert _ran(first.stdout) == ["minhash-dedup", "pii-scrub", "split", "validate"]

    v = json.loads((repo / "metrics/validate.json").read_text())
    assert v["records_valid"] == 48 + 2 + 6 + 6
    assert v["rejected_by_reason"] == {"malformed_json": 1, "response_too_short": 1}
    pii = json.loads((repo / "metrics/pii.json").read_text())
    assert pii["records_in"] == pii["records_out"] == v["records_valid"]
    scrubbed = (repo / "data/scrubbed/records.jsonl").read_text()
    assert "@example.com" not in scrubbed and "<EMAIL_ADDRESS>" in scrubbed
    d = json.loads((repo / "metrics/dedup.json").read_text())
    assert d["exact_duplicates_removed"] >= 1 and d["near_duplicates_removed"] >= 1
    assert d["records_out"] == d["records_in"] - d["exact_duplicates_removed"] - d["near_duplicates_removed"]
    data = json.loads((repo / "metrics/data.json").read_text())
    counts = {k: len((repo / f"data/split/{k}.jsonl").read_text().splitlines()) for k in ("train", "val", "test")}
    assert sum(counts.values()) == d["records_out"]
    assert len(data["dataset_version"]) == 64

    second = sh(dvc + ["repro", "split"], repo, env)
    assert _ran(second.stdout) == []

    shown = sh(dvc + ["metrics", "show", "--json"], repo, env)
    metrics_files = set(json.loads(shown.stdout)[""]["data"].keys()) if shown.stdout.strip().startswith("{") else set()
    for name in ("metrics/validate.json", "metrics/pii.json", "metrics/dedup.json", "metrics/data.json"):
        assert name in metrics_files or name in shown.stdout


def test_changing_dedup_threshold_reruns_only_dedup_and_split(project):
    repo, env = project
    dvc = [sys.executable, "-m", "dvc"]
    sh(dvc + ["repro", "split"], repo, env)
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-qm", "baseline"], repo, env)
    proc = sh(dvc + ["exp", "run", "split", "-S", "dedup.threshold=0.9"], repo, env)
    assert _ran(proc.stdout) == ["minhash-dedup", "split"]
