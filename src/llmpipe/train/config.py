"""Training configuration: the ``lora:`` and ``train:`` sections of params.yaml, validated.

Everything "auto" is decided here from what the machine has (CUDA, bitsandbytes, bf16 support),
and the decision is recorded (``resolve_runtime``) so metrics/train.json says which path ran.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from llmpipe.params import ParamsError

QUANTIZATIONS = ("none", "nf4")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
DISTRIBUTED = ("ddp", "fsdp")


@dataclass(frozen=True)
class LoraParams:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str | tuple[str, ...] = "all-linear"
    use_dora: bool = False

    @classmethod
    def from_params(cls, p: dict[str, Any]) -> "LoraParams":
        tm = p.get("target_modules", cls.target_modules)
        if isinstance(tm, list):
            tm = tuple(str(x) for x in tm)
        elif not isinstance(tm, str):
            raise ParamsError("params.yaml: lora.target_modules must be 'all-linear' or a list of module names")
        out = cls(
            r=int(p.get("r", cls.r)),
            alpha=int(p.get("alpha", cls.alpha)),
            dropout=float(p.get("dropout", cls.dropout)),
            target_modules=tm,
            use_dora=bool(p.get("use_dora", cls.use_dora)),
        )
        if out.r <= 0 or out.alpha <= 0:
            raise ParamsError(f"params.yaml: lora.r ({out.r}) and lora.alpha ({out.alpha}) must be > 0")
        if not 0.0 <= out.dropout < 1.0:
            raise ParamsError(f"params.yaml: lora.dropout ({out.dropout}) must be in [0, 1)")
        return out

    def peft_config(self):
        from peft import LoraConfig

        tm = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        return LoraConfig(
            r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=tm,
            use_dora=self.use_dora, bias="none", task_type="CAUSAL_LM",
        )


@dataclass(frozen=True)
class TrainParams:
    seed: int = 1234
    quantization: str = "none"          # none | nf4 (QLoRA: CUDA + bitsandbytes only)
    precision: str = "auto"             # auto | fp32 | bf16 | fp16
    epochs: float = 1.0
    max_steps: int = -1                 # > 0 overrides epochs
    learning_rate: float = 2e-4
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    per_device_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    packing: bool = True                # padding-free packing (position ids, no cross-example attention)
    gradient_checkpointing: str = "auto"  # auto (on for CUDA) | true | false
    optimizer: str = "auto"             # auto: adamw_torch_fused on CUDA, adamw_torch on CPU; or paged_adamw_8bit...
    attn_implementation: str = "auto"   # auto: sdpa | eager | flash_attention_2 ...
    liger_kernel: str = "auto"          # auto: off (measured slower) | true (CUDA + liger-kernel) | false
    compile: str = "auto"               # auto: torch.compile each decoder layer on CUDA | true | false
    activation_offloading: str = "auto"  # auto: off | true: checkpointed activations to pinned CPU memory (CUDA)
    eval_steps: int = 50
    save_steps: int = 50
    save_total_limit: int = 2
    logging_steps: int = 5
    num_processes: int = 1              # > 1: the stage re-launches itself via `accelerate launch`
    distributed: str = "ddp"            # ddp | fsdp (only with num_processes > 1)
    dataloader_workers: int = 0
    cpu_threads: int = 0                # CPU only: torch.set_num_threads (0 = default)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_params(cls, p: dict[str, Any], seed: int | None = None) -> "TrainParams":
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        unknown = sorted(set(p) - known)
        if unknown:
            raise ParamsError(f"params.yaml: unknown train.* keys: {', '.join(unknown)}")
        kw: dict[str, Any] = {}
        for name in known:
            if name in p:
                default = cls.__dataclass_fields__[name].default
                val = p[name]
                if isinstance(default, bool):
                    val = bool(val)
                elif isinstance(default, int) and not isinstance(default, bool):
                    val = int(val)
                elif isinstance(default, float):
                    val = float(val)
                else:
                    val = str(val).lower() if isinstance(val, bool) else str(val)
                kw[name] = val
        if "seed" not in kw and seed is not None:
            kw["seed"] = int(seed)
        out = cls(**kw)
        out._check()
        return out

    def _check(self) -> None:
        def bad(key: str, val: Any, allowed: tuple[str, ...]) -> ParamsError:
            return ParamsError(f"params.yaml: train.{key} = {val!r}; expected one of {', '.join(allowed)}")

        if self.quantization not in QUANTIZATIONS:
            raise bad("quantization", self.quantization, QUANTIZATIONS)
        if self.precision not in PRECISIONS:
            raise bad("precision", self.precision, PRECISIONS)
        if self.lr_scheduler not in SCHEDULERS:
            raise bad("lr_scheduler", self.lr_scheduler, SCHEDULERS)
        if self.distributed not in DISTRIBUTED:
            raise bad("distributed", self.distributed, DISTRIBUTED)
        for key in ("gradient_checkpointing", "liger_kernel", "compile", "activation_offloading"):
            if getattr(self, key) not in ("auto", "true", "false"):
                raise bad(key, getattr(self, key), ("auto", "true", "false"))
        if self.max_steps <= 0 and self.epochs <= 0:
            raise ParamsError("params.yaml: set train.epochs > 0 or train.max_steps > 0")
        for key in ("per_device_batch_size", "gradient_accumulation_steps", "eval_steps", "save_steps",
                    "logging_steps", "num_processes", "save_total_limit"):
            if getattr(self, key) < 1:
                raise ParamsError(f"params.yaml: train.{key} must be >= 1 (got {getattr(self, key)})")
        if self.learning_rate <= 0:
            raise ParamsError("params.yaml: train.learning_rate must be > 0")


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
    notes: tuple[str, ...] = ()
    compile: bool = False       # regional torch.compile of the decoder layers (CUDA + triton)
    activation_offloading: bool = False  # TRL: saved activations to pinned CPU memory, overlapped (CUDA)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["notes"] = list(self.notes)
        return d


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _varlen_available() -> bool:
    from llmpipe.train import attention

    return attention.available()


def resolve_runtime(tp: TrainParams, lp: LoraParams, cuda: bool | None = None) -> Runtime:
    """Decide the device, mode, precision, optimizer and kernels; say why in ``notes``."""
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

    gc = cuda if tp.gradient_checkpointing == "auto" else tp.gradient_checkpointing == "true"
    if tp.liger_kernel == "auto":
        # Measured on an H100 (benchmarks/results/train_throughput.json): Liger made this training
        # step slower, so "auto" leaves it off; set train.liger_kernel: true to force it.
        liger = False
    else:
        liger = tp.liger_kernel == "true"
        if liger and not (cuda and _has("liger_kernel")):
            notes.append("train.liger_kernel=true but Liger (or CUDA) is missing: using plain kernels")
            liger = False
    compile_ = _resolve_compile(tp.compile, cuda, notes)
    if compile_ and tp.compile == "auto" and tp.num_processes > 1 and tp.distributed == "fsdp":
        notes.append("train.compile=auto: off under FSDP (not measured there); set train.compile: true to force")
        compile_ = False
    offload = _resolve_offloading(tp.activation_offloading, cuda, notes)
    attn = tp.attn_implementation
    if attn == "auto":
        if cuda and _has("flash_attn"):
            attn = "flash_attention_2"
        elif cuda and tp.packing and _varlen_available():
            attn = "llmpipe_varlen"     # torch's FlashAttention varlen kernel, see train/attention.py
        else:
            attn = "sdpa"
    return Runtime("cuda" if cuda else "cpu", mode, precision, optimizer, gc, liger, attn, tuple(notes),
                   compile=compile_, activation_offloading=offload)


def _compile_available() -> str | None:
    """None if regional torch.compile can run here, else why not."""
    import torch

    if not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    if not _has("triton"):
        return "triton is not installed"
    return None


def _resolve_compile(setting: str, cuda: bool, notes: list[str]) -> bool:
    """train.compile: auto = on for CUDA when triton is there (off on CPU: the demo path stays eager)."""
    if setting == "false":
        return False
    if not cuda:
        if setting == "true":
            notes.append("train.compile=true needs CUDA: running eager")
        return False
    why = _compile_available()
    if why:
        notes.append(f"train.compile={setting}: {why}; running eager")
        return False
    return True


def _resolve_offloading(setting: str, cuda: bool, notes: list[str]) -> bool:
    """train.activation_offloading: auto = off (see README: it trades PCIe traffic for memory)."""
    if setting != "true":
        return False
    if not cuda:
        notes.append("train.activation_offloading=true needs CUDA: keeping activations in memory")
        return False
    return True


def fingerprint(*parts: Any) -> str:
    """Stable hash of configs/data hashes: checkpoints from a different config are not resumed."""
    blob = json.dumps([p if not hasattr(p, "__dataclass_fields__") else asdict(p) for p in parts],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]
