"""Multi-GPU training: tokens/s, scaling efficiency, peak memory per GPU and loss curves (issue 18).

Every run trains through ``llmpipe.train.trainer.train``, the function the qlora-train stage calls,
started the way the stage starts several processes (``llmpipe.train.launch.launch_command``:
torchrun, one process per GPU; the Trainer then runs DDP, or FSDP with ``train.distributed: fsdp``).
Model: random weights of the Llama-3.1-8B shape (built on the device, as in
``train_throughput.py``, whose synthetic chat data and timing callback this reuses). Per GPU and
optimizer step: ``--rows`` packed rows of ``--seq-len`` tokens. The memory knobs are left at
``auto`` (the stage's memory rule picks checkpointing, micro-batch and offloading), except where a
config says otherwise.

Configs (name: mode, processes, distributed, rows per step per process, seed, overrides):
* ``lora_1gpu`` / ``lora_1gpu_seed1``: one GPU with 2 x ``--rows`` rows per step (gradient
  accumulation 2), i.e. the same global batch as 2 GPUs x ``--rows``: the single-GPU throughput and
  the loss-curve reference; the seed-1 twin (other LoRA init and data order) is the noise band.
* ``lora_ddp2`` / ``lora_fsdp2``: 2 processes x ``--rows`` rows.
* ``lora_1gpu_eager``: ``lora_1gpu`` without torch.compile (``train.compile: auto`` is off under
  FSDP, so this is FSDP's like-for-like single-GPU reference).
* ``qlora_*``: the same with ``train.quantization: nf4``.

tokens/s counts real (non-padding) input tokens of all processes over the timed optimizer steps
(after ``--warmup``); scaling efficiency = tokens/s(N GPUs) / (N x tokens/s(1 GPU)).

Usage (on a box with >= 2 CUDA GPUs; ``--shape micro`` runs anywhere, 2 gloo processes on CPU):
    PYTHONPATH=src python benchmarks/train_multi_gpu.py --phases "lora_1gpu+lora_1gpu_seed1;lora_ddp2;lora_fsdp2"
A phase is a ``+``-separated list of configs run at the same time on disjoint GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_throughput as tt  # noqa: E402  (benchmark helpers: model build, data, timing)

from llmpipe.io import write_json  # noqa: E402

# name -> (mode, processes, distributed, gradient accumulation per process, seed, train.* overrides)
CONFIGS = {
    "lora_1gpu": ("lora", 1, "ddp", 2, 0, {}),
    "lora_1gpu_seed1": ("lora", 1, "ddp", 2, 1, {}),
    "lora_1gpu_eager": ("lora", 1, "ddp", 2, 0, {"compile": False}),
    "lora_ddp2": ("lora", 2, "ddp", 1, 0, {}),
    "lora_fsdp2": ("lora", 2, "fsdp", 1, 0, {}),
    "lora_fsdp2_compile": ("lora", 2, "fsdp", 1, 0, {"compile": True}),
    "qlora_1gpu": ("qlora", 1, "ddp", 2, 0, {}),
    "qlora_ddp2": ("qlora", 2, "ddp", 1, 0, {}),
    "qlora_fsdp2": ("qlora", 2, "fsdp", 1, 0, {}),
}
# Never use NVLink multicast on the lent machines (KINDS.md); set before any CUDA/NCCL init.
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def log(msg: str) -> None:
    print(f"[multi-gpu] {msg}", file=sys.stderr, flush=True)


def worker(args) -> int:
    """One config, in one of its processes (rank 0 prints the RESULT line)."""
    import torch

    from llmpipe.config import load_params
    from llmpipe.config.model import LoraSection, TrainSection
    from llmpipe.train import launch
    from llmpipe.train.trainer import train

    tt._robust_dataset_hashing()
    mode, procs, dist_kind, ga, seed, overrides = CONFIGS[args.worker]
    model_dir = Path(args.model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    total = args.warmup + args.steps
    tp_kw = load_params(Path(__file__).resolve().parents[1] / "params.yaml").train.model_dump()
    tp_kw.update(quantization="nf4" if mode == "qlora" else "none", max_steps=total, learning_rate=args.lr,
                 lr_scheduler="constant", warmup_ratio=0.0, weight_decay=0.0, max_grad_norm=1.0,
                 per_device_batch_size=args.rows, gradient_accumulation_steps=ga, packing=True,
                 logging_steps=1, save_steps=10**6, eval_steps=10**6, num_processes=procs, distributed=dist_kind)
    tp_kw.update(overrides)
    tp = TrainSection(**tp_kw)
    lora = LoraSection(r=16, alpha=32, dropout=tt.LORA_DROPOUT, target_modules="all-linear", use_dora=False)
    # Same examples for every config: the global rows per step of the 2-GPU runs.
    data = tt.bench_data(cfg, args.seq_len, 2 * args.rows, total)
    timing = tt._timing_callback(args.warmup, args.worker)
    work = Path(os.environ.get("BENCH_WORK", "/tmp/bench_work")) / f"{args.worker}_{os.getppid()}"
    t0 = time.perf_counter()
    out, error = None, None
    try:
        out = train(model_dir, data, None, lora, tp, seed=seed, max_seq_len=args.seq_len,
                    checkpoint_dir=work / "ckpt", adapter_dir=work / "adapter", callbacks=[timing], resume=False)
    except Exception as exc:    # e.g. saving the adapter after the timed steps: report both
        if not timing.times:
            raise
        import traceback

        error = "".join(traceback.format_exception(exc))[-1500:]
        log(f"{args.worker}: train() raised after the timed steps: {error}")
    wall = time.perf_counter() - t0
    cuda = torch.cuda.is_available()
    peak = round(torch.cuda.max_memory_allocated() / 1e9, 3) if cuda else None
    reserved = round(torch.cuda.max_memory_reserved() / 1e9, 3) if cuda else None
    peaks, reserveds = [peak], [reserved]
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (peak, reserved))
        peaks, reserveds = [g[0] for g in gathered], [g[1] for g in gathered]
    if launch.rank() != 0:
        return 0
    elapsed = timing.times[-1] if timing.times else float("nan")
    n = json.loads((model_dir / "bench_meta.json").read_text())["num_parameters"]
    tps = timing.tokens / elapsed
    res = {"name": args.worker, "mode": mode, "processes": launch.world_size(), "distributed": dist_kind,
           "seed": seed, "overrides": {k: v for k, v in overrides.items()},
           "rows_per_step_per_process": args.rows * ga, "global_rows_per_step": args.rows * ga * launch.world_size(),
           "seq_len": args.seq_len, "lr": args.lr, "timed_steps": args.steps, "warmup_steps": args.warmup,
           "timed_tokens": timing.tokens, "tokens_per_s": round(tps, 1),
           "tokens_per_s_per_gpu": round(tps / launch.world_size(), 1), "step_s": round(elapsed / args.steps, 4),
           "mfu_per_gpu": round(tps / launch.world_size() * 4 * n / tt.PEAK_BF16_FLOPS, 4),
           "peak_mem_gb_per_gpu": peaks, "peak_reserved_gb_per_gpu": reserveds, "losses": timing.losses,
           "runtime": out.runtime.to_dict() if out else {"compile": tp.compile, "picked": {}},
           "world_size_seen_by_trainer": out.metrics.get("world_size") if out else None,
           "error_after_training": error,
           "adapter_files": sorted(f.name for f in (work / "adapter").iterdir()) if (work / "adapter").is_dir() else [],
           "num_parameters": n, "wall_s_in_train": round(wall, 1),
           "device": torch.cuda.get_device_name() if cuda else "cpu"}
    print("RESULT " + json.dumps(res), flush=True)
    return 0


def _job_cmd(name: str, args, script: str) -> list[str]:
    from llmpipe.train import launch

    argv = ["--worker", name, "--model-dir", args.model_dir, "--steps", str(args.steps), "--warmup",
            str(args.warmup), "--rows", str(args.rows), "--seq-len", str(args.seq_len), "--lr", repr(args.lr)]
    procs = CONFIGS[name][1]
    if procs == 1:
        return [sys.executable, script, *argv]
    return launch.launch_command(procs, script, argv)


def run_phase(names: list[str], args, gpus: list[str], logdir: Path) -> list[dict]:
    """Start the configs of one phase at once, each on its own GPUs; wait for all."""
    script = os.path.abspath(__file__)
    jobs, free = [], list(gpus)
    for name in names:
        procs = CONFIGS[name][1]
        mine, free = free[:procs], free[procs:]
        if len(mine) < procs and gpus:
            raise SystemExit(f"phase {names}: not enough GPUs for {name}")
        env = dict(os.environ, **NO_MULTICAST, PYTHONUNBUFFERED="1")
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(mine)
        else:   # CPU: torchrun gives each worker one thread unless told
            env.setdefault("OMP_NUM_THREADS", "1")
        logf = open(logdir / f"{name}.log", "w")
        log(f"start {name} on GPUs {mine or 'cpu'}: {' '.join(_job_cmd(name, args, script))}")
        p = subprocess.Popen(_job_cmd(name, args, script), stdout=subprocess.PIPE, stderr=logf, text=True, env=env)
        jobs.append((name, p, logf, time.perf_counter()))
    rows = []
    for name, p, logf, t0 in jobs:
        try:
            stdout, _ = p.communicate(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            stdout, _ = p.communicate()
            rows.append({"name": name, "error": f"timeout {args.timeout}s"})
            log(f"{name}: timeout")
            continue
        finally:
            logf.close()
        lines = [ln for ln in (stdout or "").splitlines() if ln.startswith("RESULT ")]
        if p.returncode != 0 or not lines:
            tail = (logdir / f"{name}.log").read_text()[-2500:]
            rows.append({"name": name, "error": f"rc={p.returncode}: {tail[-1200:]}"})
            log(f"{name} FAILED rc={p.returncode}:\n{tail}")
            continue
        res = json.loads(lines[-1][7:])
        res["wall_s"] = round(time.perf_counter() - t0, 1)
        res["concurrent_with"] = [n for n in names if n != name]
        rows.append(res)
        log(f"{name}: {res['tokens_per_s']} tok/s ({res['tokens_per_s_per_gpu']}/GPU), peak "
            f"{res['peak_mem_gb_per_gpu']} GB, plan {res['runtime'].get('picked', {}).get('reason')}")
    return rows


def summarize(rows: list[dict]) -> dict:
    """Scaling efficiency against the single-GPU run of the same mode, and loss-curve comparisons."""
    ok = {r["name"]: r for r in rows if "error" not in r}
    out: dict = {"scaling": [], "loss_curves": []}
    for r in ok.values():
        if r["processes"] < 2:
            continue
        compiled = r["runtime"].get("compile")
        for ref_name in (f"{r['mode']}_1gpu", f"{r['mode']}_1gpu_eager"):
            ref = ok.get(ref_name)
            if ref is None:
                continue
            out["scaling"].append({
                "run": r["name"], "reference": ref_name, "gpus": r["processes"],
                "speedup": round(r["tokens_per_s"] / ref["tokens_per_s"], 3),
                "efficiency": round(r["tokens_per_s"] / (r["processes"] * ref["tokens_per_s"]), 3),
                "same_compile_setting": bool(compiled) == bool(ref["runtime"].get("compile"))})
    for mode in ("lora", "qlora"):
        ref, twin = ok.get(f"{mode}_1gpu"), ok.get(f"{mode}_1gpu_seed1")
        if ref is None:
            continue
        noise = tt._loss_diff(twin["losses"], ref["losses"]) if twin else None
        if noise:
            out["loss_curves"].append({"run": twin["name"], "reference": ref["name"], "kind": "noise band", **noise})
        for r in ok.values():
            if r["mode"] == mode and r["processes"] > 1 and r.get("global_rows_per_step") == ref["global_rows_per_step"]:
                d = tt._loss_diff(r["losses"], ref["losses"])
                if noise:
                    d["within_noise_band"] = d["max_rel_diff"] <= noise["max_rel_diff"] and \
                        d["mean_rel_diff"] <= noise["mean_rel_diff"]
                out["loss_curves"].append({"run": r["name"], "reference": ref["name"], **d})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(tt.SHAPES))
    ap.add_argument("--phases", default="lora_1gpu+lora_1gpu_seed1;lora_ddp2;lora_fsdp2")
    ap.add_argument("--steps", type=int, default=25, help="timed optimizer steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rows", type=int, default=4, help="packed rows of --seq-len tokens per GPU per step")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--lr", type=float, default=tt.LR)
    ap.add_argument("--model-dir", default="/tmp/bench_model")
    ap.add_argument("--tokenizer-dir", default="models/base")
    ap.add_argument("--out", default="benchmarks/results/train_multi_gpu.json")
    ap.add_argument("--logdir", default="/tmp/multi_gpu_logs")
    ap.add_argument("--timeout", type=int, default=420, help="seconds per phase job")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.environ.update(NO_MULTICAST)
    if args.worker:
        return worker(args)

    import torch

    gpus = [str(i) for i in range(torch.cuda.device_count())]
    model_dir = Path(args.model_dir)
    meta = model_dir / "bench_meta.json"
    if not (meta.is_file() and json.loads(meta.read_text()).get("shape") == args.shape):
        model_dir.mkdir(parents=True, exist_ok=True)
        n = tt.build_model(model_dir, args.shape, Path(args.tokenizer_dir))
        meta.write_text(json.dumps({"shape": args.shape, "num_parameters": n}))
    logdir = Path(args.logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    rows = json.loads(out.read_text()).get("runs", []) if out.is_file() else []
    for phase in [p for p in args.phases.split(";") if p]:
        names = phase.split("+")
        for n in names:
            if n not in CONFIGS:
                raise SystemExit(f"unknown config {n!r}; known: {', '.join(CONFIGS)}")
        rows = [r for r in rows if r.get("name") not in names] + run_phase(names, args, gpus, logdir)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json(out, {"runs": rows, **summarize(rows)})   # after every phase: partial results survive
    summary = summarize(rows)
    print(f"{'name':22} {'gpus':>4} {'tok/s':>9} {'/GPU':>8} {'peak GB/GPU':>16} plan")
    for r in rows:
        if "error" in r:
            print(f"{r['name']:22} ERROR {r['error'][-300:]!r}")
            continue
        plan = r["runtime"].get("picked", {})
        print(f"{r['name']:22} {r['processes']:4} {r['tokens_per_s']:9.1f} {r['tokens_per_s_per_gpu']:8.1f} "
              f"{str(r['peak_mem_gb_per_gpu']):>16} ckpt={plan.get('gradient_checkpointing')} "
              f"mb={plan.get('micro_batch_size')} compile={r['runtime'].get('compile')}")
    for s in summary["scaling"]:
        print(f"scaling {s['run']} vs {s['reference']}: {s['speedup']}x, efficiency {s['efficiency']}")
    for c in summary["loss_curves"]:
        print(f"loss {c['run']} vs {c['reference']}: max rel {c['max_rel_diff']}, mean rel {c['mean_rel_diff']}"
              f"{'' if 'within_noise_band' not in c else ', within noise band: ' + str(c['within_noise_band'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
