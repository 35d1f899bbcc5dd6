"""Memory-aware "auto": gradient checkpointing, micro-batch and activation offloading from numbers.

The fastest training step keeps every activation on the GPU (no recomputation) and pushes as
many packed rows through one forward as it can. Whether that fits depends on the model size, the
sequence length and the free GPU memory, so ``plan_memory`` estimates the peak of each candidate
and picks the fastest one that fits:

  1. no checkpointing, largest micro-batch that fits   (measured on an H200, 8B, 4 x 2048 tokens:
     15.1k tokens/s at 76 GB)
  2. checkpointing, activations on the GPU, largest micro-batch that fits
  3. checkpointing + activation offloading to pinned CPU memory (10.9k tokens/s at 19.5 GB)
  4. nothing fits: 3 with one row per forward, and a note that it may run out of memory.

Peak estimate (bytes), with b = bytes per weight/activation element (2 for bf16/fp16, 4 fp32),
t = tokens per forward (micro-batch rows x max_seq_len), L layers, H hidden, I intermediate:

  weights      = embedding params x b + other params x (b, or 0.5625 for nf4: 4 bits + absmax)
  lora state   = LoRA params (all-linear, rank r) x 16   (fp32 weight, grad, Adam m and v)
  per layer    = t x b x (k_h x H + k_i x I)       what autograd keeps for one decoder layer:
                 k_h = 10, k_i = 4 without LoRA dropout; 16 and 5 with it (dropout keeps a copy of
                 each adapted layer's input); flash/varlen attention keeps no seq x seq matrix
  activations  = L x per layer                                    (no checkpointing)
               = L x t x H x b  +  per layer                       (checkpointing: the layer inputs,
                                                                    plus one layer recomputed)
               = 2 x t x H x b  +  per layer                       (checkpointing + offloading: the
                                                                    inputs live in CPU memory, two
                                                                    in flight)
  peak         = weights + lora state + activations + 1 GB workspace (TRL's chunked LM head means
                 no full-vocabulary logits)

Against the H200 measurements (8B shape, 4 x 2048 tokens per forward, bf16) the estimate is 89.7 GB
for no checkpointing (measured 76.2 GB, LoRA dropout 0.05), 19.5 GB for checkpointing + offloading
(measured 19.5 GB, dropout 0) and 12.1 GB for QLoRA with checkpointing (measured 11.0 GB): on the
safe side. The budget is the free memory (``torch.cuda.mem_get_info``, capped
by ``torch.cuda.set_per_process_memory_fraction`` when set) x 0.9, minus 1.5 GB for the CUDA
context, the allocator's fragmentation and torch.compile's workspace.

This module is pure arithmetic (``plan_memory``) plus two readers of facts (``read_model_shape``,
``free_gpu_bytes``), so the rule is unit-tested without a GPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GB = 1e9
BUDGET_FRACTION = 0.9
RESERVE_BYTES = 1.5 * GB
WORKSPACE_BYTES = 1.0 * GB
NF4_BYTES_PER_PARAM = 0.5625
LORA_STATE_BYTES_PER_PARAM = 16


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder-only model that its training memory depends on."""

    num_parameters: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    tied_embeddings: bool

    @classmethod
    def from_config(cls, cfg: dict[str, Any], num_parameters: int | None = None) -> "ModelShape":
        h, i, n = int(cfg["hidden_size"]), int(cfg["intermediate_size"]), int(cfg["num_hidden_layers"])
        heads = int(cfg["num_attention_heads"])
        kv = int(cfg.get("num_key_value_heads") or heads)
        v = int(cfg["vocab_size"])
        tied = bool(cfg.get("tie_word_embeddings", False))
        if num_parameters is None:   # Llama-style count (attention, gated MLP, 2 norms per layer)
            head_dim = h // heads
            layer = h * h * 2 + 2 * h * kv * head_dim + 3 * h * i + 2 * h
            num_parameters = n * layer + v * h * (1 if tied else 2) + h
        return cls(int(num_parameters), h, i, n, heads, kv, v, tied)

    @property
    def embedding_parameters(self) -> int:
        return self.vocab_size * self.hidden_size * (1 if self.tied_embeddings else 2)

    def lora_parameters(self, r: int) -> int:
        """LoRA parameters with ``r`` on every linear layer of every decoder layer (all-linear)."""
        h, i = self.hidden_size, self.intermediate_size
        kv = self.num_kv_heads * (h // self.num_heads)
        in_out = (h + h) * 2 + (h + kv) * 2 + (h + i) * 2 + (i + h)    # q, o, k, v, gate, up, down
        return self.num_layers * r * in_out


@dataclass(frozen=True)
class Candidate:
    gradient_checkpointing: bool
    activation_offloading: bool
    micro_batch_size: int
    estimate_gb: float


@dataclass(frozen=True)
class MemoryPlan:
    """What ``plan_memory`` picked and why (recorded as ``picked`` in metrics/train.json)."""

    gradient_checkpointing: bool
    activation_offloading: bool
    micro_batch_size: int
    gradient_accumulation_steps: int
    estimate_gb: float | None
    budget_gb: float | None
    reason: str
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return {"gradient_checkpointing": self.gradient_checkpointing,
                "activation_offloading": self.activation_offloading,
                "micro_batch_size": self.micro_batch_size,
                "gradient_accumulation_steps": self.gradient_accumulation_steps,
                "estimate_gb": self.estimate_gb, "budget_gb": self.budget_gb, "reason": self.reason}


def estimate_peak_bytes(shape: ModelShape, *, tokens: int, gradient_checkpointing: bool,
                        activation_offloading: bool, bytes_per_element: int, quantized: bool, lora_r: int,
                        lora_dropout: bool) -> float:
    """Estimated peak GPU memory of one training step (see the module docstring for the terms)."""
    b = bytes_per_element
    emb = shape.embedding_parameters
    weights = emb * b + (shape.num_parameters - emb) * (NF4_BYTES_PER_PARAM if quantized else b)
    lora = shape.lora_parameters(lora_r) * LORA_STATE_BYTES_PER_PARAM
    k_h, k_i = (16, 5) if lora_dropout else (10, 4)
    per_layer = tokens * b * (k_h * shape.hidden_size + k_i * shape.intermediate_size)
    if not gradient_checkpointing:
        acts = shape.num_layers * per_layer
    elif activation_offloading:
        acts = 2 * tokens * shape.hidden_size * b + per_layer
    else:
        acts = shape.num_layers * tokens * shape.hidden_size * b + per_layer
    return weights + lora + acts + WORKSPACE_BYTES


def _divisors_desc(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def plan_memory(shape: ModelShape, *, seq_len: int, rows_per_step: int, free_bytes: float | None,
                gradient_checkpointing: Any = "auto", activation_offloading: Any = "auto",
                micro_batch_size: Any = "auto", bytes_per_element: int = 2, quantized: bool = False,
                lora_r: int = 16, lora_dropout: bool = True) -> MemoryPlan:
    """Pick checkpointing, offloading and the micro-batch; settings that are not "auto" are kept.

    ``free_bytes`` None means no GPU (CPU training): nothing is recomputed or offloaded and every
    row of the step goes through one forward, unless set otherwise.
    """
    ckpts = [False, True] if gradient_checkpointing == "auto" else [bool(gradient_checkpointing)]
    micros = _divisors_desc(rows_per_step) if micro_batch_size == "auto" else [int(micro_batch_size)]

    def offloads(ckpt: bool) -> list[bool]:
        if activation_offloading != "auto":
            return [bool(activation_offloading)]
        return [False, True] if ckpt else [False]   # offloading pays off for checkpointed inputs

    def plan(c: Candidate, budget: float | None, reason: str, notes: tuple[str, ...] = ()) -> MemoryPlan:
        return MemoryPlan(c.gradient_checkpointing, c.activation_offloading, c.micro_batch_size,
                          rows_per_step // c.micro_batch_size,
                          # no GPU: a GPU-memory estimate means nothing (and the shape may be a placeholder)
                          None if budget is None else c.estimate_gb,
                          None if budget is None else round(budget / GB, 1), reason, notes)

    def cand(ckpt: bool, off: bool, mb: int) -> Candidate:
        est = estimate_peak_bytes(shape, tokens=mb * seq_len, gradient_checkpointing=ckpt,
                                  activation_offloading=off, bytes_per_element=bytes_per_element,
                                  quantized=quantized, lora_r=lora_r, lora_dropout=lora_dropout)
        return Candidate(ckpt, off, mb, round(est / GB, 1))

    # fastest first: no recomputation beats recomputation, no PCIe traffic beats offloading, and
    # more rows per forward keep the GPU busier
    order = [cand(c, o, m) for c in ckpts for o in offloads(c) for m in micros]
    if free_bytes is None:
        first = order[0]
        return plan(first, None, "no GPU: nothing to fit, every row of the step in one forward, "
                                 "no recomputation, no offloading")
    budget = free_bytes * BUDGET_FRACTION - RESERVE_BYTES
    for c in order:
        if c.estimate_gb * GB <= budget:
            what = ("no checkpointing" if not c.gradient_checkpointing else
                    "checkpointing + offloading" if c.activation_offloading else "checkpointing")
            return plan(c, budget, f"fastest that fits: {what}, {c.micro_batch_size} row(s) x {seq_len} tokens per "
                                   f"forward, estimated {c.estimate_gb} GB <= budget {budget / GB:.1f} GB")
    last = min(order, key=lambda c: c.estimate_gb)
    note = (f"estimated peak {last.estimate_gb} GB exceeds the GPU memory budget {budget / GB:.1f} GB even with "
            f"the leanest allowed setting (checkpointing={last.gradient_checkpointing}, offloading="
            f"{last.activation_offloading}, {last.micro_batch_size} row(s) per forward): training may run out of "
            f"memory (shorten model.max_seq_len, use train.quantization: nf4, or leave the memory knobs on auto)")
    return plan(last, budget, "nothing fits: smallest estimate", (note,))


def read_model_shape(model_dir: str | Path) -> ModelShape:
    """The shape from ``config.json`` and the parameter count from the safetensors headers."""
    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    cfg = cfg.get("text_config", cfg) if "hidden_size" not in cfg else cfg
    n = 0
    for f in sorted(model_dir.glob("*.safetensors")):
        n += _safetensors_numel(f)
    return ModelShape.from_config(cfg, n or None)


def _safetensors_numel(path: Path) -> int:
    """Number of elements in a safetensors file, read from its JSON header only."""
    import struct

    with open(path, "rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(size))
    total = 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        count = 1
        for d in meta["shape"]:
            count *= int(d)
        total += count
    return total


def free_gpu_bytes(device: int = 0) -> float:
    """Free memory on ``device``, capped by this process's ``set_per_process_memory_fraction``."""
    import torch

    free, total = torch.cuda.mem_get_info(device)
    frac = torch.cuda.get_per_process_memory_fraction(device) if hasattr(
        torch.cuda, "get_per_process_memory_fraction") else 1.0
    return float(min(free, frac * total - torch.cuda.memory_reserved(device)))
