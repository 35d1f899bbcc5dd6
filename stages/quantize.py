"""DVC stage `quantize`: merged HF model -> GGUF f16 + quantized GGUF files, with size/speed/quality.

in:  models/merged/ (HF safetensors + tokenizer with chat template), data/split/test.jsonl,
     params quantize.*
out: models/gguf/<name>-f16.gguf, models/gguf/<name>-<type>.gguf for each quantize.types,
     models/gguf/manifest.json (files, sha256, sample replies), metrics/quantize.json

Recipe: convert with llama.cpp's converter (f16, kept: it is the lossless reference and the
quantizer's input) -> llama_model_quantize to each type -> load every file back with llama.cpp:
tokenizer check, perplexity on the test set, a chat reply, tokens/s -> perplexity of the merged
model with transformers on the same token ids -> deltas.
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import time
from pathlib import Path

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
from llmpipe.params import ParamsError, load_params, section

DEFAULTS = {
    "name": "model",
    "types": ["Q8_0", "Q4_K_M"],
    "n_threads": 1,
    "n_ctx": 1024,
    "ppl_max_examples": 64,
    "reply_max_tokens": 64,
    "bench_tokens": 64,
}


def log(msg: str) -> None:
    print(f"[quantize] {msg}", file=sys.stderr, flush=True)


def read_params(path: str | None) -> dict:
    p = {**DEFAULTS, **section(load_params(path), "quantize")}
    if not isinstance(p["types"], list) or not p["types"]:
        raise ParamsError("params.yaml: quantize.types must be a non-empty list, e.g. [Q8_0, Q4_K_M]")
    p["types"] = [normalise_quant_type(t) for t in p["types"]]
    if "F16" in p["types"]:
        raise ParamsError("params.yaml: quantize.types: F16 is always written; list only quantized types")
    for key in ("n_threads", "n_ctx", "ppl_max_examples", "reply_max_tokens", "bench_tokens"):
        if not isinstance(p[key], int) or p[key] < 1:
            raise ParamsError(f"params.yaml: quantize.{key} must be a positive integer (got {p[key]!r})")
    if not isinstance(p["name"], str) or not p["name"] or "/" in p["name"]:
        raise ParamsError(f"params.yaml: quantize.name must be a plain file-name stem (got {p['name']!r})")
    return p


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=None)
    ap.add_argument("--model", default="models/merged")
    ap.add_argument("--test", default="data/split/test.jsonl")
    ap.add_argument("--out", default="models/gguf")
    ap.add_argument("--metrics", default="metrics/quantize.json")
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    try:
        p = read_params(args.params)
        model_dir, test_path = Path(args.model), Path(args.test)
        if not (model_dir / "config.json").is_file():
            raise GGUFError(f"{model_dir}: merged model not found (no config.json; run the merge stage)")

        import llama_cpp
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(p["n_threads"])
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        records = load_test_records(test_path)
        tokens = perplexity_sequences(tokenizer, records, p["ppl_max_examples"], p["n_ctx"])
        prompt = prompt_from(records[0], test_path)
        prompt_ids = hf_token_ids(tokenizer, chat_text(tokenizer, prompt, add_generation_prompt=True))
        log(f"perplexity set: {len(tokens.seqs)} test records, {tokens.n_tokens} tokens "
            f"({tokens.truncated} cut to n_ctx={p['n_ctx']})")

        # merged HF model, same token ids
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        merged_ppl = perplexity_hf(model, tokens.seqs)
        del model
        gc.collect()
        merged_bytes = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
        merged = {"ppl": merged_ppl.ppl, "mean_nll": merged_ppl.mean_nll, "ppl_tokens": merged_ppl.n_tokens,
                  "size_bytes": merged_bytes, "size_mb": round(merged_bytes / 1e6, 2),
                  "seconds": round(time.perf_counter() - t0, 2)}
        log(f"merged (transformers fp32): ppl {merged_ppl.ppl:.4f}")

        results: dict[str, dict] = {}
        with atomic_dir(args.out) as tmp:
            f16 = tmp / gguf_filename(p["name"], "F16")
            t0 = time.perf_counter()
            convert_to_gguf(model_dir, f16, "f16", model_name=p["name"])
            seconds = {"F16": time.perf_counter() - t0}
            files = {"F16": f16}
            for qtype in p["types"]:
                t0 = time.perf_counter()
                log(f"quantizing -> {qtype}")
                files[qtype] = quantize(f16, tmp / gguf_filename(p["name"], qtype), qtype, p["n_threads"])
                seconds[qtype] = time.perf_counter() - t0
            for qtype, path in files.items():
                log(f"evaluating {path.name} with llama.cpp")
                r = evaluate_gguf(path, tokens, prompt, prompt_ids, n_ctx=p["n_ctx"], n_threads=p["n_threads"],
                                  reply_max_tokens=p["reply_max_tokens"], bench_tokens=p["bench_tokens"])
                r["create_seconds"] = round(seconds[qtype], 2)
                r["ppl_delta"] = r["ppl"] - merged_ppl.ppl
                r["ppl_delta_pct"] = 100.0 * r["ppl_delta"] / merged_ppl.ppl
                r["sha256"] = sha256_file(path)
                if not math.isfinite(r["ppl"]):
                    raise GGUFError(f"{path.name}: perplexity is not finite ({r['ppl']})")
                log(f"  {path.name}: {r['size_mb']} MB, ppl {r['ppl']:.4f} ({r['ppl_delta_pct']:+.2f}% vs merged), "
                    f"{r['tokens_per_s']} tok/s, reply {r['reply'][:80]!r}")
                results[qtype.lower()] = r
            write_json(tmp / "manifest.json", {
                "name": p["name"],
                "source": str(model_dir),
                "llama_cpp_python": llama_cpp.__version__,
                "prompt": prompt,
                "files": {k: {key: r[key] for key in ("file", "file_type", "size_bytes", "sha256", "reply")}
                          for k, r in results.items()},
            })
    except (GGUFError, ParamsError) as exc:
        print(f"[quantize] error: {exc}", file=sys.stderr)
        return 2

    f16_bytes = results["f16"]["size_bytes"]
    gguf_metrics = {}
    for k, r in results.items():
        m = {key: r[key] for key in ("file", "file_type", "size_bytes", "size_mb", "bits_per_weight", "ppl",
                                      "ppl_delta", "ppl_delta_pct", "tokens_per_s", "prompt_tokens_per_s",
                                      "tokenizer_mismatches", "create_seconds", "load_seconds", "eval_seconds",
                                      "n_params")}
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
        "n_threads": p["n_threads"],
        "bench_tokens": p["bench_tokens"],
        "llama_cpp_python": llama_cpp.__version__,
        "seconds": round(time.perf_counter() - t_start, 2),
    }
    write_json(args.metrics, metrics)
    log(f"wrote {len(results)} GGUF files to {args.out} and {args.metrics} in {metrics['seconds']}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
