"""DVC stage `base-model`: params model.* -> a plain HF safetensors model directory.

in:  params model.name_or_path, model.dtype
out: models/base/ (config, safetensors weights, tokenizer + chat template), metrics/base_model.json;
     timings/base-model.json (not tracked)
"""

from __future__ import annotations

import argparse
import sys
import time

from llmpipe.config import ParamsError, load_stage_params
from llmpipe.io import atomic_dir, write_json, write_timings
from llmpipe.model.base import SMOKE_PROMPT, materialise
from llmpipe.model.source import ModelSourceError

PARAMS = ["model.name_or_path", "model.dtype"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=None)
    ap.add_argument("--out", default="models/base")
    ap.add_argument("--metrics", default="metrics/base_model.json")
    ap.add_argument("--timings-root", default=".", help="timings/base-model.json goes under this directory")
    ap.add_argument("--no-smoke", action="store_true", help="skip the greedy smoke-test reply")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    try:
        cfg = load_stage_params(PARAMS, args.params)
        with atomic_dir(args.out) as tmp:
            info = materialise(cfg.model.name_or_path, tmp, dtype=cfg.model.dtype,
                               smoke_prompt=None if args.no_smoke else SMOKE_PROMPT)
    except (ModelSourceError, ParamsError) as exc:
        print(f"[base-model] error: {exc}", file=sys.stderr)
        return 2
    seconds = round(time.perf_counter() - t0, 2)
    write_json(args.metrics, info.to_dict())
    write_timings("base-model", {"seconds": seconds}, root=args.timings_root)
    print(f"[base-model] {info.architecture} {info.num_parameters / 1e6:.1f}M params ({info.dtype}) "
          f"-> {args.out} in {seconds}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
