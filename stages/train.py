"""DVC stage `qlora-train`: train/val split + base model -> LoRA adapter, checkpoints, metrics.

in:  data/split/train.jsonl, data/split/val.jsonl, models/base/,
     params seed, model.max_seq_len, lora.*, train.*
out: models/adapter/ (final adapter + tokenizer), models/checkpoints/ (persist: resume source),
     dvclive/train/ (per-step plots), metrics/train.json

QLoRA (train.quantization: nf4) needs CUDA + bitsandbytes; elsewhere the stage says so and trains
LoRA in full precision, recording the mode actually used. With train.num_processes > 1 the stage
re-launches itself through `accelerate launch` (DDP, or FSDP with train.distributed: fsdp).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from llmpipe.io import atomic_dir, write_json, write_jsonl
from llmpipe.model.base import load_base_tokenizer
from llmpipe.model.source import ModelSourceError
from llmpipe.params import ParamsError, load_params, section
from llmpipe.train.config import LoraParams, TrainParams
from llmpipe.train.data import DataError, load_records, tokenize_records
from llmpipe.train.tracking import make_dvclive_callback
from llmpipe.train.trainer import log, model_fingerprint, train


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
    ap.add_argument("--skipped", default=None,
                    help="JSONL of examples not trained on, with reasons (default: <checkpoints>/skipped.jsonl)")
    ap.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")
    return ap.parse_args(argv)


def relaunch_with_accelerate(tp: TrainParams, argv: list[str]) -> int:
    """Run this stage under `accelerate launch` with tp.num_processes processes."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(tp.num_processes),
           "--num_machines", "1", "--mixed_precision", "no"]
    if tp.distributed == "fsdp":
        cmd.append("--use_fsdp")
    cmd += [os.path.abspath(__file__), *argv]
    log(f"launching {tp.num_processes} processes: {' '.join(cmd)}")
    return subprocess.call(cmd)


def main(argv: list[str] | None = None, callbacks=()) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    t0 = time.perf_counter()
    try:
        params = load_params(args.params)
        lora = LoraParams.from_params(section(params, "lora"))
        tp = TrainParams.from_params(section(params, "train"), seed=params.get("seed"))
        max_seq_len = int(section(params, "model")["max_seq_len"])
    except (ParamsError, KeyError, ValueError) as exc:
        print(f"[train] error: {exc}", file=sys.stderr)
        return 2
    if tp.num_processes > 1 and "LOCAL_RANK" not in os.environ:
        return relaunch_with_accelerate(tp, argv)

    try:
        tokenizer = load_base_tokenizer(args.base)
        train_data = tokenize_records(tokenizer, load_records(args.train), max_seq_len)
        val_data = tokenize_records(tokenizer, load_records(args.val), max_seq_len) if args.val else None
    except (DataError, ModelSourceError) as exc:
        print(f"[train] error: {exc}", file=sys.stderr)
        return 2
    if not train_data.input_ids:
        print(f"[train] error: {args.train}: no usable training examples "
              f"({len(train_data.skipped)} skipped, first: {train_data.skipped[:1]})", file=sys.stderr)
        return 2
    skipped = train_data.skipped + (val_data.skipped if val_data else [])
    for s in skipped[:10]:
        log(f"skipping example {s['id']}: {s['reason']}")

    resume = not args.no_resume
    live_resume = resume and any(Path(args.checkpoints).glob("checkpoint-*"))
    live_cb = make_dvclive_callback(args.live_dir, resume=live_resume)
    adapter_tmp = Path(args.adapter).parent / f".{Path(args.adapter).name}.train.tmp"
    shutil.rmtree(adapter_tmp, ignore_errors=True)
    try:
        out = train(args.base, train_data, val_data, lora, tp, max_seq_len, args.checkpoints, adapter_tmp,
                    callbacks=[live_cb, *callbacks], resume=resume, model_fingerprint=model_fingerprint(args.base))
    except ModelSourceError as exc:
        print(f"[train] error: {exc}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    with atomic_dir(args.adapter) as tmp:
        for f in adapter_tmp.iterdir():
            shutil.move(str(f), tmp / f.name)
    shutil.rmtree(adapter_tmp, ignore_errors=True)

    metrics = dict(out.metrics)
    metrics["lora"] = {"r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout, "use_dora": lora.use_dora,
                       "target_modules": lora.target_modules if isinstance(lora.target_modules, str)
                       else list(lora.target_modules)}
    metrics["stage_seconds"] = round(time.perf_counter() - t0, 2)
    live_cb.finish({k: v for k, v in metrics.items() if k in (
        "train_loss", "val_loss", "tokens_seen", "tokens_per_s", "peak_memory_gb")})
    write_jsonl(args.skipped or os.path.join(args.checkpoints, "skipped.jsonl"), skipped)
    write_json(args.metrics, metrics)
    log(f"done: mode={metrics['mode']} steps={metrics['steps']} train_loss={metrics['train_loss']} "
        f"val_loss={metrics['val_loss']} {metrics['tokens_per_s']} tok/s peak {metrics['peak_memory_gb']} GB "
        f"in {metrics['stage_seconds']}s -> {args.adapter}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
