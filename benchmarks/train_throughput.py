"""Training-step throughput: tokens/s, peak GPU memory, MFU and loss curves of LoRA / QLoRA fine-tuning.

Runs, each in its own process (clean peak-memory numbers), on one random-weight model of the
Llama-3.1-8B shape (hidden 4096, 32 layers, 14336 intermediate, 32 heads, 8 KV heads, vocab
128256; weights > 64 MiB cannot travel to the device, so the model is built there). All runs see
the same synthetic chat-like data (variable-length examples, prompt masked, reply + EOS trained;
replies follow a fixed random bigram rule over a 4096-token sub-vocabulary, so the loss falls
visibly within 50 steps and a wrong mask, shift or loss scale would show in the curves), and the
same number of tokens per optimizer step: ``--rows`` packed rows of ``--seq-len`` tokens (BFD
packing, as the stage does).

* ``baseline_lora`` / ``baseline_qlora``: a plain transformers + peft loop as in the issue (sdpa,
  gradient checkpointing, batch 1 x seq-len: one packed row per forward, torch AdamW), with
  gradient accumulation over the ``--rows`` rows of an optimizer step (loss = sum over the step's
  target tokens / their count, the transformers ``num_items_in_batch`` convention). Each row is
  one causal sequence (examples see their predecessors: plain packing).
* ``stage_*``: the qlora-train stage's own training path, ``llmpipe.train.trainer.train`` (TRL
  SFTTrainer, peft, the stage's runtime resolution): padding-free packing, no cross-example
  attention (varlen flash attention), TRL's chunked LM head + cross-entropy (no full logits), the
  ``--rows`` rows of a step in one micro-batch (``per_device_batch_size``), and regional
  ``torch.compile`` of the decoder layers (``train.compile: auto``). ``_offload`` adds TRL's
  activation offloading (``train.activation_offloading: true``), ``_d0`` sets LoRA dropout 0.
  Ablation rows switch one technique off (``_nocompile``, ``_mb1``/``_mb2``: fewer rows per
  micro-batch + gradient accumulation). Every stage run records the micro-batches its model saw
  (``<model-dir>/batches_<config>.pt``).
* ``baseline_*_replay``: the plain loop on exactly those recorded micro-batches (same tokens, order
  and example segments, given as position ids so sdpa keeps examples apart): the loss-curve
  reference (``loss_vs_replay``). A ``_seed1`` twin (another LoRA init) gives the noise band
  (``loss_vs_seed0``).

LoRA r=16, alpha=32, dropout 0.05 (``_d0``: 0), all-linear everywhere; lr 2e-4 constant, max grad norm 1.0, no
weight decay in both loops. tokens/s counts real (non-padding) input tokens over the timed
optimizer steps (after warm-up); MFU = tokens/s * 4 * N_params / peak (4 N: forward 2N + backward
w.r.t. activations 2N; frozen weights get no gradient; recomputation is not counted), with peak =
989.4 TFLOP/s dense bf16 (H100/H200 SXM datasheet). Loss comparisons (``compare_losses``) cover
all steps, warm-up included.

Usage (on a CUDA box; ``--shape tiny`` / ``micro`` run small models anywhere, e.g. in the tests):
    PYTHONPATH=src python benchmarks/train_throughput.py --out benchmarks/results/train_throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from llmpipe.io import write_json

PEAK_BF16_FLOPS = 989.4e12
SHAPES = {
    "llama3-8b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                      rope_theta=500000.0, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=49152, max_position_embeddings=4096, tie_word_embeddings=True),
    # A 512-token vocabulary: the bigram data is learnable in a few steps (tests compare loss curves).
    "micro": dict(hidden_size=128, num_hidden_layers=2, intermediate_size=256, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, max_position_embeddings=4096, tie_word_embeddings=True),
}
# name -> (kind, mode, train.* overrides for stage runs). "mb": packed rows per micro-batch
# (gradient accumulation makes up the rest of --rows); absent = all --rows rows in one micro-batch.
CONFIGS = {
    "baseline_lora": ("baseline", "lora", {}),
    "baseline_qlora": ("baseline", "qlora", {}),
    # LoRA dropout 0.05, 2 rows per micro-batch + 2 accumulation steps: under the baseline's peak
    # without offloading; all 4 rows in one micro-batch (stage_lora_mb4) is faster but ~1 GB over it.
    "stage_lora": ("stage", "lora", {"mb": 2}),
    "stage_qlora": ("stage", "qlora", {}),
    "stage_lora_mb4": ("stage", "lora", {}),
    "stage_lora_nocompile": ("stage", "lora", {"mb": 2, "compile": "false"}),
    "stage_lora_mb4_nocompile": ("stage", "lora", {"compile": "false"}),
    "stage_qlora_nocompile": ("stage", "qlora", {"compile": "false"}),
    "stage_lora_mb1": ("stage", "lora", {"mb": 1}),
    "stage_qlora_mb1": ("stage", "qlora", {"mb": 1}),
    "stage_lora_mb1_nocompile": ("stage", "lora", {"mb": 1, "compile": "false"}),
    "stage_qlora_mb1_nocompile": ("stage", "qlora", {"mb": 1, "compile": "false"}),
    "stage_qlora_mb2": ("stage", "qlora", {"mb": 2}),
    "stage_lora_sdpa": ("stage", "lora", {"attn_implementation": "sdpa"}),
    "stage_lora_nockpt": ("stage", "lora", {"gradient_checkpointing": "false"}),
    "stage_qlora_nockpt": ("stage", "qlora", {"gradient_checkpointing": "false"}),
    "stage_lora_liger": ("stage", "lora", {"liger_kernel": "true"}),
    # LoRA dropout 0 (peft's default): the LoRA branch reads x itself, so no dropped copy of x is
    # kept per adapted layer (7 per decoder layer); baseline and stage both run it.
    "baseline_lora_d0": ("baseline", "lora", {"lora_dropout": 0.0}),
    "stage_lora_d0": ("stage", "lora", {"mb": 2, "lora_dropout": 0.0}),
    "stage_lora_mb4_d0": ("stage", "lora", {"lora_dropout": 0.0}),
    # Activation offloading (TRL, train.activation_offloading): the checkpointed layer inputs go to
    # pinned CPU memory on a side stream and come back for the backward.
    "stage_lora_mb4_d0_offload": ("stage", "lora", {"lora_dropout": 0.0, "activation_offloading": "true"}),
    "stage_lora_mb4_offload": ("stage", "lora", {"activation_offloading": "true"}),
    "stage_qlora_offload": ("stage", "qlora", {"activation_offloading": "true"}),
    # Run-to-run noise of the loss curve: the baseline again with another LoRA-init seed (same data).
    "baseline_lora_d0_seed1": ("baseline", "lora", {"lora_dropout": 0.0, "seed": 1}),
    "baseline_lora_seed1": ("baseline", "lora", {"seed": 1}),
    # Correctness reference: the plain loop replaying the exact micro-batches a stage run recorded
    # (same tokens, same order, same steps), split into <= --seq-len rows at example boundaries and
    # given the examples' position ids, so sdpa attends within each example only, as the stage does.
    # Run it after the stage config it names; the _seed1 twin gives the run-to-run noise band.
    "baseline_lora_d0_replay": ("baseline", "lora", {"lora_dropout": 0.0, "replay": "stage_lora_mb4_d0_offload"}),
    "baseline_lora_d0_replay_seed1": ("baseline", "lora", {"lora_dropout": 0.0, "seed": 1,
                                                           "replay": "stage_lora_mb4_d0_offload"}),
    "baseline_qlora_replay": ("baseline", "qlora", {"replay": "stage_qlora"}),
    # Memory-aware auto (issue 16): no knob set, the stage picks checkpointing, micro-batch and
    # offloading from the model size, --seq-len and the free GPU memory. "mem_gb" caps this
    # process's GPU memory (torch.cuda.set_per_process_memory_fraction) to simulate a smaller card.
    "stage_lora_auto": ("stage", "lora", {"auto": True}),
    "stage_qlora_auto": ("stage", "qlora", {"auto": True}),
    "stage_lora_auto_80gb": ("stage", "lora", {"auto": True, "mem_gb": 80}),
    "stage_qlora_auto_80gb": ("stage", "qlora", {"auto": True, "mem_gb": 80}),
}
LORA_DROPOUT = 0.05
LR = 2e-4
SUBVOCAB = 4096


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _tokenizer(tokenizer_dir: Path):
    """The project's tokenizer if there, else a minimal one (the data is already token ids)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if (tokenizer_dir / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(tokenizer_dir)
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>")


def build_model(model_dir: Path, shape: str, tokenizer_dir: Path) -> int:
    """Random-weight model of ``shape`` saved as bf16 safetensors (+ a tokenizer) in ``model_dir``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tokenizer(tokenizer_dir)
    cfg = LlamaConfig(**SHAPES[shape], pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=tok.bos_token_id)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    log(f"built {shape} model: {n / 1e9:.3f}B params in {time.perf_counter() - t0:.1f}s -> {model_dir}")
    del model
    return n


def synthetic_examples(vocab: int, eos: int, n_tokens: int, seq_len: int, seed: int = 0):
    """Variable-length chat-like examples (prompt masked, reply + EOS trained) totalling n_tokens.

    Tokens come from a 4096-id sub-vocabulary; each next token follows a fixed random bigram
    table with probability 0.75 (else uniform), so the loss can fall from ln(vocab) towards ~2.6.
    """
    import random

    from llmpipe.train.data import IGNORE_INDEX, Tokenized

    rng = random.Random(seed)
    lo = 4
    sub = min(SUBVOCAB, vocab - lo)
    table = [rng.randrange(sub) for _ in range(sub)]
    out = Tokenized()
    total = 0
    while total < n_tokens:
        length = min(seq_len, int(rng.lognormvariate(6.0, 0.6)) + 32)   # median ~430 tokens
        prompt = max(8, int(length * rng.uniform(0.5, 0.8)))
        t = rng.randrange(sub)
        ids = []
        for _ in range(length - 1):
            ids.append(lo + t)
            t = table[t] if rng.random() < 0.75 else rng.randrange(sub)
        ids.append(eos)
        labels = [IGNORE_INDEX] * prompt + ids[prompt:]
        out.input_ids.append(ids)
        out.labels.append(labels)
        out.ids.append(str(len(out.ids)))
        total += length
    return out


def bench_data(cfg: dict, seq_len: int, rows: int, total_steps: int):
    return synthetic_examples(cfg["vocab_size"], cfg["eos_token_id"], int(seq_len * rows * (total_steps + 2) * 1.15),
                              seq_len)


def _profile_to(name: str):
    d = os.environ.get("BENCH_PROFILE_DIR")
    return Path(d) / f"profile_{name}.txt" if d else None


def _write_profile(prof, path: Path, wall: float) -> None:
    ka = prof.key_averages()
    gpu_total = sum(getattr(e, "self_device_time_total", 0) for e in ka) / 1e6
    txt = [f"profiled wall {wall:.3f}s, summed GPU kernel time {gpu_total:.3f}s",
           ka.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=70)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(txt))
    log(f"profile -> {path} (wall {wall:.3f}s, GPU kernels {gpu_total:.3f}s)")


def _timing_callback(warmup: int, name: str):
    import torch
    from transformers import TrainerCallback

    prof_path = _profile_to(name)

    class Timing(TrainerCallback):
        def __init__(self):
            self.t = None
            self.tok = 0
            self.losses = []
            self.times = []
            self.tokens = 0
            self.prof = None

        def on_step_begin(self, args, state, control, **kw):
            if prof_path and state.global_step == warmup - 2 and warmup >= 3:
                torch.cuda.synchronize()
                self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                               torch.profiler.ProfilerActivity.CUDA])
                self.prof.__enter__()
                self.pt = time.perf_counter()
            if state.global_step == warmup:
                if self.prof is not None:
                    torch.cuda.synchronize()
                    wall = time.perf_counter() - self.pt
                    self.prof.__exit__(None, None, None)
                    _write_profile(self.prof, prof_path, wall)
                    self.prof = None
                torch.cuda.synchronize() if torch.cuda.is_available() else None
                self.t = time.perf_counter()
                self.tok = state.num_input_tokens_seen

        def on_step_end(self, args, state, control, **kw):
            # Synchronise only after the last step: a sync per step would stall the launch queue.
            if self.t is not None and state.global_step >= state.max_steps:
                torch.cuda.synchronize() if torch.cuda.is_available() else None
                self.times.append(time.perf_counter() - self.t)
                self.tokens = state.num_input_tokens_seen - self.tok

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    return Timing()


def _recording_callback(path: Path, grad_accum: int):
    """Records every training micro-batch the stage's model sees (input_ids, position_ids, labels),
    kept on the GPU (asynchronous copies, no host sync; ~10 MB for 50 steps of 8192 tokens, which
    shows in the peak: 19.497 vs 19.488 GB) and saved once at the end: the replay baseline
    (``baseline_*_replay``) then trains on exactly these tokens in exactly this order."""
    import torch
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        def __init__(self):
            self.batches = []
            self.handle = None

        def on_train_begin(self, args, state, control, model=None, **kw):
            def hook(module, a, kwargs):
                if module.training and kwargs.get("input_ids") is not None:
                    self.batches.append({k: kwargs[k].detach().clone() for k in ("input_ids", "position_ids", "labels")
                                         if kwargs.get(k) is not None})
            self.handle = model.register_forward_pre_hook(hook, with_kwargs=True)

        def on_train_end(self, args, state, control, **kw):
            self.handle.remove()
            torch.save({"grad_accum": grad_accum,
                        "batches": [{k: v.cpu() for k, v in b.items()} for b in self.batches]}, path)
            log(f"recorded {len(self.batches)} micro-batches -> {path}")

    return Recorder()


def run_stage(name: str, model_dir: Path, mode: str, overrides: dict, steps: int, warmup: int, seq_len: int,
              rows: int) -> dict:
    import torch

    from llmpipe.config import load_params
    from llmpipe.config.model import LoraSection, TrainSection
    from llmpipe.train.trainer import machine_runtime, train

    cfg = json.loads((model_dir / "config.json").read_text())
    total = warmup + steps
    overrides = dict(overrides)
    os.environ.update(overrides.pop("env", {}))
    auto = bool(overrides.pop("auto", False))
    mem_gb = overrides.pop("mem_gb", None)
    if mem_gb and torch.cuda.is_available():
        total_bytes = torch.cuda.mem_get_info()[1]
        torch.cuda.set_per_process_memory_fraction(min(1.0, mem_gb * 1e9 / total_bytes))
        log(f"GPU memory capped at {mem_gb} GB of {total_bytes / 1e9:.1f} GB")
    mb = overrides.pop("mb", "auto" if auto else rows)
    dropout = float(overrides.pop("lora_dropout", LORA_DROPOUT))
    # The rest of train.* comes from params.yaml (no defaults in code). Rows other than *_auto pin
    # what "auto" meant before the memory-aware rule: checkpointing on CUDA, no offloading, mb rows per forward.
    tp_kw = load_params(Path(__file__).resolve().parents[1] / "params.yaml").train.model_dump()
    tp_kw.update(quantization="nf4" if mode == "qlora" else "none", max_steps=total, learning_rate=LR,
                 lr_scheduler="constant", warmup_ratio=0.0, weight_decay=0.0, max_grad_norm=1.0,
                 per_device_batch_size=rows, gradient_accumulation_steps=1, micro_batch_size=mb, packing=True,
                 logging_steps=1, save_steps=10**6, eval_steps=10**6, num_processes=1)
    if not auto:
        tp_kw.update(gradient_checkpointing=torch.cuda.is_available(), activation_offloading=False)
    tp_kw.update({k: {"true": True, "false": False}.get(v, v) for k, v in overrides.items()})
    tp = TrainSection(**tp_kw)
    lora = LoraSection(r=16, alpha=32, dropout=dropout, target_modules="all-linear", use_dora=False)
    runtime = machine_runtime(model_dir, lora, tp, seq_len)
    data = bench_data(cfg, seq_len, rows, total)
    timing = _timing_callback(warmup, name)
    recorder = _recording_callback(model_dir / f"batches_{name}.pt", runtime.gradient_accumulation_steps)
    work = Path(os.environ.get("BENCH_WORK", "/tmp/bench_work")) / f"run{os.getpid()}"
    out = train(model_dir, data, None, lora, tp, seed=0, max_seq_len=seq_len, checkpoint_dir=work / "ckpt",
                adapter_dir=work / "adapter", callbacks=[timing, recorder], resume=False, runtime=runtime)
    elapsed = timing.times[-1] if timing.times else float("nan")
    return {"tokens_per_s": timing.tokens / elapsed, "timed_steps": steps,
            "timed_tokens": timing.tokens, "peak_mem_gb": out.timings["peak_memory_gb"],
            "losses": timing.losses, "runtime": runtime.to_dict(), "rows_per_micro_batch": runtime.micro_batch_size,
            "gradient_accumulation_steps": runtime.gradient_accumulation_steps, "step_s": round(elapsed / steps, 4),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}


def packed_rows(data, seq_len: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """The examples packed into rows exactly as the stage packs them (TRL BFD), in a seeded order."""
    import random

    from trl.data_utils import pack_dataset

    packed = pack_dataset(data.to_dataset(), seq_len, strategy="bfd")
    rows = list(zip(packed["input_ids"], packed["labels"]))
    random.Random(seed).shuffle(rows)
    return rows


def replayed_steps(path: Path, seq_len: int, n_steps: int) -> list[list[tuple[list[int], list[int], list[int]]]]:
    """The micro-batches a stage run recorded, regrouped per optimizer step and cut into rows of at most
    ``seq_len`` tokens at example boundaries (``position_ids == 0``): [(input_ids, labels, position_ids)]."""
    import torch

    if not path.is_file():
        raise SystemExit(f"{path}: no recorded stage batches (run the stage config it replays first)")
    rec = torch.load(path)
    ga, batches = int(rec["grad_accum"]), rec["batches"]
    if len(batches) < n_steps * ga:
        raise SystemExit(f"{path}: {len(batches)} micro-batches recorded, {n_steps * ga} needed")
    steps = []
    for s in range(n_steps):
        rows: list[tuple[list[int], list[int], list[int]]] = []
        for b in batches[s * ga:(s + 1) * ga]:
            ids, lab, pos = (b[k][0].tolist() for k in ("input_ids", "labels", "position_ids"))
            starts = [i for i, p in enumerate(pos) if p == 0] + [len(ids)]
            cur = 0     # start of the row being filled
            for a, e in zip(starts, starts[1:]):
                if e - cur > seq_len:
                    rows.append((ids[cur:a], lab[cur:a], pos[cur:a]))
                    cur = a
            rows.append((ids[cur:], lab[cur:], pos[cur:]))
        steps.append(rows)
    return steps


def run_baseline(name: str, model_dir: Path, mode: str, steps: int, warmup: int, seq_len: int, rows: int,
                 dropout: float = 0.05, seed: int = 0, replay: str | None = None) -> dict:
    """Plain transformers + peft loop: sdpa, gradient checkpointing, batch 1 (one packed row per forward),
    gradient accumulation over ``rows`` rows per optimizer step. With ``replay``: the rows are the
    recorded micro-batches of that stage config (see ``replayed_steps``), with their position ids."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cuda = torch.cuda.is_available()
    torch.manual_seed(0)
    # bf16 weights + autocast on CUDA (as in the issue); fp32 on CPU, where the stage trains in fp32 too
    kw = {"dtype": torch.bfloat16 if cuda else torch.float32, "attn_implementation": "sdpa"}
    if cuda:
        kw["device_map"] = {"": 0}
    if mode == "qlora":
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kw)
    model.config.use_cache = False
    if mode == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    torch.manual_seed(seed)     # LoRA init (and dropout masks); the data and its order never change
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    cfg = json.loads((model_dir / "config.json").read_text())
    if replay:
        plan = replayed_steps(model_dir / f"batches_{replay}.pt", seq_len, warmup + steps)
    else:
        data = packed_rows(bench_data(cfg, seq_len, rows, warmup + steps), seq_len)
        plan = [[(*data[(step * rows + i) % len(data)], None) for i in range(rows)] for step in range(warmup + steps)]
    dev = "cuda" if cuda else "cpu"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    losses, t0, tokens = [], None, 0
    prof_path, prof = _profile_to(name), None
    for step in range(warmup + steps):
        if prof_path and cuda and step == warmup - 2 and warmup >= 3:
            torch.cuda.synchronize()
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                      torch.profiler.ProfilerActivity.CUDA])
            prof.__enter__()
            pt = time.perf_counter()
        if step == warmup:
            if cuda:
                torch.cuda.synchronize()
            if prof is not None:
                wall = time.perf_counter() - pt
                prof.__exit__(None, None, None)
                _write_profile(prof, prof_path, wall)
                prof = None
            t0 = time.perf_counter()
        batch = plan[step]
        n_items = sum(sum(1 for t in lab[1:] if t != -100) for _, lab, _ in batch)
        step_loss = torch.zeros((), device=dev)
        for ids, lab, pos in batch:
            x = torch.tensor([ids], device=dev)
            y = torch.tensor([lab], device=dev)
            extra = {"position_ids": torch.tensor([pos], device=dev)} if pos is not None else {}
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=cuda):
                loss = model(input_ids=x, labels=y, num_items_in_batch=n_items, **extra).loss
            loss.backward()
            step_loss += loss.detach()
            if step >= warmup:
                tokens += len(ids)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(step_loss))
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    return {"tokens_per_s": tokens / elapsed, "timed_steps": steps, "timed_tokens": tokens,
            "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 1e9, 3) if cuda else None,
            "losses": losses, "rows_per_micro_batch": 1,
            "gradient_accumulation_steps": round(sum(len(b) for b in plan) / len(plan), 2),
            "step_s": round(elapsed / steps, 4), "device": torch.cuda.get_device_name() if cuda else "cpu"}


def _loss_key(r: dict) -> tuple:
    o = r.get("overrides") or {}
    return r.get("mode"), float(o.get("lora_dropout", LORA_DROPOUT)), o.get("replay")


def _loss_diff(a: list[float], c: list[float]) -> dict:
    n = min(len(a), len(c))
    d = [abs(x - y) for x, y in zip(a[:n], c[:n])]
    rel = [abs(x - y) / abs(y) for x, y in zip(a[:n], c[:n]) if y]
    return {
        "steps": n, "max_abs_diff": round(max(d), 4), "mean_abs_diff": round(sum(d) / n, 4),
        "max_rel_diff": round(max(rel), 4), "mean_rel_diff": round(sum(rel) / len(rel), 4),
        "first": [round(a[0], 4), round(c[0], 4)], "last": [round(a[n - 1], 4), round(c[n - 1], 4)],
        "last10_mean": [round(sum(a[n - 10:n]) / min(10, n), 4), round(sum(c[n - 10:n]) / min(10, n), 4)],
    }


def compare_losses(rows: list[dict]) -> None:
    """Per-step loss comparisons, added to the rows (pairs are [this row, reference]):

    * ``loss_vs_baseline``: a stage row against the plain baseline of its mode and LoRA dropout (same
      examples, but the baseline's own row order and plain packing);
    * ``loss_vs_replay``: a stage row against the baseline that replayed its recorded micro-batches
      (same tokens, order and attention segments: this one should agree within noise);
    * ``loss_vs_seed0``: a baseline with another LoRA-init seed against its seed-0 twin: the noise band.
    """
    ok = [r for r in rows if r.get("losses")]
    seed0 = {}
    for r in ok:
        if r.get("baseline") and "seed" not in (r.get("overrides") or {}):
            seed0.setdefault(_loss_key(r), r)
    replays = {key[2]: r for key, r in seed0.items() if key[2]}      # replayed stage config -> baseline
    for r in ok:
        if r.get("baseline"):
            ref = seed0.get(_loss_key(r))
            if ref is not None and ref is not r:
                r["loss_vs_seed0"] = _loss_diff(r["losses"], ref["losses"])
            continue
        mode, dropout, _ = _loss_key(r)
        ref = seed0.get((mode, dropout, None))
        if ref is not None:
            r["loss_vs_baseline"] = _loss_diff(r["losses"], ref["losses"])
        rep = replays.get(r["name"])
        if rep is not None:
            r["loss_vs_replay"] = _loss_diff(r["losses"], rep["losses"])


def check_attention() -> dict:
    """varlen attention vs sdpa (block-diagonal mask) on a packed batch: logits and LoRA-free grads."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmpipe.train import attention

    attention.register()
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=512, num_hidden_layers=2, intermediate_size=1024, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=1000)
    lens = [300, 700, 128, 920]
    x = torch.randint(0, 1000, (1, sum(lens)), device="cuda")
    pos = torch.cat([torch.arange(n) for n in lens])[None].cuda()
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    res = {}
    ref = None
    torch.manual_seed(0)
    m = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").cuda().to(torch.bfloat16)
    extra = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max(lens), "max_length_k": max(lens)}
    for impl in ("sdpa", attention.NAME):     # same weights, same packed batch, two attention paths
        m.config._attn_implementation = impl
        m.zero_grad(set_to_none=True)
        out = m(input_ids=x, position_ids=pos, labels=x, use_cache=False, **(extra if impl != "sdpa" else {}))
        out.loss.backward()
        g = m.model.layers[0].self_attn.q_proj.weight.grad.float()
        if ref is None:
            ref = (out.logits.detach().float(), g, float(out.loss.detach()))
        else:
            res = {"logits_rel_err": float((out.logits.detach().float() - ref[0]).norm() / ref[0].norm()),
                   "grad_rel_err": float((g - ref[1]).norm() / ref[1].norm()),
                   "loss_sdpa": ref[2], "loss_varlen": float(out.loss.detach())}
    # Ground truth: every example on its own (no packing), logits concatenated.
    with torch.no_grad():
        m.config._attn_implementation = "sdpa"
        segs, start = [], 0
        for n in lens:
            segs.append(m(input_ids=x[:, start:start + n], use_cache=False).logits.float())
            start += n
        truth = torch.cat(segs, dim=1)
        packed = {}
        for impl in ("sdpa", attention.NAME):
            m.config._attn_implementation = impl
            # use_cache=False as in training: with a cache transformers skips packed-sequence detection
            lg = m(input_ids=x, position_ids=pos, use_cache=False,
                   **(extra if impl != "sdpa" else {})).logits.float()
            packed[impl] = float((lg - truth).norm() / truth.norm())
    res["sdpa_packed_vs_unpacked_rel_err"] = packed["sdpa"]
    res["varlen_packed_vs_unpacked_rel_err"] = packed[attention.NAME]
    # Isolation check: changing the first example must not change the others' logits.
    x2 = x.clone()
    x2[0, :lens[0]] = torch.randint(0, 1000, (lens[0],), device="cuda")
    with torch.no_grad():
        a = m(input_ids=x, position_ids=pos, use_cache=False, **extra).logits
        b = m(input_ids=x2, position_ids=pos, use_cache=False, **extra).logits
    res["cross_example_leak"] = float((a[0, lens[0]:] - b[0, lens[0]:]).abs().max())
    return res


def _robust_dataset_hashing() -> None:
    """datasets fingerprints transforms by pickling them; on some interpreter/pyarrow combinations
    (seen: Python 3.12 + pyarrow 26 on the device image) that pickling raises instead of falling
    back. Fingerprints only name cache files, so a random one is harmless here."""
    try:
        from datasets import fingerprint as fp
    except ImportError:
        return
    orig = fp.Hasher.hash.__func__

    def hash_(cls, value):
        try:
            return orig(cls, value)
        except Exception:
            return fp.generate_random_fingerprint()

    fp.Hasher.hash = classmethod(hash_)


def one(args) -> int:
    global LR
    LR = args.lr
    _robust_dataset_hashing()
    kind, mode, overrides = CONFIGS[args.one]
    model_dir = Path(args.model_dir)
    if kind == "baseline":
        res = run_baseline(args.one, model_dir, mode, args.steps, args.warmup, args.seq_len, args.rows,
                           dropout=float(overrides.get("lora_dropout", LORA_DROPOUT)),
                           seed=int(overrides.get("seed", 0)), replay=overrides.get("replay"))
    else:
        res = run_stage(args.one, model_dir, mode, overrides, args.steps, args.warmup, args.seq_len, args.rows)
    n = json.loads((model_dir / "bench_meta.json").read_text())["num_parameters"]
    res.update(name=args.one, mode=mode, baseline=kind == "baseline", overrides=overrides, seq_len=args.seq_len, lr=args.lr,
               rows_per_step=args.rows, num_parameters=n, mfu=round(res["tokens_per_s"] * 4 * n / PEAK_BF16_FLOPS, 4),
               tokens_per_s=round(res["tokens_per_s"], 1))
    print("RESULT " + json.dumps(res), flush=True)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--configs", default="baseline_lora_d0,stage_lora_mb4_d0_offload,baseline_lora_d0_replay,"
                                          "baseline_lora_d0_replay_seed1,baseline_qlora,stage_qlora,baseline_qlora_replay")
    ap.add_argument("--steps", type=int, default=46, help="timed optimizer steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--rows", type=int, default=4, help="packed rows of --seq-len tokens per optimizer step")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--lr", type=float, default=LR, help="constant learning rate of every run")
    ap.add_argument("--model-dir", default="/tmp/bench_model")
    ap.add_argument("--tokenizer-dir", default="models/base")
    ap.add_argument("--out", default="benchmarks/results/train_throughput.json")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per configuration")
    ap.add_argument("--check-attention", action="store_true", help="compare varlen attention with sdpa first")
    ap.add_argument("--check-only", action="store_true", help="only run the attention check")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        return one(args)
    if args.check_only:
        print(json.dumps(check_attention()))
        return 0

    model_dir = Path(args.model_dir)
    meta = model_dir / "bench_meta.json"
    if not (meta.is_file() and json.loads(meta.read_text()).get("shape") == args.shape):
        model_dir.mkdir(parents=True, exist_ok=True)
        n = build_model(model_dir, args.shape, Path(args.tokenizer_dir))
        meta.write_text(json.dumps({"shape": args.shape, "num_parameters": n}))
    runs = []
    out = Path(args.out)
    if args.check_attention:
        try:
            chk = check_attention()
        except Exception as exc:  # report and go on with the throughput runs
            import traceback

            chk = {"error": "".join(traceback.format_exception_only(exc))[-600:]}
        log(f"attention check (varlen vs sdpa, bf16): {chk}")
        runs.append({"name": "check_varlen_attention", **chk})
    for name in args.configs.split(","):
        if name not in CONFIGS:
            raise SystemExit(f"unknown config {name!r}; known: {', '.join(CONFIGS)}")
        cmd = [sys.executable, os.path.abspath(__file__), "--one", name, "--model-dir", str(model_dir),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--seq-len", str(args.seq_len),
               "--rows", str(args.rows), "--lr", repr(args.lr)]
        log(f"running {name}")
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            if p.returncode != 0 or not lines:
                tail = (p.stderr or "")[-3000:]
                log(f"{name} FAILED rc={p.returncode}:\n{tail}")
                runs.append({"name": name, "error": tail[-600:], "baseline": CONFIGS[name][0] == "baseline"})
            else:
                res = json.loads(lines[-1][7:])
                res["wall_s"] = round(time.perf_counter() - t0, 1)
                runs.append(res)
                log(f"{name}: {res['tokens_per_s']} tok/s, peak {res['peak_mem_gb']} GB, MFU {res['mfu']}")
        except subprocess.TimeoutExpired:
            log(f"{name} timed out after {args.timeout}s")
            runs.append({"name": name, "error": f"timeout {args.timeout}s", "baseline": CONFIGS[name][0] == "baseline"})
        compare_losses(runs)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json(out, runs)   # after every run: partial results survive
    print(f"{'name':30} {'mode':6} {'tok/s':>9} {'peak GB':>8} {'MFU':>6}  loss diff, max/mean relative")
    for r in runs:
        if r["name"].startswith("check_"):
            continue
        if "error" in r:
            print(f"{r['name']:26} ERROR {r['error'][:80]!r}")
        else:
            diffs = [f"{k[8:]} {lv['max_rel_diff']:.4f}/{lv['mean_rel_diff']:.4f}"
                     for k in ("loss_vs_baseline", "loss_vs_replay", "loss_vs_seed0") if (lv := r.get(k))]
            print(f"{r['name']:30} {r['mode']:6} {r['tokens_per_s']:9.1f} {r['peak_mem_gb'] or 0:8.2f} "
                  f"{r['mfu']:6.3f}  {', '.join(diffs) or '-'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
