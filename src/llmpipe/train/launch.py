"""Several training processes on one machine: the launch command and the few collective helpers.

With ``train.num_processes > 1`` the qlora-train stage re-runs itself under ``torchrun``
(``python -m torch.distributed.run --standalone --nproc-per-node N``): one process per GPU on a
GPU box (NCCL), or N CPU processes (gloo) elsewhere, e.g. to test the path on a laptop. torchrun
sets RANK / LOCAL_RANK / WORLD_SIZE; the training code initialises the process group itself
(``init_distributed``) before TRL/accelerate would, so it can agree on the memory plan and let
rank 0 prepare the checkpoint directory first. DDP or FSDP is then the Trainer's choice from
``train.distributed``. (``accelerate launch --num_processes N`` starts a single process on CPU
unless an accelerate MULTI_CPU config exists, so the stage does not use it.)
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from typing import Iterator, Sequence

from llmpipe.config.model import TrainSection


def launched() -> bool:
    """True inside a process started by torchrun (or any launcher that sets LOCAL_RANK)."""
    return "LOCAL_RANK" in os.environ


def needs_relaunch(tp: TrainSection) -> bool:
    return tp.num_processes > 1 and not launched()


def launch_command(num_processes: int, script: str, argv: Sequence[str]) -> list[str]:
    """torchrun on this machine with ``num_processes`` workers running ``script argv``."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
            "--nproc-per-node", str(num_processes), os.path.abspath(script), *argv]


def relaunch(tp: TrainSection, script: str, argv: Sequence[str]) -> int:
    """Run ``script argv`` under torchrun with ``tp.num_processes`` workers; its exit status."""
    cmd = launch_command(tp.num_processes, script, argv)
    env = dict(os.environ)
    # torchrun would set 1 thread per worker; on CPU give each worker its share of the cores
    if "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(tp.cpu_threads or max(1, (os.cpu_count() or 1) // tp.num_processes))
    print(f"[train] launching {tp.num_processes} processes ({tp.distributed}): {' '.join(cmd)}",
          file=sys.stderr, flush=True)
    return subprocess.call(cmd, env=env)


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(cuda: bool) -> None:
    """Create the process group (gloo on CPU; NCCL for CUDA tensors + gloo for CPU ones on GPUs)
    when running under a launcher with more than one process. accelerate then uses it as is."""
    import torch
    import torch.distributed as dist

    if world_size() <= 1 or dist.is_initialized():
        return
    if cuda:
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend="cuda:nccl,cpu:gloo" if cuda else "gloo")


def world_min(value: float) -> float:
    """The smallest ``value`` over all processes (``value`` itself in a single process)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return float(t.item())


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first; the other ranks run it once rank 0 is done."""
    import torch.distributed as dist

    multi = dist.is_available() and dist.is_initialized()
    if multi and rank() != 0:
        dist.barrier()
    yield
    if multi and rank() == 0:
        dist.barrier()
