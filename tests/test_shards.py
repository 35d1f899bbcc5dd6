"""curation.shards: records outputs as a directory of JSONL shards, same bytes as the single file.

Unit tests of the writer (llmpipe.io.write_records) and the reader (llmpipe.data.records), then a
real DVC run of validate..split with curation.shards 1 and 3 in a throwaway git+DVC project:
the split outputs and every metrics file are identical, the shards concatenated are the single
files, and DVC tracks the sharded outputs as directory outs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmpipe.data.records import iter_records, read_records
from llmpipe.io import shard_sizes, write_jsonl, write_records

ROOT = Path(__file__).resolve().parent.parent


def _recs(n: int) -> list[dict]:
    return [{"id": f"r{i}", "messages": [{"role": "user", "content": f"héllo {i}"}], "metadata": {"k": i}}
            for i in range(n)]


def test_shard_sizes_are_contiguous_and_balanced():
    assert shard_sizes(10, 3) == [3, 3, 4]
    assert shard_sizes(2, 4) == [0, 1, 0, 1]
    assert shard_sizes(0, 2) == [0, 0]
    for n, k in ((1000, 7), (5, 5), (17, 1)):
        sizes = shard_sizes(n, k)
        assert sum(sizes) == n and max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("n, shards", [(10, 3), (2, 4), (0, 2), (25, 1)])
def test_shards_concatenate_to_the_single_file(tmp_path, n, shards):
    rows = _recs(n)
    write_jsonl(tmp_path / "single.jsonl", rows)
    out = tmp_path / "records.jsonl"
    assert write_records(out, rows, shards) == n
    if shards == 1:
        assert out.is_file() and out.read_bytes() == (tmp_path / "single.jsonl").read_bytes()
    else:
        names = sorted(p.name for p in out.iterdir())
        assert names == [f"part-{k:05d}.jsonl" for k in range(shards)]
        assert b"".join((out / name).read_bytes() for name in names) == (tmp_path / "single.jsonl").read_bytes()
    assert read_records(out) == rows
    assert list(iter_records(out)) == rows
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_file_replaces_a_shard_dir_and_back(tmp_path):
    out = tmp_path / "records.jsonl"
    write_records(out, _recs(5), 2)
    assert out.is_dir()
    write_records(out, _recs(3), 1)
    assert out.is_file() and len(read_records(out)) == 3
    write_records(out, _recs(4), 3)
    assert out.is_dir() and len(read_records(out)) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["records.jsonl"]


def test_reader_errors_name_the_shard_and_line(tmp_path):
    out = tmp_path / "records.jsonl"
    write_records(out, _recs(6), 3)
    (out / "part-00001.jsonl").write_text('{"id": "x", "messages": []}\n{oops\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"records.jsonl/part-00001.jsonl:2: invalid JSON"):
        read_records(out)
    empty = tmp_path / "empty.jsonl"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a shard")
    with pytest.raises(ValueError, match="holds no part-NNNNN.jsonl shards"):
        read_records(empty)
    with pytest.raises(ValueError, match="input file not found"):
        read_records(tmp_path / "missing.jsonl")


# --------------------------------------------------------------------------- DVC, validate..split

SHARDED = ["data/validated/records.jsonl", "data/scrubbed/records.jsonl", "data/dedup/records.jsonl"]
SAME = ["data/split/train.jsonl", "data/split/val.jsonl", "data/split/test.jsonl",
        "data/split/contamination.jsonl", "data/validated/rejects.jsonl", "data/validated/repairs.jsonl",
        "data/scrubbed/review.jsonl", "data/dedup/clusters.jsonl",
        "metrics/validate.json", "metrics/pii.json", "metrics/dedup.json", "metrics/data.json"]


def _sh(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _set_shards(repo: Path, shards: int) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["curation"]["shards"] = shards
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _snapshot(repo: Path) -> dict[str, bytes]:
    out = {}
    for rel in SAME + SHARDED:
        p = repo / rel
        if p.is_dir():
            out[rel] = b"".join((p / name).read_bytes() for name in sorted(os.listdir(p)))
        else:
            out[rel] = p.read_bytes()
    return out


@pytest.mark.slow
def test_dvc_repro_with_shards_gives_the_same_splits(tmp_path):
    from test_pipeline_e2e import tiny_project

    repo = tmp_path / "project"
    env = tiny_project(repo)
    dvc = [sys.executable, "-m", "dvc"]
    _sh(["git", "init", "-q"], repo, env)
    _sh(dvc + ["init", "-q"], repo, env)
    _sh(["git", "add", "-A"], repo, env)
    _sh(["git", "commit", "-qm", "init"], repo, env)

    _set_shards(repo, 1)
    _sh(dvc + ["repro", "split"], repo, env)
    single = _snapshot(repo)
    assert all((repo / rel).is_file() for rel in SHARDED)

    _set_shards(repo, 3)
    ran = _sh(dvc + ["repro", "split"], repo, env).stdout
    assert "Running stage 'split'" in ran  # its input became a directory out
    for rel in SHARDED:
        p = repo / rel
        assert p.is_dir() and sorted(os.listdir(p)) == ["part-00000.jsonl", "part-00001.jsonl", "part-00002.jsonl"]
    assert _snapshot(repo) == single  # same splits, metrics, reports; shards concatenate to the files
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    outs = {o["path"]: o for stage in lock["stages"].values() for o in stage.get("outs", [])}
    for rel in SHARDED:
        assert outs[rel]["md5"].endswith(".dir") and outs[rel]["nfiles"] == 3
    status = _sh(dvc + ["status", "split"], repo, env).stdout
    assert "changed" not in status and "modified" not in status, status
    dedup = json.loads((repo / "metrics/dedup.json").read_text())
    assert dedup["exact_duplicates_removed"] >= 1 and dedup["near_duplicates_removed"] >= 1
