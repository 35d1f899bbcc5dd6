"""curation.engine: ray writes the local engine's bytes, on an embedded Ray and on a 2-node cluster.

The four curation stage scripts run as real subprocesses on demo-like tiny data (the end-to-end
test's three formats with PII, exact and near duplicates and bad lines, plus slices of the
bundled demo files): once with the local engine, once on Ray. Every record, reject, repair,
review, cluster, split and contamination file and every metrics file must be byte-identical.
The Ray run joins a 2-node Ray cluster on loopback (ray.cluster_utils.Cluster on 127.0.0.2,
started and stopped here) through curation.ray_address; one stage also runs on an embedded local Ray.
"""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from test_pipeline_e2e import tiny_raw

ray = pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parent.parent
STAGES = ["validate", "pii_scrub", "dedup", "split"]
OUTPUTS = [
    "data/validated/records.jsonl", "data/validated/rejects.jsonl", "data/validated/repairs.jsonl",
    "data/scrubbed/records.jsonl", "data/scrubbed/review.jsonl",
    "data/dedup/records.jsonl", "data/dedup/clusters.jsonl",
    "data/split/train.jsonl", "data/split/val.jsonl", "data/split/test.jsonl", "data/split/contamination.jsonl",
    "metrics/validate.json", "metrics/pii.json", "metrics/dedup.json", "metrics/data.json",
]

pytestmark = pytest.mark.slow


def demo_like(raw: Path) -> None:
    """The end-to-end test's tiny data plus the first lines of the bundled demo files."""
    tiny_raw(raw)
    for name, lines in (("support_chat.jsonl", 90), ("support_sharegpt.jsonl", 30), ("safety_chat.jsonl", 20)):
        head = (ROOT / "data/raw" / name).read_text(encoding="utf-8").splitlines(keepends=True)[:lines]
        (raw / f"demo_{name}").write_text("".join(head), encoding="utf-8")


def make_workdir(path: Path, **curation) -> Path:
    demo_like(path / "data" / "raw")
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    params["curation"].update(curation)
    params["pii"]["batch_size"] = 16  # several batches per actor
    params["split"]["contamination_threshold"] = 0.5  # some contamination pairs to compare
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    return path


def run_stages(workdir: Path, stages: list[str], env_extra: dict[str, str] | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # only where a test sets it
    env.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env_extra or {})})
    log = []
    for stage in stages:
        proc = subprocess.run([sys.executable, str(ROOT / "stages" / f"{stage}.py")], cwd=workdir, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{stage} failed:\n{proc.stderr[-4000:]}"
        log.append(proc.stderr)
    return "\n".join(log)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory) -> Path:
    work = make_workdir(tmp_path_factory.mktemp("local"), engine="local")
    run_stages(work, STAGES)
    return work


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    # 127.0.0.2: loopback, and not rewritten by Ray (it turns 127.0.0.1 into this machine's IP)
    loopback = {"node_ip_address": "127.0.0.2", "num_cpus": 1, "object_store_memory": 200 * 1024 * 1024}
    c = Cluster(initialize_head=True, head_node_args={**loopback, "include_dashboard": False})
    c.add_node(**loopback)
    c.wait_for_nodes()
    try:
        yield c
    finally:
        c.shutdown()


def assert_same_outputs(a: Path, b: Path) -> None:
    differ = [f for f in OUTPUTS if not filecmp.cmp(a / f, b / f, shallow=False)]
    assert not differ, f"ray and local outputs differ: {differ}"


def test_ray_on_a_two_node_cluster_writes_the_local_bytes(local_run, cluster, tmp_path):
    work = make_workdir(tmp_path, engine="ray", ray_address=cluster.address)
    log = run_stages(work, STAGES)
    assert "2 node(s), 2 CPUs" in log, log[-2000:]  # the stages ran on the cluster, not an embedded Ray
    assert_same_outputs(local_run, work)
    # the comparison has something to compare: rejects, PII, both kinds of duplicates, contamination
    v = json.loads((work / "metrics/validate.json").read_text())
    d = json.loads((work / "metrics/dedup.json").read_text())
    p = json.loads((work / "metrics/pii.json").read_text())
    data = json.loads((work / "metrics/data.json").read_text())
    assert v["records_rejected"] >= 2 and p["entities_total"] > 0 and p["review_sample"] > 0
    assert d["exact_duplicates_removed"] >= 1 and d["near_duplicates_removed"] >= 1
    assert data["contamination_pairs"] >= 1


def test_ray_address_from_the_environment(local_run, cluster, tmp_path):
    # curation.ray_address: null joins $RAY_ADDRESS when it is set
    work = make_workdir(tmp_path, engine="ray", ray_address=None)
    for f in ("data/scrubbed/records.jsonl",):
        (work / f).parent.mkdir(parents=True, exist_ok=True)
        (work / f).write_bytes((local_run / f).read_bytes())
    log = run_stages(work, ["dedup"], {"RAY_ADDRESS": cluster.address})
    assert "2 node(s), 2 CPUs" in log
    for f in ("data/dedup/records.jsonl", "data/dedup/clusters.jsonl", "metrics/dedup.json"):
        assert (work / f).read_bytes() == (local_run / f).read_bytes(), f


def test_embedded_ray_writes_the_local_bytes(local_run, tmp_path):
    # no address anywhere: the stage starts an embedded local Ray and stops it
    work = make_workdir(tmp_path, engine="ray", ray_address=None, num_cpus=2)
    (work / "data/dedup").mkdir(parents=True)
    (work / "data/dedup/records.jsonl").write_bytes((local_run / "data/dedup/records.jsonl").read_bytes())
    log = run_stages(work, ["split"])
    assert "1 node(s), 2 CPUs" in log
    for f in ("data/split/train.jsonl", "data/split/val.jsonl", "data/split/test.jsonl",
              "data/split/contamination.jsonl", "metrics/data.json"):
        assert (work / f).read_bytes() == (local_run / f).read_bytes(), f
