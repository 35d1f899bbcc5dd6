"""DVC stage `base-model`: params model.* -> a plain HF safetensors model directory.

in:  params model.name_or_path, model.dtype
out: models/base/ (config, safetensors weights, tokenizer + chat template), metrics/base_model.json
"""

from __future__ import annotations

import argparse
import sys
import time

from llmpipe.io import atomic_dir, write_json
from llmpipe.model.base import materialise
from llmpipe.model.source import ModelSourceError
from llmpipe.params import ParamsError, load_params, section


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=None)
    ap.add_argument("--out", default="models/base")
    ap.add_argument("--metrics", default="metrics/base_model.json")
    ap.add_argument("--no-smoke", action="store_true", help="skip the greedy smoke-test reply")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    try:
        model_params = section(load_params(args.params), "model")
        name = model_params.get("name_or_path")
        dtype = model_params.get("dtype", "float32")
        with atomic_dir(args.out) as tmp:
            info = materialise(name, tmp, dtype=dtype, smoke_prompt=None if args.no_smoke else
                               "What is the capital of France?")
    except (ModelSourceError, ParamsError) as exc:
        print(f"[base-model] error: {exc}", file=sys.stderr)
        return 2
    metrics = info.to_dict()
    metrics["seconds"] = round(time.perf_counter() - t0, 2)
    write_json(args.metrics, metrics)
    print(
        f"[base-model] {info.architecture} {info.num_parameters / 1e6:.1f}M params ({info.dtype}) "
        f"-> {args.out} in {metrics['seconds']}s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
