"""Typed sections for the model and training stages: ``model``, ``lora``, ``train``, ``merge``.

Everything that can be checked without the machine is checked here (types, ranges, choices, and
the consistency of the batch keys); what depends on the machine ("auto": CUDA, bitsandbytes,
free GPU memory) is resolved by ``llmpipe.train.config.resolve_runtime``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from llmpipe.config.base import Section

Dtype = Literal["float32", "bfloat16", "float16"]
Auto = Literal["auto", True, False]


class ModelSection(Section):
    name_or_path: str
    max_seq_len: int = Field(gt=0)
    dtype: Dtype


class LoraSection(Section):
    r: int = Field(gt=0)
    alpha: int = Field(gt=0)
    dropout: float = Field(ge=0.0, lt=1.0)
    target_modules: str | list[str]     # "all-linear", a peft regex, or module names
    use_dora: bool

    @field_validator("target_modules")
    @classmethod
    def _some_modules(cls, v: str | list[str]) -> str | list[str]:
        if not v:
            raise ValueError("must be 'all-linear' (or a regex) or a non-empty list of module names")
        return v

    def target_modules_list(self) -> str | list[str]:
        return self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)


class TrainSection(Section):
    quantization: Literal["none", "nf4"]
    precision: Literal["auto", "fp32", "bf16", "fp16"]
    epochs: float = Field(gt=0)
    max_steps: int = Field(ge=-1)       # > 0 overrides epochs; -1 (or 0): train for `epochs`
    learning_rate: float = Field(gt=0)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"]
    warmup_ratio: float = Field(ge=0.0, lt=1.0)
    weight_decay: float = Field(ge=0.0)
    max_grad_norm: float = Field(ge=0.0)
    per_device_batch_size: int = Field(ge=1)
    gradient_accumulation_steps: int = Field(ge=1)
    micro_batch_size: Literal["auto"] | int
    packing: bool
    gradient_checkpointing: Auto
    optimizer: str
    attn_implementation: str
    liger_kernel: Auto
    compile: Auto
    activation_offloading: Auto
    eval_steps: int = Field(ge=1)
    save_steps: int = Field(ge=1)
    save_total_limit: int = Field(ge=1)
    logging_steps: int = Field(ge=1)
    cpu_threads: int = Field(ge=0)
    num_processes: int = Field(ge=1)
    distributed: Literal["ddp", "fsdp"]
    dataloader_workers: int = Field(ge=0)

    @property
    def rows_per_step(self) -> int:
        """Packed rows per optimizer step and process: the optimisation batch (micro-batching
        only decides how many of them go through one forward)."""
        return self.per_device_batch_size * self.gradient_accumulation_steps

    @model_validator(mode="after")
    def _micro_batch_divides_the_step(self) -> "TrainSection":
        mb = self.micro_batch_size
        if mb != "auto" and (isinstance(mb, bool) or mb < 1 or self.rows_per_step % mb):
            raise ValueError(
                f"train.micro_batch_size ({mb!r}) must be 'auto' or a divisor of per_device_batch_size x "
                f"gradient_accumulation_steps ({self.rows_per_step} packed rows per optimizer step)")
        return self


class MergeSection(Section):
    dtype: Dtype
    verify_examples: int = Field(ge=1)   # the merge is always checked on real examples
    tolerance: float = Field(gt=0.0)
