"""The real pipeline stages on a CUDA GPU: base-model -> qlora-train -> merge -> eval-base -> eval -> gate.

Runs ``dvc repro --single-item`` of those stages in a copy of the repository (``--workdir``), on
the demo data split (``--split``: data/split/*.jsonl made by the CPU curation stages) with
``train.quantization: nf4`` (QLoRA through bitsandbytes), ``model.dtype: bfloat16`` and
``merge.dtype: bfloat16``. The base model is a random-weight model of the embedded
SmolLM2-135M-Instruct's architecture with its real tokenizer and chat template (``--tokenizer``:
config + tokenizer files of models/base): the embedded GGUF (98 MB) is over the device's 64 MiB
per-call transfer, so the weights are drawn on the device (seed 0) and the ``base-model`` stage
reads them as a local model directory. Scores are therefore those of an untrained network; the
run shows that every stage runs on CUDA and what it records.

Collects every metrics file, the timings, dvclive's summary and the tail of each stage's log into
one JSON (``--out``).

Usage (on a CUDA box, from the repository root, with the stage dependencies importable):
    python benchmarks/gpu_stage_run.py --split .gpu/split --tokenizer .gpu/tok --out gpu_stage_run.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

STAGES = ["base-model", "qlora-train", "merge", "eval-base", "eval", "gate"]
PARAM_EDITS = {   # section -> key -> new value (a plain string substitution in params.yaml)
    "model": {"name_or_path": None, "dtype": "bfloat16"},
    "merge": {"dtype": "bfloat16"},
    "train": {"quantization": "nf4"},
}


def log(msg: str) -> None:
    print(f"[gpu-stage-run] {msg}", file=sys.stderr, flush=True)


def build_random_model(tokenizer_dir: Path, out: Path, seed: int = 0) -> int:
    """A random-weight model of the architecture in ``tokenizer_dir/config.json`` + that tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        if f.name != "config.json" and f.is_file():
            shutil.copy(f, out / f.name)
    return sum(p.numel() for p in model.parameters())


def edit_params(path: Path, edits: dict) -> None:
    """Set ``section.key: value`` in params.yaml, keeping its comments and layout."""
    lines = path.read_text().splitlines(keepends=True)
    section = None
    done = set()
    for i, line in enumerate(lines):
        m = re.match(r"^([A-Za-z_]+):", line)
        if m:
            section = m.group(1)
            continue
        m = re.match(r"^(  )([A-Za-z_]+):(\s*)([^#\n]*?)(\s*#.*)?$", line.rstrip("\n"))
        if section in edits and m and m.group(2) in edits[section]:
            val = edits[section][m.group(2)]
            lines[i] = f"{m.group(1)}{m.group(2)}: {val}{('  ' + m.group(5).strip()) if m.group(5) else ''}\n"
            done.add((section, m.group(2)))
    missing = {(s, k) for s, d in edits.items() for k in d} - done
    if missing:
        raise SystemExit(f"params.yaml: keys not found: {sorted(missing)}")
    path.write_text("".join(lines))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", required=True, help="directory with train/val/test.jsonl (+ contamination.jsonl)")
    ap.add_argument("--tokenizer", required=True, help="config.json + tokenizer files of the embedded model")
    ap.add_argument("--workdir", default="/tmp/stagerun")
    ap.add_argument("--model-dir", default="/tmp/randbase")
    ap.add_argument("--out", default="gpu_stage_run.json")
    ap.add_argument("--logdir", default="/tmp/stagerun_logs")
    args = ap.parse_args(argv)

    repo = Path(__file__).resolve().parents[1]
    work, logdir = Path(args.workdir), Path(args.logdir)
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(repo, work, ignore=shutil.ignore_patterns(".git", ".whl", ".gpu", ".venv*", "__pycache__", ".gl"))
    (work / "data" / "split").mkdir(parents=True, exist_ok=True)
    for f in Path(args.split).glob("*.jsonl"):
        shutil.copy(f, work / "data" / "split" / f.name)
    t0 = time.perf_counter()
    n = build_random_model(Path(args.tokenizer).resolve(), Path(args.model_dir))
    log(f"random-weight model: {n / 1e6:.1f}M params -> {args.model_dir} ({time.perf_counter() - t0:.1f}s)")
    edits = json.loads(json.dumps(PARAM_EDITS))
    edits["model"]["name_or_path"] = str(Path(args.model_dir).resolve())
    edit_params(work / "params.yaml", edits)

    bindir = Path("/tmp/stagerun_bin")      # dvc.yaml's `python stages/...`: the interpreter running this
    bindir.mkdir(exist_ok=True)
    shim = bindir / "python"    # a wrapper, not a symlink: a venv's python must be started by its own path
    shim.unlink(missing_ok=True)
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    shim.chmod(0o755)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ.get('PATH', '')}", PYTHONUNBUFFERED="1",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(work / "src"), os.environ.get("PYTHONPATH", "")]))
    logdir.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "dvc", "config", "core.no_scm", "true"], cwd=work, env=env, check=True)
    result: dict = {"stages": {}, "model": {"kind": "random weights (seed 0), SmolLM2-135M-Instruct architecture "
                                                   "and real tokenizer/chat template", "num_parameters": n},
                    "params_edits": edits}
    for stage in STAGES:
        t = time.perf_counter()
        with open(logdir / f"{stage}.log", "w") as fh:
            rc = subprocess.call([sys.executable, "-m", "dvc", "repro", "--single-item", stage], cwd=work, env=env,
                                 stdout=fh, stderr=subprocess.STDOUT)
        text = (logdir / f"{stage}.log").read_text()
        result["stages"][stage] = {"rc": rc, "seconds": round(time.perf_counter() - t, 1), "log_tail": text[-3000:]}
        log(f"{stage}: rc={rc} in {result['stages'][stage]['seconds']}s")
        if rc != 0 and stage != "gate":
            break
    result["metrics"] = {p.name: json.loads(p.read_text()) for p in sorted((work / "metrics").glob("*.json"))
                         if p.stat().st_mtime >= t0 - 1}
    result["timings"] = {p.name: json.loads(p.read_text()) for p in sorted((work / "timings").glob("*.json"))}
    dl = work / "dvclive" / "train" / "metrics.json"
    result["dvclive_train_summary"] = json.loads(dl.read_text()) if dl.is_file() else None
    gate = work / "reports" / "gate.md"
    result["gate_report"] = gate.read_text() if gate.is_file() else None
    try:
        import torch

        result["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        import bitsandbytes
        import transformers
        import trl

        result["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                              "trl": trl.__version__, "bitsandbytes": bitsandbytes.__version__}
    except ImportError as exc:
        result["versions"] = {"error": str(exc)}
    Path(args.out).write_text(json.dumps(result, indent=2))
    ok = all(s["rc"] == 0 for k, s in result["stages"].items() if k != "gate")
    log(f"done: {'all stages ran' if ok else 'a stage failed'} -> {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
