"""Training-step throughput: tokens/s, peak GPU memory and MFU of LoRA / QLoRA fine-tuning.

Runs, each in its own process (clean peak-memory numbers), on one random-weight model of the
Llama-3.1-8B shape (hidden 4096, 32 layers, 14336 intermediate, 32 heads, 8 KV heads, vocab
128256; weights > 64 MiB cannot travel to the device, so the model is built there):

* ``baseline_lora`` / ``baseline_qlora``: a plain transformers + peft loop (sdpa, gradient
  checkpointing, batch 1, one fixed 2048-token sequence per step, torch AdamW), as in issue 3.
* ``stage_lora`` / ``stage_qlora`` (+ variants): the qlora-train stage's own training path,
  ``llmpipe.train.trainer.train`` (TRL SFTTrainer, peft, the stage's runtime resolution), on
  variable-length chat-like examples (assistant-only labels) packed padding-free into 2048-token
  rows, i.e. the real data shape.

LoRA r=16, alpha=32, all-linear everywhere. tokens/s counts real (non-padding) input tokens over
the timed steps (after warm-up); MFU = tokens/s * 4 * N_params / peak (4 N: forward 2N + backward
w.r.t. activations 2N; frozen weights get no gradient; recomputation from checkpointing is not
counted), with peak = 989.4 TFLOP/s dense bf16 (H100/H200 SXM datasheet).

Usage (on a CUDA box; `--shape tiny` runs a small model anywhere as a smoke test):
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
}
# name -> (kind, mode, train.* overrides for stage runs)
CONFIGS = {
    "baseline_lora": ("baseline", "lora", {}),
    "baseline_qlora": ("baseline", "qlora", {}),
    "stage_lora": ("stage", "lora", {}),
    "stage_qlora": ("stage", "qlora", {}),
    "stage_lora_sdpa": ("stage", "lora", {"attn_implementation": "sdpa"}),
    "stage_qlora_sdpa": ("stage", "qlora", {"attn_implementation": "sdpa"}),
    "stage_lora_liger": ("stage", "lora", {"liger_kernel": "true"}),
    "stage_qlora_liger": ("stage", "qlora", {"liger_kernel": "true"}),
    "stage_lora_adamw": ("stage", "lora", {"optimizer": "adamw_torch_fused"}),
    "stage_lora_paged8bit": ("stage", "lora", {"optimizer": "paged_adamw_8bit"}),
    "stage_qlora_paged8bit": ("stage", "qlora", {"optimizer": "paged_adamw_8bit"}),
    "stage_lora_log10": ("stage", "lora", {"logging_steps": 10}),
    "stage_lora_nockpt": ("stage", "lora", {"gradient_checkpointing": "false"}),
    "stage_lora_mb2": ("stage", "lora", {"per_device_batch_size": 2}),
    "stage_lora_nopack": ("stage", "lora", {"packing": False}),
}


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def build_model(model_dir: Path, shape: str, tokenizer_dir: Path) -> int:
    """Random-weight model of ``shape`` saved as bf16 safetensors (+ a tokenizer) in ``model_dir``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
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
    """Variable-length chat-like examples (prompt masked, reply + EOS trained) totalling n_tokens."""
    import random

    from llmpipe.train.data import IGNORE_INDEX, Tokenized

    rng = random.Random(seed)
    out = Tokenized()
    total = 0
    while total < n_tokens:
        length = min(seq_len, int(rng.lognormvariate(6.0, 0.6)) + 32)   # median ~430 tokens
        prompt = max(8, int(length * rng.uniform(0.5, 0.8)))
        ids = [rng.randrange(3, vocab) for _ in range(length - 1)] + [eos]
        labels = [IGNORE_INDEX] * prompt + ids[prompt:]
        out.input_ids.append(ids)
        out.labels.append(labels)
        out.ids.append(str(len(out.ids)))
        total += length
    return out


def _timing_callback(warmup: int):
    import torch
    from transformers import TrainerCallback

    class Timing(TrainerCallback):
        def __init__(self):
            self.t = None
            self.tok = 0
            self.losses = []
            self.times = []
            self.tokens = 0

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == warmup:
                torch.cuda.synchronize() if torch.cuda.is_available() else None
                self.t = time.perf_counter()
                self.tok = state.num_input_tokens_seen

        def on_step_end(self, args, state, control, **kw):
            if self.t is not None:
                torch.cuda.synchronize() if torch.cuda.is_available() else None
                self.times.append(time.perf_counter() - self.t)
                self.tokens = state.num_input_tokens_seen - self.tok

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    return Timing()


def run_stage(model_dir: Path, mode: str, overrides: dict, steps: int, warmup: int, seq_len: int) -> dict:
    import torch

    from llmpipe.train.config import LoraParams, TrainParams, resolve_runtime
    from llmpipe.train.trainer import train

    cfg = json.loads((model_dir / "config.json").read_text())
    total = warmup + steps
    tp_kw = dict(quantization="nf4" if mode == "qlora" else "none", max_steps=total, learning_rate=1e-4,
                 warmup_ratio=0.0, per_device_batch_size=1, packing=True, logging_steps=1, save_steps=10**6,
                 eval_steps=10**6, seed=0)
    tp_kw.update(overrides)
    tp = TrainParams(**tp_kw)
    lora = LoraParams(r=16, alpha=32, dropout=0.05, target_modules="all-linear")
    runtime = resolve_runtime(tp, lora)
    bs = tp.per_device_batch_size
    data = synthetic_examples(cfg["vocab_size"], cfg["eos_token_id"], int(seq_len * bs * (total + 2) * 1.3), seq_len)
    timing = _timing_callback(warmup)
    work = Path(os.environ.get("BENCH_WORK", "/tmp/bench_work")) / f"run{os.getpid()}"
    out = train(model_dir, data, None, lora, tp, seq_len, work / "ckpt", work / "adapter", callbacks=[timing],
                resume=False, runtime=runtime)
    elapsed = timing.times[-1] if timing.times else float("nan")
    return {"tokens_per_s": timing.tokens / elapsed, "timed_steps": len(timing.times),
            "timed_tokens": timing.tokens, "peak_mem_gb": out.metrics["peak_memory_gb"],
            "losses": timing.losses, "runtime": runtime.to_dict(),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}


def run_baseline(model_dir: Path, mode: str, steps: int, warmup: int, seq_len: int) -> dict:
    """Plain transformers + peft loop: sdpa, gradient checkpointing, batch 1, fixed-length sequence."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cuda = torch.cuda.is_available()
    kw = {"dtype": torch.bfloat16, "attn_implementation": "sdpa"}
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
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    dev = "cuda" if cuda else "cpu"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    losses, t0 = [], None
    for step in range(warmup + steps):
        if step == warmup:
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        x = torch.randint(3, vocab, (1, seq_len), generator=g).to(dev)
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=cuda):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    return {"tokens_per_s": steps * seq_len / elapsed, "timed_steps": steps, "timed_tokens": steps * seq_len,
            "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 1e9, 3) if cuda else None,
            "losses": losses, "device": torch.cuda.get_device_name() if cuda else "cpu"}


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


def one(args) -> int:
    kind, mode, overrides = CONFIGS[args.one]
    model_dir = Path(args.model_dir)
    if kind == "baseline":
        res = run_baseline(model_dir, mode, args.steps, args.warmup, args.seq_len)
    else:
        res = run_stage(model_dir, mode, overrides, args.steps, args.warmup, args.seq_len)
    n = json.loads((model_dir / "bench_meta.json").read_text())["num_parameters"]
    res.update(name=args.one, mode=mode, baseline=kind == "baseline", overrides=overrides, seq_len=args.seq_len,
               num_parameters=n, mfu=round(res["tokens_per_s"] * 4 * n / PEAK_BF16_FLOPS, 4),
               tokens_per_s=round(res["tokens_per_s"], 1))
    print("RESULT " + json.dumps(res), flush=True)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--configs", default="baseline_lora,stage_lora,baseline_qlora,stage_qlora")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--model-dir", default="/tmp/bench_model")
    ap.add_argument("--tokenizer-dir", default="models/base")
    ap.add_argument("--out", default="benchmarks/results/train_throughput.json")
    ap.add_argument("--timeout", type=int, default=240, help="seconds per configuration")
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
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--seq-len", str(args.seq_len)]
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
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json(out, runs)   # after every run: partial results survive
    print(f"{'name':24} {'mode':6} {'tok/s':>9} {'peak GB':>8} {'MFU':>6}")
    for r in runs:
        if r["name"].startswith("check_"):
            continue
        if "error" in r:
            print(f"{r['name']:24} ERROR {r['error'][:80]!r}")
        else:
            print(f"{r['name']:24} {r['mode']:6} {r['tokens_per_s']:9.1f} {r['peak_mem_gb'] or 0:8.2f} {r['mfu']:6.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
