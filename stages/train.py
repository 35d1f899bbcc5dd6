"""DVC stage `qlora-train`: train/val split + base model -> LoRA adapter, checkpoints, metrics.

in:  data/split/train.jsonl, data/split/val.jsonl, models/base/,
     params seed, model.max_seq_len, lora.*, train.*
out: models/adapter/ (final adapter + tokenizer), models/checkpoints/ (persist: resume source),
     dvclive/train/ (per-step plots), metrics/train.json; timings/qlora-train.json (not tracked)

QLoRA (train.quantization: nf4) needs CUDA + bitsandbytes; elsewhere the stage says so and trains
LoRA in full precision, recording the mode actually used. With train.num_processes > 1 the stage
re-runs itself under torchrun (DDP, or FSDP with train.distributed: fsdp; gloo on CPU).
"""

from __future__ import annotations

import argparse
import os
import sys

from llmpipe.config import ParamsError, load_stage_params
from llmpipe.io import write_json, write_jsonl, write_timings
from llmpipe.model.source import ModelSourceError
from llmpipe.train import launch
from llmpipe.train.data import DataError
from llmpipe.train.run import TrainPaths, run_training
from llmpipe.train.trainer import log

PARAMS = ["seed", "model.max_seq_len", "lora", "train"]


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=None)
    ap.add_argument("--base", default="models/base")
    ap.add_argument("--train", default="data/split/train.jsonl")
    ap.add_argument("--val", default="data/split/val.jsonl")
    ap.add_argument("--adapter", default="models/adapter")
    ap.add_argument("--checkpoints", default="models/checkpoints")
    ap.add_argument("--live-dir", default="dvclive/train")
    ap.add_argument("--metrics", default="metrics/train.json")
    ap.add_argument("--timings-root", default=".", help="timings/qlora-train.json goes under this directory")
    ap.add_argument("--skipped", default=None,
                    help="JSONL of examples not trained on, with reasons (default: <checkpoints>/skipped.jsonl)")
    ap.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None, callbacks=()) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        cfg = load_stage_params(PARAMS, args.params)
    except ParamsError as exc:
        print(f"[train] error: {exc}", file=sys.stderr)
        return 2
    if launch.needs_relaunch(cfg.train):
        return launch.relaunch(cfg.train, __file__, argv)

    paths = TrainPaths(base=args.base, train=args.train, val=args.val or None, adapter=args.adapter,
                       checkpoints=args.checkpoints, live_dir=args.live_dir)
    try:
        out = run_training(paths, seed=cfg.seed, max_seq_len=cfg.model.max_seq_len, lora=cfg.lora, tp=cfg.train,
                           callbacks=callbacks, resume=not args.no_resume)
    except (DataError, ModelSourceError) as exc:
        print(f"[train] error: {exc}", file=sys.stderr)
        return 2
    if out is None:        # rank > 0: rank 0 writes the outputs
        return 0
    write_jsonl(args.skipped or os.path.join(args.checkpoints, "skipped.jsonl"), out.skipped)
    write_json(args.metrics, out.metrics)
    write_timings("qlora-train", out.timings, root=args.timings_root)
    m, t = out.metrics, out.timings
    log(f"done: mode={m['mode']} steps={m['steps']} train_loss={m['train_loss']} val_loss={m['val_loss']} "
        f"{t['tokens_per_s']} tok/s peak {t['peak_memory_gb']} GB in {t['stage_seconds']}s -> {args.adapter}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
