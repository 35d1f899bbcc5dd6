"""DVC stage `quantize`: merged HF model -> GGUF f16 + quantized GGUF files, with size/quality.

in:  models/merged/ (HF safetensors + tokenizer with chat template), data/split/test.jsonl,
     params quantize.*
out: models/gguf/<name>-f16.gguf, models/gguf/<name>-<type>.gguf for each quantize.types,
     models/gguf/manifest.json (files, sha256, sample replies), metrics/quantize.json (size,
     bits/weight, perplexity and its delta vs the merged model, tokenizer check);
     timings/quantize.json (convert/load seconds, prompt and decode tokens/s per file;
     git-ignored, not a DVC output: timings are not results)

Recipe (llmpipe.export.quantize): convert with llama.cpp's converter -> llama_model_quantize to
each type -> load every file back with llama.cpp: tokenizer check, perplexity on the test set,
a chat reply, tokens/s -> perplexity of the merged model with transformers on the same ids.
"""

from __future__ import annotations

import argparse
import sys

from llmpipe.config import ParamsError, load_stage_params
from llmpipe.export.gguf import GGUFError
from llmpipe.export.quantize import run_quantize
from llmpipe.io import write_json, write_timings

PARAMS = ["quantize"]  # = this stage's params: in dvc.yaml


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=None)
    ap.add_argument("--model", default="models/merged")
    ap.add_argument("--test", default="data/split/test.jsonl")
    ap.add_argument("--out", default="models/gguf")
    ap.add_argument("--metrics", default="metrics/quantize.json")
    ap.add_argument("--timings-root", default=".", help="timings/quantize.json goes under this directory")
    args = ap.parse_args(argv)
    try:
        cfg = load_stage_params(PARAMS, args.params)
        run = run_quantize(cfg.quantize, args.model, args.test, args.out)
    except (GGUFError, ParamsError) as exc:
        print(f"[quantize] error: {exc}", file=sys.stderr)
        return 2
    write_json(args.metrics, run.metrics)
    write_timings("quantize", run.timings, root=args.timings_root)
    print(f"[quantize] wrote {len(run.metrics['gguf'])} GGUF files to {args.out} and {args.metrics} "
          f"in {run.timings['seconds']}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
