"""qlora-train with train.num_processes=2 on CPU: DDP over gloo through the stage's own relaunch
(torchrun), driven by `dvc exp run -S train.num_processes=2` in a small DVC project.

Checked against a 1-process run with the same global batch (2 packed rows per optimizer step:
1 per process vs 2 accumulated forwards of 1 row in one process), LoRA dropout 0 so that no
random mask differs:
  - per-step training loss: max relative difference <= 1e-5 (measured 1.8e-7: only the order of
    float sums differs; the same rows are seen in the same steps);
  - validation loss: max relative difference <= 1e-5 (measured 0);
  - an interrupted 2-process run resumed by the stage under 2 processes gives the same adapter as
    the uninterrupted one (max |delta| <= 1e-6 over all adapter tensors; measured 0: bit-identical);
  - rank 0 alone writes outputs and metrics: a Python audit hook (sitecustomize, active only in
    the torchrun workers) records every file the ranks open for writing, rename, create or remove;
    rank 1 may only create checkpoint directories (for its RNG state, which torch.save writes from
    C++ and resume needs).

FSDP is not run here: accelerate builds its FSDP plugin for GPU process groups only, so on CPU
`train.distributed: fsdp` runs DDP and says so (unit test: tests/test_train.py::
test_launch_command_and_what_the_processes_run). Measured: 13 min on the shared, loaded 2-core box.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmpipe.io import write_jsonl
from test_train import make_records, tokenizer, tiny_base  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

AUDIT = '''
import os, sys
_dir = os.environ.get("LLMPIPE_TEST_AUDIT_DIR")
if _dir and "RANK" in os.environ:
    _fd = os.open(os.path.join(_dir, "rank%s-%d.log" % (os.environ["RANK"], os.getpid())),
                  os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def _rec(event, path):
        if isinstance(path, (str, bytes, os.PathLike)):
            os.write(_fd, ("%s\\t%s\\n" % (event, os.path.abspath(os.fsdecode(path)))).encode())

    def _hook(event, args):
        if event == "open" and args[2] is not None and args[2] & (os.O_WRONLY | os.O_RDWR):
            _rec("open", args[0])
        elif event == "os.rename":
            _rec(event, args[1])
        elif event in ("os.mkdir", "os.remove", "shutil.rmtree"):
            _rec(event, args[0])

    sys.addaudithook(_hook)
'''

INTERRUPTED = '''
import sys
sys.path.insert(0, {tests!r})
import torch.distributed as dist
from transformers import TrainerCallback
from stage_loader import load_stage


class Interrupt(TrainerCallback):
    """A kill right after the checkpoint at step 2 is on disk (every rank has saved its part)."""

    def on_save(self, args, state, control, **kw):
        if state.global_step >= 2:
            dist.barrier()
            raise SystemExit(3)


sys.exit(load_stage("train").main(sys.argv[1:], callbacks=[Interrupt()]))
'''

STAGE_ARGS = ["--base", "base", "--train", "train.jsonl", "--val", "val.jsonl"]


def outputs(tag: str = "") -> list[str]:
    return ["--adapter", f"adapter{tag}", "--checkpoints", f"ckpt{tag}", "--live-dir", f"live{tag}",
            "--metrics", f"metrics/train{tag}.json", "--timings-root", f"timings_root{tag}"]


def sh(cmd: list[str], cwd: Path, env: dict[str, str], ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    if ok:
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def tiny_params(**train) -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["seed"] = 7
    params["model"]["max_seq_len"] = 256
    params["lora"].update(r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    params["train"].update(quantization="none", precision="auto", max_steps=4, learning_rate=1e-2,
                           lr_scheduler="cosine", warmup_ratio=0.0, per_device_batch_size=1,
                           gradient_accumulation_steps=1, micro_batch_size="auto", packing=True, eval_steps=2,
                           save_steps=2, save_total_limit=5, logging_steps=1, num_processes=1, cpu_threads=0,
                           distributed="ddp")
    params["train"].update(train)
    return params


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_base):  # noqa: F811
    """A DVC project with the qlora-train stage only, on the tiny random Llama and 16 records."""
    import shutil

    repo = tmp_path_factory.mktemp("mp")
    shutil.copytree(tiny_base, repo / "base")
    write_jsonl(repo / "train.jsonl", make_records(16, 1))
    write_jsonl(repo / "val.jsonl", make_records(4, 2))
    (repo / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    stage = {"cmd": " ".join(["python", str(ROOT / "stages" / "train.py"), *STAGE_ARGS, *outputs()]),
             "deps": ["base", "train.jsonl", "val.jsonl"], "params": ["seed", "model.max_seq_len", "lora", "train"],
             "outs": ["adapter", {"ckpt": {"persist": True}}],
             "metrics": [{"metrics/train.json": {"cache": False}}],
             "plots": [{"live/plots/metrics": {"x": "step", "cache": False}}]}
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"qlora-train": stage}}, sort_keys=False))
    (repo / ".gitignore").write_text("timings_root*/\naudit/\nsite/\n")
    site, audit = repo / "site", repo / "audit"
    site.mkdir()
    audit.mkdir()
    (site / "sitecustomize.py").write_text(AUDIT)
    env = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"],
           "PYTHONPATH": os.pathsep.join([str(site), str(ROOT / "src")]), "LLMPIPE_TEST_AUDIT_DIR": str(audit),
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("LOCAL_RANK", None)
    sh(["git", "init", "-q"], repo, env)
    sh([sys.executable, "-m", "dvc", "init", "-q"], repo, env)
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-qm", "init"], repo, env)
    return repo, env


def _losses(live: Path, kind: str) -> dict[int, float]:
    rows = (live / "plots" / "metrics" / kind / "loss.tsv").read_text().splitlines()[1:]
    return {int(r.split("\t")[0]): float(r.split("\t")[1]) for r in rows}


def _max_rel(a: dict[int, float], b: dict[int, float]) -> float:
    assert a.keys() == b.keys() and a, (a, b)
    return max(abs(a[k] - b[k]) / abs(b[k]) for k in a)


def _tensors(adapter: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(adapter / "adapter_model.safetensors"))


def _audit(repo: Path) -> dict[str, list[tuple[str, str]]]:
    """rank -> [(event, path relative to the project)] for paths inside the project."""
    out: dict[str, list[tuple[str, str]]] = {}
    for f in sorted((repo / "audit").glob("rank*.log")):
        rank = f.name.split("-")[0][4:]
        for line in f.read_text().splitlines():
            event, path = line.split("\t", 1)
            if Path(path).is_relative_to(repo):
                out.setdefault(rank, []).append((event, str(Path(path).relative_to(repo))))
    return out


def test_two_processes_through_dvc_exp_run_match_one_process_and_resume(project):
    from stage_loader import load_stage

    repo, env = project
    # 1. `dvc exp run -S train.num_processes=2`: the stage relaunches itself under torchrun (gloo)
    proc = sh([sys.executable, "-m", "dvc", "exp", "run", "-S", "train.num_processes=2"], repo, env)
    assert "launching 2 processes (ddp)" in proc.stderr + proc.stdout
    m2 = json.loads((repo / "metrics" / "train.json").read_text())
    assert m2["world_size"] == 2 and m2["steps"] == 4 and m2["device"] == "cpu"
    audit = _audit(repo)
    assert set(audit) == {"0", "1"}, audit.keys()
    # rank 0 wrote the outputs; rank 1 only created checkpoint directories (its RNG state goes in)
    assert any(p == "metrics/train.json" for _, p in audit["0"])
    assert any(p.startswith("adapter") for _, p in audit["0"]) and any(p.startswith("live/") for _, p in audit["0"])
    assert [(e, p) for e, p in audit["1"] if not (e == "os.mkdir" and p.startswith("ckpt"))] == []
    assert sorted(p.name for p in (repo / "ckpt" / "checkpoint-4").glob("rng_state*")) == [
        "rng_state_0.pth", "rng_state_1.pth"]

    # 2. one process, the same global batch: 2 rows per step as 2 accumulated forwards of 1 row
    #    (evaluation then also sees 1 row per batch, as each rank does: HF averages per batch)
    ref = repo / "ref"
    ref.mkdir()
    (ref / "params.yaml").write_text(yaml.safe_dump(tiny_params(gradient_accumulation_steps=2)))
    assert load_stage("train").main(["--params", str(ref / "params.yaml"), "--base", str(repo / "base"),
                                     "--train", str(repo / "train.jsonl"), "--val", str(repo / "val.jsonl"),
                                     *[str(ref / a) if i % 2 else a for i, a in enumerate(outputs())]]) == 0
    m1 = json.loads((ref / "metrics" / "train.json").read_text())
    assert m1["world_size"] == 1 and m1["tokens_seen"] == m2["tokens_seen"]
    assert _max_rel(_losses(repo / "live", "train"), _losses(ref / "live", "train")) <= 1e-5
    assert _max_rel(_losses(repo / "live", "eval"), _losses(ref / "live", "eval")) <= 1e-5
    # the adapter trained (not a vacuous comparison): the LoRA B matrices moved away from zero
    t2 = _tensors(repo / "adapter")
    assert max(float(v.abs().max()) for k, v in t2.items() if "lora_B" in k) > 1e-4

    # 3. interrupted after the checkpoint at step 2, under 2 processes, then resumed by the stage
    (repo / "p2.yaml").write_text(yaml.safe_dump(tiny_params(num_processes=2)))
    from llmpipe.train.launch import launch_command

    runner = repo / "site" / "interrupted.py"
    runner.write_text(INTERRUPTED.format(tests=str(ROOT / "tests")))
    args = ["--params", "p2.yaml", *STAGE_ARGS, *outputs("_r")]
    proc = sh(launch_command(2, str(runner), args), repo, env, ok=False)
    assert proc.returncode != 0
    assert (repo / "ckpt_r" / "checkpoint-2").is_dir() and not (repo / "ckpt_r" / "checkpoint-4").exists()
    assert not (repo / "adapter_r").exists()
    proc = sh([sys.executable, str(ROOT / "stages" / "train.py"), *args], repo, env)
    mr = json.loads((repo / "metrics" / "train_r.json").read_text())
    assert mr["resumed_from"] == "checkpoint-2" and mr["world_size"] == 2 and mr["steps"] == 4
    tr = _tensors(repo / "adapter_r")
    assert tr.keys() == t2.keys()
    diff = max(float((tr[k] - t2[k]).abs().max()) for k in t2)
    assert diff <= 1e-6, f"resumed 2-process adapter differs from the uninterrupted one by {diff}"
    assert [(e, p) for e, p in _audit(repo)["1"] if not (e == "os.mkdir" and p.startswith("ckpt"))] == []
