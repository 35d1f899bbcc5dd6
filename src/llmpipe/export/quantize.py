"""The quantize stage's recipe: merged HF model -> GGUF f16 + quantized files, each checked.

Convert with llama.cpp's converter (f16: the lossless reference and the quantizer's input) ->
``llama_model_quantize`` to each ``quantize.types`` -> load every file back with llama.cpp
(tokenizer check, perplexity on the test set, a greedy chat reply, decode tokens/s) ->
perplexity of the merged model with transformers on the same token ids -> deltas.

Results and timings are kept apart: ``QuantizeRun.metrics`` (metrics/quantize.json) and the
manifest in the output directory hold only numbers that are the same on every run of the same
inputs; load/convert seconds and tokens/s go to ``QuantizeRun.timings`` (timings/quantize.json).
"""

from __future__ import annotations

import gc
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmpipe.config.export import QuantizeSection
from llmpipe.export.gguf import (
    GGUFError,
    chat_text,
    convert_to_gguf,
    evaluate_gguf,
    gguf_filename,
    hf_token_ids,
    normalise_quant_type,
    perplexity_hf,
    perplexity_sequences,
    quantize,
)
from llmpipe.io import atomic_dir, read_jsonl, sha256_file, write_json

# Per-file numbers in metrics/quantize.json (all deterministic for the same inputs).
GGUF_METRICS = ("file", "file_type", "size_bytes", "size_mb", "bits_per_weight", "ppl", "ppl_delta",
                "ppl_delta_pct", "tokenizer_mismatches", "n_params")


@dataclass(frozen=True)
class QuantizeRun:
    metrics: dict[str, Any]   # metrics/quantize.json
    timings: dict[str, Any]   # timings/quantize.json (wall-clock seconds, tokens/s)


def _log(msg: str) -> None:
    print(f"[quantize] {msg}", file=sys.stderr, flush=True)


def load_test_records(path: Path) -> list[dict]:
    if not path.is_file():
        raise GGUFError(f"{path}: test set not found (run the split stage)")
    records = list(read_jsonl(path))
    if not records:
        raise GGUFError(f"{path}: test set is empty")
    return records


def prompt_from(record: dict, path: Path) -> list[dict[str, str]]:
    """The record's conversation without its final assistant reply."""
    msgs = record.get("messages") or []
    if len(msgs) < 2 or msgs[-1].get("role") != "assistant":
        raise GGUFError(f"{path}:1: record {record.get('id')} does not end with an assistant message")
    return [{"role": m["role"], "content": m["content"]} for m in msgs[:-1]]


def run_quantize(
    cfg: QuantizeSection,
    model_dir: str | os.PathLike[str],
    test_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
) -> QuantizeRun:
    """Write ``out_dir`` (every GGUF file + manifest.json, atomically) and measure each file."""
    t_start = time.perf_counter()
    model_dir, test_path = Path(model_dir), Path(test_path)
    types = [normalise_quant_type(t) for t in cfg.types]   # llama.cpp must know every name
    if not (model_dir / "config.json").is_file():
        raise GGUFError(f"{model_dir}: merged model not found (no config.json; run the merge stage)")

    import llama_cpp
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(cfg.n_threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    records = load_test_records(test_path)
    tokens = perplexity_sequences(tokenizer, records, cfg.ppl_max_examples, cfg.n_ctx)
    prompt = prompt_from(records[0], test_path)
    prompt_ids = hf_token_ids(tokenizer, chat_text(tokenizer, prompt, add_generation_prompt=True))
    _log(f"perplexity set: {len(tokens.seqs)} test records, {tokens.n_tokens} tokens "
         f"({tokens.truncated} cut to n_ctx={cfg.n_ctx})")

    # the merged HF model on the same token ids: the reference every GGUF is compared with
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    merged_ppl = perplexity_hf(model, tokens.seqs)
    del model
    gc.collect()
    merged_bytes = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    merged = {"ppl": merged_ppl.ppl, "mean_nll": merged_ppl.mean_nll, "ppl_tokens": merged_ppl.n_tokens,
              "size_bytes": merged_bytes, "size_mb": round(merged_bytes / 1e6, 2)}
    timings: dict[str, Any] = {"merged": {"seconds": round(time.perf_counter() - t0, 2)}, "gguf": {},
                               "n_threads": cfg.n_threads, "bench_tokens": cfg.bench_tokens}
    _log(f"merged (transformers fp32): ppl {merged_ppl.ppl:.4f}")

    results: dict[str, dict] = {}
    with atomic_dir(out_dir) as tmp:
        f16 = tmp / gguf_filename(cfg.name, "F16")
        t0 = time.perf_counter()
        convert_to_gguf(model_dir, f16, "f16", model_name=cfg.name)
        create_s = {"F16": time.perf_counter() - t0}
        files = {"F16": f16}
        for qtype in types:
            t0 = time.perf_counter()
            _log(f"quantizing -> {qtype}")
            files[qtype] = quantize(f16, tmp / gguf_filename(cfg.name, qtype), qtype, cfg.n_threads)
            create_s[qtype] = time.perf_counter() - t0
        for qtype, path in files.items():
            _log(f"evaluating {path.name} with llama.cpp")
            r, t = evaluate_gguf(path, tokens, prompt, prompt_ids, n_ctx=cfg.n_ctx, n_threads=cfg.n_threads,
                                 reply_max_tokens=cfg.reply_max_tokens, bench_tokens=cfg.bench_tokens)
            if not math.isfinite(r["ppl"]):
                raise GGUFError(f"{path.name}: perplexity is not finite ({r['ppl']})")
            r["ppl_delta"] = r["ppl"] - merged_ppl.ppl
            r["ppl_delta_pct"] = 100.0 * r["ppl_delta"] / merged_ppl.ppl
            r["sha256"] = sha256_file(path)
            _log(f"  {path.name}: {r['size_mb']} MB, ppl {r['ppl']:.4f} ({r['ppl_delta_pct']:+.2f}% vs merged), "
                 f"{t['tokens_per_s']} tok/s, reply {r['reply'][:80]!r}")
            results[qtype.lower()] = r
            timings["gguf"][qtype.lower()] = {"create_seconds": round(create_s[qtype], 2), **t}
        write_json(tmp / "manifest.json", {
            "name": cfg.name,
            "source": str(model_dir),
            "llama_cpp_python": llama_cpp.__version__,
            "prompt": prompt,
            "files": {k: {key: r[key] for key in ("file", "file_type", "size_bytes", "sha256", "reply")}
                      for k, r in results.items()},
        })

    f16_bytes = results["f16"]["size_bytes"]
    gguf_metrics = {}
    for k, r in results.items():
        m = {key: r[key] for key in GGUF_METRICS}
        m["size_ratio_vs_f16"] = round(r["size_bytes"] / f16_bytes, 4)
        m["reply_chars"] = len(r["reply"])
        gguf_metrics[k] = m
    metrics = {
        "merged": merged,
        "gguf": gguf_metrics,
        "ppl_examples": len(tokens.seqs),
        "ppl_tokens_per_model": merged_ppl.n_tokens,
        "ppl_truncated": tokens.truncated,
        "tokenizer_roundtrip_ok": all(r["tokenizer_mismatches"] == 0 for r in results.values()),
        "llama_cpp_python": llama_cpp.__version__,
    }
    timings["seconds"] = round(time.perf_counter() - t_start, 2)
    return QuantizeRun(metrics, timings)
