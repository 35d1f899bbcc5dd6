"""The resolve step: ``lora:`` and ``train:`` (typed, from params.yaml) + this machine -> ``Runtime``.

Everything "auto" is decided here from what the machine has (CUDA, bitsandbytes, bf16 support,
free GPU memory: see ``llmpipe.train.memory``), and the decision is recorded (``Runtime``) so
metrics/train.json says which path ran. Static checks (types, ranges, choices) live in the
section models (``llmpipe.config.model``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from llmpipe.config.model import LoraSection, TrainSection
from llmpipe.train.memory import MemoryPlan, ModelShape, plan_memory

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class Runtime:
    """What actually runs on this machine (recorded in metrics)."""

    device: str                 # cuda | cpu
    mode: str                   # lora | qlora-nf4 | dora | qdora-nf4
    precision: str              # fp32 | bf16 | fp16
    optimizer: str
    gradient_checkpointing: bool
    liger_kernel: bool
    attn_implementation: str
    micro_batch_size: int       # packed rows per forward
    gradient_accumulation_steps: int   # forwards per optimizer step
    notes: tuple[str, ...] = ()
    compile: bool = False       # regional torch.compile of the decoder layers (CUDA + triton)
    activation_offloading: bool = False  # TRL: saved activations to pinned CPU memory, overlapped (CUDA)
    picked: dict[str, Any] = field(default_factory=dict)   # the memory rule's choice and why
    distributed: str = "none"   # none (one process) | ddp | fsdp: what the processes run

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["notes"] = list(self.notes)
        return d


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _varlen_available() -> bool:
    from llmpipe.train import attention

    return attention.available()


def resolve_runtime(tp: TrainSection, lp: LoraSection, *, seq_len: int, shape: ModelShape | None = None,
                    cuda: bool | None = None, free_bytes: float | None = None) -> Runtime:
    """Decide the device, mode, precision, optimizer, kernels and the memory plan; say why in ``notes``.

    ``shape`` and ``free_bytes`` feed the memory rule on CUDA; without them (or on CPU) the
    "auto" memory settings take their CPU values (see ``plan_memory``).
    """
    import torch

    cuda = torch.cuda.is_available() if cuda is None else cuda
    notes: list[str] = []
    quant = tp.quantization
    if quant == "nf4" and not cuda:
        notes.append("train.quantization=nf4 needs CUDA: falling back to LoRA in full precision on CPU")
        quant = "none"
    elif quant == "nf4" and not _has("bitsandbytes"):
        notes.append("train.quantization=nf4 needs bitsandbytes (pip install .[gpu]): falling back to LoRA")
        quant = "none"
    base = "dora" if lp.use_dora else "lora"
    mode = f"q{base}-nf4" if quant == "nf4" else base

    if tp.precision == "auto":
        precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    elif tp.precision in ("bf16", "fp16") and not cuda:
        notes.append(f"train.precision={tp.precision} on CPU: using fp32")
        precision = "fp32"
    else:
        precision = tp.precision

    if tp.optimizer == "auto":
        # LoRA optimizer state is tiny, so paged 8-bit AdamW saves almost nothing; fused torch AdamW
        # needs no bitsandbytes. On an H100 the two were within run-to-run noise in 2 of 3 runs.
        optimizer = "adamw_torch_fused" if cuda else "adamw_torch"
    else:
        optimizer = tp.optimizer
        if "8bit" in optimizer and not (cuda and _has("bitsandbytes")):
            notes.append(f"train.optimizer={optimizer} needs CUDA + bitsandbytes: using adamw_torch")
            optimizer = "adamw_torch"

    if tp.liger_kernel == "auto":
        # Measured on an H100 (benchmarks/results/train_throughput.json): Liger made this training
        # step slower, so "auto" leaves it off; set train.liger_kernel: true to force it.
        liger = False
    else:
        liger = bool(tp.liger_kernel)
        if liger and not (cuda and _has("liger_kernel")):
            notes.append("train.liger_kernel=true but Liger (or CUDA) is missing: using plain kernels")
            liger = False
    compile_ = _resolve_compile(tp.compile, cuda, notes)
    if compile_ and tp.compile == "auto" and tp.num_processes > 1 and tp.distributed == "fsdp":
        notes.append("train.compile=auto: off under FSDP (not measured there); set train.compile: true to force")
        compile_ = False
    distributed = "none" if tp.num_processes == 1 else tp.distributed
    if distributed == "fsdp" and not cuda:
        # accelerate builds its FSDP plugin for GPU process groups only (MULTI_CPU stays DDP)
        notes.append("train.distributed=fsdp needs CUDA (accelerate shards on GPUs only): the CPU processes run DDP")
        distributed = "ddp"
    offload_setting = tp.activation_offloading
    if offload_setting is True and not cuda:
        notes.append("train.activation_offloading=true needs CUDA: keeping activations in memory")
        offload_setting = False
    mem = _plan(tp, lp, seq_len, shape, cuda, free_bytes, precision, quant == "nf4", offload_setting)
    notes += mem.notes
    attn = tp.attn_implementation
    if attn == "auto":
        if cuda and _has("flash_attn"):
            attn = "flash_attention_2"
        elif cuda and tp.packing and _varlen_available():
            attn = "llmpipe_varlen"     # torch's FlashAttention varlen kernel, see train/attention.py
        else:
            attn = "sdpa"
    return Runtime("cuda" if cuda else "cpu", mode, precision, optimizer, mem.gradient_checkpointing, liger, attn,
                   mem.micro_batch_size, mem.gradient_accumulation_steps, tuple(notes), compile=compile_,
                   activation_offloading=mem.activation_offloading, picked=mem.to_dict(), distributed=distributed)


def _plan(tp: TrainSection, lp: LoraSection, seq_len: int, shape: ModelShape | None, cuda: bool,
          free_bytes: float | None, precision: str, quantized: bool, offload: Any) -> MemoryPlan:
    """The memory rule on CUDA (with the model's shape); the CPU values elsewhere."""
    if not cuda or shape is None:
        free_bytes = None
        shape = shape or ModelShape(1, 1, 1, 1, 1, 1, 1, True)   # not used without a GPU budget
    return plan_memory(shape, seq_len=seq_len, rows_per_step=tp.rows_per_step, free_bytes=free_bytes,
                       gradient_checkpointing=tp.gradient_checkpointing, activation_offloading=offload,
                       micro_batch_size=tp.micro_batch_size, bytes_per_element=BYTES[precision],
                       quantized=quantized, lora_r=lp.r, lora_dropout=lp.dropout > 0)


def _compile_available() -> str | None:
    """None if regional torch.compile can run here, else why not."""
    import torch

    if not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    if not _has("triton"):
        return "triton is not installed"
    return None


def _resolve_compile(setting: Any, cuda: bool, notes: list[str]) -> bool:
    """train.compile: auto = on for CUDA when triton is there (off on CPU: the demo path stays eager)."""
    if setting is False:
        return False
    if not cuda:
        if setting is True:
            notes.append("train.compile=true needs CUDA: running eager")
        return False
    why = _compile_available()
    if why:
        notes.append(f"train.compile={setting}: {why}; running eager")
        return False
    return True


def fingerprint(*parts: Any) -> str:
    """Stable hash of configs/data hashes: checkpoints from a different config are not resumed."""
    blob = json.dumps([p.model_dump() if hasattr(p, "model_dump") else asdict(p) if hasattr(
        p, "__dataclass_fields__") else p for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]
