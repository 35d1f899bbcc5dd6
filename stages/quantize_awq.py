"""DVC stage `quantize-awq`: merged HF model -> 4-bit AWQ (W4A16) checkpoint, with its perplexity.

in:  models/merged/, data/split/train.jsonl (calibration), data/split/test.jsonl (perplexity),
     params quantize_awq.* and the quantize stage's perplexity keys (same records as the GGUFs)
out: models/awq/ (compressed-tensors checkpoint + tokenizer + awq.json; only awq.json when
     quantize_awq.enabled is false), metrics/quantize_awq.json (size, perplexity and its delta vs
     the merged model); timings/quantize_awq.json (git-ignored, not a DVC output)

Recipe (llmpipe.export.awq): token ids made here -> llm-compressor AWQ in the AWQ venv
(`make setup-awq`, a subprocess) -> the saved checkpoint loaded back and scored on the ids.
"""

from __future__ import annotations

import argparse
import sys

from llmpipe.config import ParamsError, load_stage_params
from llmpipe.export.awq import AwqError, run_awq
from llmpipe.export.gguf import GGUFError
from llmpipe.io import write_json, write_timings

# = this stage's params: in dvc.yaml. The quantize keys are the perplexity set and thread count
# the quantize stage uses, so AWQ and GGUF perplexities are measured on the same token ids.
PARAMS = ["quantize_awq", "quantize.n_ctx", "quantize.ppl_max_examples", "quantize.n_threads",
          "quantize.reply_max_tokens"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=None)
    ap.add_argument("--model", default="models/merged")
    ap.add_argument("--train", default="data/split/train.jsonl")
    ap.add_argument("--test", default="data/split/test.jsonl")
    ap.add_argument("--out", default="models/awq")
    ap.add_argument("--metrics", default="metrics/quantize_awq.json")
    ap.add_argument("--timings-root", default=".", help="timings/quantize_awq.json goes under this directory")
    args = ap.parse_args(argv)
    try:
        cfg = load_stage_params(PARAMS, args.params)
        q = cfg.quantize
        run = run_awq(cfg.quantize_awq, args.model, args.train, args.test, args.out,
                      ppl_max_examples=q.ppl_max_examples, n_ctx=q.n_ctx, n_threads=q.n_threads,
                      reply_max_tokens=q.reply_max_tokens)
    except (AwqError, GGUFError, ParamsError) as exc:
        print(f"[quantize-awq] error: {exc}", file=sys.stderr)
        return 2
    write_json(args.metrics, run.metrics)
    write_timings("quantize_awq", run.timings, root=args.timings_root)
    if run.metrics["enabled"]:
        m = run.metrics
        print(f"[quantize-awq] wrote {args.out} ({m['size_mb']} MB, ppl {m['ppl']:.4f}, "
              f"{m['ppl_delta_pct']:+.2f}% vs merged) in {run.timings['seconds']}s", file=sys.stderr)
    else:
        print(f"[quantize-awq] quantize_awq.enabled is false: wrote only {args.out}/awq.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
