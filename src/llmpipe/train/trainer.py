"""Supervised fine-tuning with TRL's SFTTrainer and a peft LoRA/DoRA adapter.

The dataset handed to SFTTrainer is already tokenised by :mod:`llmpipe.train.data` (``input_ids``
+ ``labels`` with the assistant-only mask), so TRL only packs (best-fit decreasing, padding-free:
examples are concatenated with restarting position ids and never attend to each other) or pads.

Checkpoints go to ``checkpoint_dir`` together with ``fingerprint.json`` (hash of the LoRA and
training params, the base weights and the tokenised data). A later run with the same fingerprint
resumes from the last checkpoint (optimizer, scheduler, RNG and data position included); a run with
a different fingerprint discards the stale checkpoints first and says so.

Checkpoints and the adapter hold results only: the Trainer's wall-clock fields (``*_runtime``,
``*_per_second`` in ``trainer_state.json``'s log history) are taken out as they are logged and
returned as timings, so two runs on the same inputs write byte-identical checkpoint directories.

Under several processes (``torchrun``, see ``llmpipe.train.launch``) every rank trains; rank 0
alone prepares the checkpoint directory (the others wait) and writes the adapter.
"""

from __future__ import annotations

import json
import math
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from llmpipe.config.model import LoraSection, TrainSection
from llmpipe.io import atomic_dir, sha256_text
from llmpipe.train import launch
from llmpipe.train.config import Runtime, fingerprint, resolve_runtime
from llmpipe.train.data import Tokenized
from llmpipe.train.memory import free_gpu_bytes, read_model_shape
from llmpipe.train.model import load_for_training, lora_config

FINGERPRINT_FILE = "fingerprint.json"


def log(msg: str) -> None:
    print(f"[train] {msg}", file=sys.stderr, flush=True)


def data_hash(tok: Tokenized) -> str:
    return sha256_text(json.dumps([tok.input_ids, tok.labels], separators=(",", ":")))[:16]


def model_fingerprint(model_dir: str | Path) -> str:
    """Cheap identity of a model dir: config + size and first MiB of every weights file."""
    import hashlib

    h = hashlib.sha256()
    model_dir = Path(model_dir)
    for p in sorted(model_dir.glob("*.json")) + sorted(model_dir.glob("*.safetensors")):
        h.update(p.name.encode())
        h.update(str(p.stat().st_size).encode())
        with open(p, "rb") as fh:
            h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def peak_memory_gb(device: str) -> float:
    if device == "cuda":
        import torch

        return round(torch.cuda.max_memory_allocated() / 1e9, 3)
    # ru_maxrss is in KiB on Linux: peak resident memory of this process.
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 3)


def _fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def _callbacks_base():
    from transformers import TrainerCallback

    return TrainerCallback


class _Progress:
    """Mixin-free factory for the stderr progress callback (built lazily: transformers import)."""

    @staticmethod
    def make():
        TrainerCallback = _callbacks_base()

        class ProgressCallback(TrainerCallback):
            """One line per logging step: step, loss, lr, tokens/s and ETA on stderr (rank 0)."""

            def __init__(self):
                self.t0 = None
                self.step0 = 0
                self.tok0 = 0
                self.last_train_loss = None
                self.last_eval_loss = None
                self.history: list[dict[str, Any]] = []

            def on_train_begin(self, args, state, control, **kw):
                self.t0 = time.perf_counter()
                self.step0 = state.global_step
                self.tok0 = state.num_input_tokens_seen or 0

            def on_log(self, args, state, control, logs=None, **kw):
                logs = dict(logs or {})
                if self.t0 is None or not state.is_world_process_zero:
                    return
                elapsed = time.perf_counter() - self.t0
                done = state.global_step - self.step0
                rate = done / elapsed if elapsed > 0 and done > 0 else 0.0
                left = state.max_steps - state.global_step
                eta = left / rate if rate > 0 else float("nan")
                toks = (state.num_input_tokens_seen or 0) - self.tok0
                tps = toks / elapsed if elapsed > 0 else 0.0
                parts = [f"step {state.global_step}/{state.max_steps}"]
                if "loss" in logs:
                    self.last_train_loss = float(logs["loss"])
                    parts.append(f"loss {logs['loss']:.4f}")
                if "eval_loss" in logs:
                    self.last_eval_loss = float(logs["eval_loss"])
                    parts.append(f"val_loss {logs['eval_loss']:.4f}")
                if "learning_rate" in logs:
                    parts.append(f"lr {logs['learning_rate']:.2e}")
                parts += [f"{tps:.0f} tok/s", f"elapsed {_fmt_eta(elapsed)}", f"ETA {_fmt_eta(eta)}"]
                log(" | ".join(parts))
                self.history.append({"step": state.global_step, **{k: v for k, v in logs.items()
                                                                    if isinstance(v, (int, float))}})

        return ProgressCallback()


def is_timing_key(key: str) -> bool:
    """Trainer log fields that measure wall-clock time (``train_runtime``, ``eval_samples_per_second``...)."""
    return key.endswith(("_runtime", "_per_second"))


def _timing_scrubber():
    """A callback that moves the wall-clock fields out of ``state.log_history`` as they are logged.

    ``Trainer.log`` appends a copy of the logs to ``state.log_history`` and then calls ``on_log``;
    the copy is what ``trainer_state.json`` saves in every checkpoint. Dropping the timing fields
    there keeps the checkpoints byte-stable (resume does not read them); they are kept in
    ``self.timings`` for the stage's timings file.
    """
    TrainerCallback = _callbacks_base()

    class TimingScrubber(TrainerCallback):
        def __init__(self):
            self.timings: dict[str, float] = {}

        def on_log(self, args, state, control, logs=None, **kw):
            if not state.log_history:
                return
            entry = state.log_history[-1]
            for key in [k for k in entry if is_timing_key(k)]:
                self.timings[key] = entry.pop(key)

    return TimingScrubber()


@dataclass
class TrainOutput:
    metrics: dict[str, Any]         # results: diffed by reviewers, equal on equal inputs
    timings: dict[str, Any]         # wall-clock and machine measurements (tokens/s, seconds, peak memory)
    runtime: Runtime
    adapter_dir: Path
    history: list[dict[str, Any]]


def prepare_checkpoints(checkpoint_dir: Path, fp: str, resume: bool, main: bool = True) -> str | None:
    """Return the checkpoint to resume from (or None); discard stale ones from another config.

    Only the main process (``main``) discards and writes; the others call it after it (see
    ``launch.main_first``) and only look up the checkpoint to resume.
    """
    from transformers.trainer_utils import get_last_checkpoint

    if not main:
        return get_last_checkpoint(str(checkpoint_dir)) if resume and checkpoint_dir.is_dir() else None
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    fp_file = checkpoint_dir / FINGERPRINT_FILE
    old = json.loads(fp_file.read_text())["fingerprint"] if fp_file.is_file() else None
    stale = [p for p in checkpoint_dir.glob("checkpoint-*") if p.is_dir()]
    why = None
    if stale and not resume:
        why = "resume disabled"
    elif stale and old != fp:
        why = f"fingerprint {old} != {fp} (params or data changed)"
    elif stale and (done := get_last_checkpoint(str(checkpoint_dir))) and _finished(Path(done)):
        # Checkpoints resume *interrupted* runs. The last one of a finished run holds nothing to
        # resume: "resuming" it would skip training and report the metrics of an empty run, and
        # a re-run (DVC re-runs the stage when its code changes) must exercise the code.
        why = f"{Path(done).name} is the end of a finished run: training from scratch (checkpoints resume interrupted runs)"
    if why:
        log(f"discarding {len(stale)} checkpoint(s) in {checkpoint_dir}: {why}")
        for p in stale:
            shutil.rmtree(p)
    fp_file.write_text(json.dumps({"fingerprint": fp}) + "\n")
    last = get_last_checkpoint(str(checkpoint_dir)) if resume else None
    if last:
        log(f"resuming from {last}")
    return last


def _finished(checkpoint: Path) -> bool:
    """True when the checkpoint's trainer state says its run reached max_steps."""
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        return int(state["global_step"]) >= int(state["max_steps"]) > 0
    except (OSError, ValueError, KeyError, TypeError):
        return False


def sort_target_modules(adapter_dir: Path) -> None:
    """peft writes ``target_modules`` from a set, so its order follows Python's per-process string
    hashing and the adapter dir's hash changed on every re-run with bit-identical weights (and DVC
    then re-ran merge). Sorting it makes the saved adapter byte-reproducible."""
    path = adapter_dir / "adapter_config.json"
    if not path.is_file():
        return
    cfg = json.loads(path.read_text())
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
        path.write_text(json.dumps(cfg, indent=2, sort_keys=True))   # peft's own layout


def sort_model_card_tags(card: Path) -> None:
    """TRL writes a model card (README.md) into the output dir on every save, its ``tags`` built
    from a set: their order followed the per-process string hashing, so the checkpoints dir's hash
    changed on a re-run with identical weights (seen in CI). Sorting the list makes it stable."""
    if not card.is_file():
        return
    lines = card.read_text().split("\n")
    if not lines or lines[0] != "---" or "---" not in lines[1:]:
        return
    end = lines.index("---", 1)
    i = 1
    while i < end:
        if lines[i].rstrip() == "tags:":
            j = i + 1
            while j < end and lines[j].startswith("- "):
                j += 1
            lines[i + 1:j] = sorted(lines[i + 1:j])
            i = j
        else:
            i += 1
    card.write_text("\n".join(lines))


def _stable_checkpoint_files():
    """A callback that makes every save byte-stable (rank 0): ``target_modules`` sorted in the
    checkpoint's adapter_config.json, tags sorted in the model cards TRL and peft write."""
    TrainerCallback = _callbacks_base()

    class StableCheckpoint(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if state.is_world_process_zero:
                ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                sort_target_modules(ckpt)
                for card in (Path(args.output_dir) / "README.md", ckpt / "README.md"):
                    sort_model_card_tags(card)

    return StableCheckpoint()


def compile_decoder_layers(model) -> int:
    """Regional compilation: ``torch.compile`` each decoder layer (in place), not the whole model.

    The layers share one code path, so the compiled graph (forward + backward, LoRA and dropout
    fused into the surrounding kernels) is built once and reused by every layer; shapes are
    dynamic because packed micro-batches vary in length. Gradient checkpointing stays outside the
    compiled region (transformers' checkpointing wrapper calls the compiled layer). Compilation
    errors fall back to eager for that frame (``suppress_errors``). Returns the number of layers.
    """
    import torch
    import torch._dynamo

    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # pragma: no cover - older transformers
        return 0
    torch._dynamo.config.suppress_errors = True
    for key in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, key):
            setattr(torch._dynamo.config, key, max(64, getattr(torch._dynamo.config, key)))
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def build_sft_config(tp: TrainSection, runtime: Runtime, checkpoint_dir: Path, max_seq_len: int,
                     has_eval: bool, seed: int):
    from trl import SFTConfig

    kw: dict[str, Any] = {}
    if runtime.distributed == "fsdp":
        kw["fsdp"] = "full_shard auto_wrap"
        kw["fsdp_config"] = {"activation_checkpointing": runtime.gradient_checkpointing, "use_orig_params": True}
    return SFTConfig(
        output_dir=str(checkpoint_dir),
        seed=seed,
        data_seed=seed,
        learning_rate=tp.learning_rate,
        lr_scheduler_type=tp.lr_scheduler,
        warmup_steps=tp.warmup_ratio,
        weight_decay=tp.weight_decay,
        max_grad_norm=tp.max_grad_norm,
        num_train_epochs=tp.epochs,
        max_steps=tp.max_steps,
        per_device_train_batch_size=runtime.micro_batch_size,
        per_device_eval_batch_size=tp.per_device_batch_size,
        gradient_accumulation_steps=runtime.gradient_accumulation_steps,
        max_length=max_seq_len,
        packing=tp.packing,
        packing_strategy="bfd",
        eval_packing=tp.packing,
        gradient_checkpointing=runtime.gradient_checkpointing and "activation_checkpointing" not in kw.get(
            "fsdp_config", {}),
        gradient_checkpointing_kwargs={"use_reentrant": False},
        optim=runtime.optimizer,
        bf16=runtime.precision == "bf16",
        fp16=runtime.precision == "fp16",
        use_cpu=runtime.device == "cpu",
        use_liger_kernel=runtime.liger_kernel,
        activation_offloading=runtime.activation_offloading,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=tp.eval_steps,
        save_strategy="steps",
        save_steps=tp.save_steps,
        save_total_limit=tp.save_total_limit,
        logging_steps=tp.logging_steps,
        logging_first_step=True,
        report_to="none",
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=tp.dataloader_workers,
        ddp_find_unused_parameters=False,
        **kw,
    )


# Keys of train.* that change neither the numbers nor the data order (left out of the fingerprint,
# so a checkpoint resumes across them). The micro-batch in use is in it, via the runtime.
NOT_FINGERPRINTED = ("eval_steps", "save_steps", "save_total_limit", "logging_steps", "dataloader_workers",
                     "cpu_threads", "compile", "activation_offloading", "gradient_checkpointing",
                     "micro_batch_size")


def machine_runtime(model_dir: str | Path, lora: LoraSection, tp: TrainSection, max_seq_len: int) -> Runtime:
    """``resolve_runtime`` with this machine's facts: the model's shape and the free GPU memory
    (the smallest over all ranks, so every process picks the same plan)."""
    import torch

    cuda = torch.cuda.is_available()
    free = None
    if cuda:
        free = launch.world_min(free_gpu_bytes(launch.local_rank()))
    return resolve_runtime(tp, lora, seq_len=max_seq_len, shape=read_model_shape(model_dir), cuda=cuda,
                           free_bytes=free)


def train(
    model_dir: str | Path,
    train_data: Tokenized,
    val_data: Tokenized | None,
    lora: LoraSection,
    tp: TrainSection,
    *,
    seed: int,
    max_seq_len: int,
    checkpoint_dir: str | Path,
    adapter_dir: str | Path,
    callbacks: Sequence[Any] = (),
    resume: bool = True,
    runtime: Runtime | None = None,
    model_fingerprint: str = "",
) -> TrainOutput:
    """Train a LoRA adapter on ``train_data``; rank 0 saves it to ``adapter_dir`` (atomically)."""
    import torch
    from transformers import set_seed
    from trl import SFTTrainer

    from llmpipe.model.base import load_base_tokenizer

    launch.init_distributed(torch.cuda.is_available())
    main = launch.rank() == 0
    runtime = runtime or machine_runtime(model_dir, lora, tp, max_seq_len)
    if main:
        for note in runtime.notes:
            log(f"NOTE: {note}")
        log(f"path: device={runtime.device} mode={runtime.mode} precision={runtime.precision} "
            f"optimizer={runtime.optimizer} grad_ckpt={runtime.gradient_checkpointing} "
            f"micro_batch={runtime.micro_batch_size}x{runtime.gradient_accumulation_steps} "
            f"liger={runtime.liger_kernel} attn={runtime.attn_implementation} compile={runtime.compile} "
            f"offload={runtime.activation_offloading} packing={tp.packing} processes={launch.world_size()}")
        log(f"memory plan: {runtime.picked['reason']}")
    checkpoint_dir, adapter_dir = Path(checkpoint_dir), Path(adapter_dir)
    fp = fingerprint(lora, {k: v for k, v in tp.model_dump().items() if k not in NOT_FINGERPRINTED}, seed,
                     runtime.mode, runtime.precision, runtime.micro_batch_size, max_seq_len, model_fingerprint,
                     data_hash(train_data), data_hash(val_data) if val_data else None)
    with launch.main_first():
        last = prepare_checkpoints(checkpoint_dir, fp, resume, main=main)

    set_seed(seed)
    if runtime.device == "cpu" and tp.cpu_threads > 0:
        torch.set_num_threads(tp.cpu_threads)
    tokenizer = load_base_tokenizer(model_dir)
    model = load_for_training(model_dir, runtime)
    progress, scrubber = _Progress.make(), _timing_scrubber()
    args = build_sft_config(tp, runtime, checkpoint_dir, max_seq_len, has_eval=val_data is not None, seed=seed)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_data.to_dataset(),
        eval_dataset=val_data.to_dataset() if val_data is not None else None,
        processing_class=tokenizer,
        peft_config=lora_config(lora),
        callbacks=[scrubber, _stable_checkpoint_files(), progress, *callbacks],
    )
    if runtime.compile:
        n_layers = compile_decoder_layers(trainer.model)
        log(f"torch.compile: {n_layers} decoder layers compiled regionally (first steps include compile time)")
    if main:
        n_train = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in trainer.model.parameters())
        log(f"{len(train_data.input_ids)} train examples ({train_data.num_tokens} tokens, "
            f"{train_data.num_target_tokens} target); trainable params {n_train:,} / {n_all:,}")
    if runtime.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    tokens_before = 0
    if last:
        state_file = Path(last) / "trainer_state.json"
        if state_file.is_file():
            tokens_before = int(json.loads(state_file.read_text()).get("num_input_tokens_seen") or 0)
    result = trainer.train(resume_from_checkpoint=last)
    wall = time.perf_counter() - t0
    eval_loss = None
    if val_data is not None:
        evals = [h for h in trainer.state.log_history if "eval_loss" in h]
        if evals and evals[-1].get("step") == trainer.state.global_step:
            eval_loss = float(evals[-1]["eval_loss"])       # the last step was just evaluated
        else:
            eval_loss = float(trainer.evaluate()["eval_loss"])
    tokens_seen = int(trainer.state.num_input_tokens_seen or 0)
    metrics = {
        "mode": runtime.mode,
        "device": runtime.device,
        "precision": runtime.precision,
        "optimizer": runtime.optimizer,
        "gradient_checkpointing": runtime.gradient_checkpointing,
        "liger_kernel": runtime.liger_kernel,
        "attn_implementation": runtime.attn_implementation,
        "compile": runtime.compile,
        "activation_offloading": runtime.activation_offloading,
        "micro_batch_size": runtime.micro_batch_size,
        "gradient_accumulation_steps": runtime.gradient_accumulation_steps,
        "picked": runtime.picked,
        "packing": tp.packing,
        "distributed": runtime.distributed,
        "fallback_notes": list(runtime.notes),
        "train_loss": progress.last_train_loss,
        "train_loss_mean": float(result.training_loss),
        "val_loss": eval_loss,
        "steps": int(trainer.state.global_step),
        "epochs": round(float(trainer.state.epoch or 0.0), 4),
        "tokens_seen": tokens_seen,
        "resumed_from": Path(last).name if last else None,
        "train_examples": len(train_data.input_ids),
        "val_examples": len(val_data.input_ids) if val_data is not None else 0,
        "skipped_examples": len(train_data.skipped) + (len(val_data.skipped) if val_data else 0),
        "fingerprint": fp,
        "world_size": int(trainer.args.world_size),
    }
    timings = {
        "tokens_per_s": round((tokens_seen - tokens_before) / wall, 2) if wall > 0 else None,
        "train_seconds": round(wall, 2),
        "peak_memory_gb": peak_memory_gb(runtime.device),
        **{f"trainer_{k}": v for k, v in scrubber.timings.items()},
    }
    # Under FSDP the parameters are sharded across the ranks: gathering them is a collective that
    # every rank joins; rank 0 then saves the adapter from the gathered state dict.
    full_state = trainer.accelerator.get_state_dict(trainer.model) if trainer.is_fsdp_enabled else None
    if main:
        with atomic_dir(adapter_dir) as tmp:
            trainer.model.save_pretrained(str(tmp), **({"state_dict": full_state} if full_state is not None else {}))
            tokenizer.save_pretrained(str(tmp))
            sort_target_modules(tmp)
            sort_model_card_tags(tmp / "README.md")
    return TrainOutput(metrics=metrics, timings=timings, runtime=runtime, adapter_dir=adapter_dir,
                       history=progress.history)
