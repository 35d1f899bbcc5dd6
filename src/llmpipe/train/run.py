"""The qlora-train recipe: split files + base model -> adapter, checkpoints, plots, metrics, timings.

``run_training`` is what the stage calls (once per process; under torchrun every rank calls it).
It tokenises the splits with the base model's chat template, trains (``llmpipe.train.trainer``),
logs per-step plots with dvclive and returns what the stage writes. Non-zero ranks return None:
rank 0 alone writes outputs and metrics.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from llmpipe.config.model import LoraSection, TrainSection
from llmpipe.model.base import load_base_tokenizer
from llmpipe.train import launch
from llmpipe.train.data import DataError, load_records, tokenize_records
from llmpipe.train.tracking import make_dvclive_callback
from llmpipe.train.trainer import log, model_fingerprint, train

# Summary values dvclive writes to <live_dir>/metrics.json (results only: timings go elsewhere).
LIVE_SUMMARY = ("train_loss", "val_loss", "tokens_seen")


@dataclass(frozen=True)
class TrainPaths:
    base: str
    train: str
    val: str | None
    adapter: str
    checkpoints: str
    live_dir: str


@dataclass
class TrainResult:
    metrics: dict[str, Any]
    timings: dict[str, Any]
    skipped: list[dict[str, Any]] = field(default_factory=list)


def run_training(paths: TrainPaths, *, seed: int, max_seq_len: int, lora: LoraSection, tp: TrainSection,
                 callbacks: Sequence[Any] = (), resume: bool = True) -> TrainResult | None:
    """Train the adapter; return metrics, timings and the skipped examples (None on ranks > 0).

    Raises ``DataError`` when no example is usable and ``ModelSourceError`` for a bad base model.
    """
    t0 = time.perf_counter()
    tokenizer = load_base_tokenizer(paths.base)
    train_data = tokenize_records(tokenizer, load_records(paths.train), max_seq_len)
    val_data = tokenize_records(tokenizer, load_records(paths.val), max_seq_len) if paths.val else None
    if not train_data.input_ids:
        raise DataError(f"{paths.train}: no usable training examples ({len(train_data.skipped)} skipped, "
                        f"first: {train_data.skipped[:1]})")
    skipped = train_data.skipped + (val_data.skipped if val_data else [])
    main = launch.rank() == 0
    if main:
        for s in skipped[:10]:
            log(f"skipping example {s['id']}: {s['reason']}")

    live_cb = make_dvclive_callback(paths.live_dir)
    out = train(paths.base, train_data, val_data, lora, tp, seed=seed, max_seq_len=max_seq_len,
                checkpoint_dir=paths.checkpoints, adapter_dir=paths.adapter, callbacks=[live_cb, *callbacks],
                resume=resume, model_fingerprint=model_fingerprint(paths.base))
    if not main:
        return None
    metrics = dict(out.metrics)
    metrics["lora"] = {"r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout, "use_dora": lora.use_dora,
                       "target_modules": lora.target_modules_list()}
    live_cb.finish({k: metrics[k] for k in LIVE_SUMMARY})
    timings = {**out.timings, "stage_seconds": round(time.perf_counter() - t0, 2)}
    return TrainResult(metrics=metrics, timings=timings, skipped=skipped)
