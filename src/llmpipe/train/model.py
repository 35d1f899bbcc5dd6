"""Load the base model for training: full precision (LoRA) or 4-bit NF4 (QLoRA, CUDA only), and
the peft LoRA/DoRA config of the ``lora:`` section."""

from __future__ import annotations

import sys
from pathlib import Path

from llmpipe.config.model import LoraSection
from llmpipe.model.source import ModelSourceError
from llmpipe.train.config import Runtime

TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def lora_config(lora: LoraSection):
    """The peft ``LoraConfig`` of the ``lora:`` section (DoRA with ``use_dora``)."""
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules_list(),
        use_dora=lora.use_dora, bias="none", task_type="CAUSAL_LM",
    )


def compute_dtype(runtime: Runtime):
    import torch

    return getattr(torch, TORCH_DTYPES[runtime.precision])


def load_for_training(model_dir: str | Path, runtime: Runtime):
    """Load ``model_dir`` (the base-model stage's output) as ``runtime`` says.

    QLoRA: bitsandbytes NF4 with double quantisation and bf16 (or the run's) compute dtype.
    """
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ModelSourceError(f"{model_dir}: no config.json (run the base-model stage first)")
    dtype = compute_dtype(runtime)
    if runtime.attn_implementation == "llmpipe_varlen":
        from llmpipe.train import attention

        attention.register()
    kwargs = {"dtype": dtype, "attn_implementation": runtime.attn_implementation}
    if runtime.mode.startswith("q"):
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype if dtype != torch.float32 else torch.bfloat16,
            bnb_4bit_quant_storage=dtype if dtype != torch.float32 else torch.bfloat16,
        )
    if runtime.device == "cuda":
        from llmpipe.train.launch import local_rank

        kwargs["device_map"] = {"": local_rank()}
    print(f"[train] loading {model_dir} ({runtime.mode}, {runtime.precision}, "
          f"attn={runtime.attn_implementation})", file=sys.stderr, flush=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    except Exception as exc:
        raise ModelSourceError(f"cannot load base model from {model_dir}: {exc}") from exc
    model.config.use_cache = False
    return model
