"""Typed sections for the model and training stages: ``model``, ``lora``, ``train``, ``merge``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

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
    target_modules: str | list[str]
    use_dora: bool


class TrainSection(Section):
    quantization: Literal["none", "nf4"]
    precision: Literal["auto", "fp32", "bf16", "fp16"]
    epochs: float = Field(gt=0)
    max_steps: int
    learning_rate: float = Field(gt=0)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"]
    warmup_ratio: float = Field(ge=0.0, lt=1.0)
    weight_decay: float = Field(ge=0.0)
    max_grad_norm: float = Field(ge=0.0)
    per_device_batch_size: int = Field(ge=1)
    gradient_accumulation_steps: int = Field(ge=1)
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


class MergeSection(Section):
    dtype: Dtype
    verify_examples: int = Field(ge=0)
    tolerance: float = Field(gt=0.0)
