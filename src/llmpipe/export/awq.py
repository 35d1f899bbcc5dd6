"""The quantize-awq stage's recipe: merged HF model -> 4-bit AWQ (W4A16) checkpoint, checked.

llm-compressor (vLLM's quantization library) does the AWQ; it cannot live in the project's
environment (it pins transformers<=5.17), so it runs in its own virtualenv (``.venv-awq``,
``make setup-awq``) as a subprocess: ``awq_worker.py`` beside this file, with the interpreter
``quantize_awq.python``. What it is given is made here, with the project's tokenizer and the
quantize stage's own functions, so its perplexity compares with the GGUFs':

* perplexity ids: :func:`llmpipe.export.gguf.perplexity_sequences` on the first
  ``quantize.ppl_max_examples`` test records cut to ``quantize.n_ctx`` (what the quantize stage
  scores every GGUF and the merged model on);
* calibration ids: the chat text of the first ``quantize_awq.calibration_samples`` train records,
  cut to ``quantize_awq.max_seq_length`` tokens;
* the chat prompt of the first test record (the quantize stage's reply prompt).

The worker scores the merged model and the saved AWQ checkpoint (loaded back with transformers
+ compressed-tensors) with :func:`llmpipe.export.gguf.perplexity_hf`, in one interpreter, so the
delta comes from the weights alone.

With ``quantize_awq.enabled: false`` nothing runs: the output directory holds only
``awq.json`` saying so, and the metrics ``{"enabled": false}`` (a DVC stage must write its outs).
"""

from __future__ import annotations

import collections
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmpipe.config.export import QuantizeAwqSection
from llmpipe.export.gguf import chat_text, hf_token_ids, perplexity_sequences
from llmpipe.io import atomic_dir, read_jsonl, sha256_file, write_json

WORKER = Path(__file__).with_name("awq_worker.py")
PYTHON_ENV = "LLMPIPE_AWQ_PYTHON"   # overrides quantize_awq.python (e.g. in tests)
MANIFEST = "awq.json"


class AwqError(RuntimeError):
    """The AWQ environment is missing, or quantizing/scoring the model failed."""


@dataclass(frozen=True)
class AwqRun:
    metrics: dict[str, Any]   # metrics/quantize_awq.json
    timings: dict[str, Any]   # timings/quantize_awq.json


def _log(msg: str) -> None:
    print(f"[quantize-awq] {msg}", file=sys.stderr, flush=True)


def repo_root() -> Path:
    return Path(__file__).resolve().parents[3]


def awq_python(cfg: QuantizeAwqSection, root: str | os.PathLike[str] | None = None) -> Path:
    """The AWQ venv's interpreter: ``$LLMPIPE_AWQ_PYTHON`` or ``quantize_awq.python`` (repo-relative)."""
    override = os.environ.get(PYTHON_ENV)
    path = Path(override) if override else Path(cfg.python)
    if not path.is_absolute():
        path = Path(root or repo_root()) / path
    if not path.is_file():
        source = f"${PYTHON_ENV}" if override else "quantize_awq.python"
        raise AwqError(f"{path} ({source}): no AWQ interpreter; run `make setup-awq` "
                       f"(scripts/setup_awq.sh), or set quantize_awq.enabled: false")
    return path


def worker_command(python: str | os.PathLike[str], request: str | os.PathLike[str],
                   result: str | os.PathLike[str]) -> list[str]:
    return [str(python), str(WORKER), str(request), str(result)]


def worker_env(n_threads: int) -> dict[str, str]:
    """The worker sees the repository's ``src`` (for llmpipe.export.gguf), no network, and
    ``n_threads`` OpenMP threads; tqdm bars refresh at most every 30 s (they fill logs otherwise)."""
    src = str(repo_root() / "src")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PYTHONPATH=src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS=str(n_threads), TQDM_MININTERVAL="30")
    return env


def worker_request(cfg: QuantizeAwqSection, tokenizer, model_dir: Path, out_dir: Path, train: list[dict],
                   test: list[dict], *, ppl_max_examples: int, n_ctx: int, n_threads: int,
                   reply_max_tokens: int) -> dict[str, Any]:
    """Everything the worker needs, token ids included (made with the project's tokenizer)."""
    if len(train) < cfg.calibration_samples:
        raise AwqError(f"quantize_awq.calibration_samples={cfg.calibration_samples} but the train "
                       f"split has {len(train)} records")
    calibration = [hf_token_ids(tokenizer, chat_text(tokenizer, r["messages"]))[: cfg.max_seq_length]
                   for r in train[: cfg.calibration_samples]]
    tokens = perplexity_sequences(tokenizer, test, ppl_max_examples, n_ctx)
    msgs = test[0]["messages"]
    if len(msgs) < 2 or msgs[-1].get("role") != "assistant":
        raise AwqError(f"test record {test[0].get('id')} does not end with an assistant message")
    prompt = [{"role": m["role"], "content": m["content"]} for m in msgs[:-1]]
    return {
        "model_dir": str(model_dir), "out_dir": str(out_dir),
        "group_size": cfg.group_size, "symmetric": cfg.symmetric, "n_grid": cfg.n_grid,
        "ignore": list(cfg.ignore), "max_seq_length": cfg.max_seq_length, "dtype": cfg.dtype,
        "n_threads": n_threads,
        "calibration_ids": calibration, "ppl_ids": tokens.seqs, "ppl_truncated": tokens.truncated,
        "prompt_ids": hf_token_ids(tokenizer, chat_text(tokenizer, prompt, add_generation_prompt=True)),
        "reply_max_tokens": reply_max_tokens,
    }


def run_worker(python: Path, request: dict[str, Any], n_threads: int) -> dict[str, Any]:
    """Run awq_worker.py in the AWQ venv; its output streams to stderr; returns its result."""
    with tempfile.TemporaryDirectory(prefix="llmpipe-awq-") as tmp:
        req_path, res_path = Path(tmp) / "request.json", Path(tmp) / "result.json"
        req_path.write_text(json.dumps(request), encoding="utf-8")
        cmd = worker_command(python, req_path, res_path)
        tail: collections.deque[str] = collections.deque(maxlen=30)
        proc = subprocess.Popen(cmd, env=worker_env(n_threads), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace")
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stderr.write(line)
            tail.append(line.rstrip()[-400:])
        rc = proc.wait()
        if rc != 0 or not res_path.is_file():
            raise AwqError(f"{WORKER.name} failed in {python} (exit {rc}); last output:\n" + "\n".join(tail))
        return json.loads(res_path.read_text(encoding="utf-8"))


def _disabled(out_dir: Path) -> AwqRun:
    with atomic_dir(out_dir) as tmp:
        write_json(tmp / MANIFEST, {"enabled": False, "note": "quantize_awq.enabled is false: no AWQ "
                                    "checkpoint (set it to true after `make setup-awq`)"})
    return AwqRun({"enabled": False}, {"enabled": False})


def run_awq(
    cfg: QuantizeAwqSection,
    model_dir: str | os.PathLike[str],
    train_path: str | os.PathLike[str],
    test_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    ppl_max_examples: int,
    n_ctx: int,
    n_threads: int,
    reply_max_tokens: int,
) -> AwqRun:
    """Write ``out_dir`` (the AWQ checkpoint + awq.json, atomically) and measure it."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if not cfg.enabled:
        return _disabled(out_dir)
    t_start = time.perf_counter()
    python = awq_python(cfg)
    if not (model_dir / "config.json").is_file():
        raise AwqError(f"{model_dir}: merged model not found (no config.json; run the merge stage)")
    for p in (train_path, test_path):
        if not Path(p).is_file():
            raise AwqError(f"{p}: not found (run the split stage)")
    train, test = list(read_jsonl(train_path)), list(read_jsonl(test_path))
    if not test:
        raise AwqError(f"{test_path}: test set is empty")

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with atomic_dir(out_dir) as tmp:
        request = worker_request(cfg, tokenizer, model_dir, tmp, train, test, ppl_max_examples=ppl_max_examples,
                                 n_ctx=n_ctx, n_threads=n_threads, reply_max_tokens=reply_max_tokens)
        _log(f"running {WORKER.name} with {python}")
        res = run_worker(python, request, n_threads)
        merged, awq = res["merged"], res["awq"]
        for name, r in (("merged", merged), ("AWQ", awq)):
            if not math.isfinite(r["ppl"]):
                raise AwqError(f"{name} perplexity is not finite ({r['ppl']})")
        files = sorted(p for p in tmp.iterdir() if p.is_file())
        weights = [p for p in files if p.suffix == ".safetensors"]
        if not weights or not res["quantization_config"]:
            raise AwqError(f"{WORKER.name} wrote no compressed checkpoint (weights: {[p.name for p in weights]})")
        size = sum(p.stat().st_size for p in weights)
        write_json(tmp / MANIFEST, {
            "enabled": True,
            "source": str(model_dir),
            "scheme": "W4A16", "group_size": cfg.group_size, "symmetric": cfg.symmetric, "dtype": cfg.dtype,
            "calibration_samples": len(request["calibration_ids"]),
            "calibration_tokens": sum(map(len, request["calibration_ids"])),
            "versions": res["versions"],
            "reply": res["reply"],
            "files": {p.name: sha256_file(p) for p in files},
        })

    merged_bytes = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    metrics = {
        "enabled": True,
        "scheme": "W4A16",
        "group_size": cfg.group_size,
        "symmetric": cfg.symmetric,
        "dtype": cfg.dtype,
        "calibration_samples": len(request["calibration_ids"]),
        "calibration_tokens": sum(map(len, request["calibration_ids"])),
        "format": res["quantization_config"].get("format"),
        "size_bytes": size,
        "size_mb": round(size / 1e6, 2),
        "size_ratio_vs_merged": round(size / merged_bytes, 4) if merged_bytes else None,
        "merged_ppl": merged["ppl"],
        "ppl": awq["ppl"],
        "ppl_delta": awq["ppl"] - merged["ppl"],
        "ppl_delta_pct": 100.0 * (awq["ppl"] - merged["ppl"]) / merged["ppl"],
        "ppl_examples": awq["n_sequences"],
        "ppl_tokens": awq["n_tokens"],
        "ppl_truncated": request["ppl_truncated"],
        "reply_chars": len(res["reply"]),
        "llmcompressor": res["versions"]["llmcompressor"],
    }
    timings = {**res["timings"], "seconds": round(time.perf_counter() - t_start, 2), "n_threads": n_threads}
    return AwqRun(metrics, timings)
