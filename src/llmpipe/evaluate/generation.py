"""Batched greedy generation with a Hugging Face model directory and its chat template.

Prompts are lists of chat messages; the tokenizer's chat template renders them with the
generation prompt appended. Batches are left-padded (decoder-only models continue from the right
edge) and prompts are sorted by length so little compute is spent on padding; results come back
in the input order.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

Messages = list[dict[str, str]]


class ModelLoadError(RuntimeError):
    """A model directory cannot be loaded for evaluation."""


@dataclass
class LoadedModel:
    path: str
    model: Any
    tokenizer: Any
    device: str


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_model(path: str | Path, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Load an HF model dir (weights + tokenizer + chat template) for inference."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    if not (p / "config.json").is_file():
        raise ModelLoadError(f"{p}: not a Hugging Face model directory (no config.json)")
    dev = pick_device(device)
    if dtype == "auto":
        torch_dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    else:
        torch_dtype = getattr(torch, dtype)
    try:
        tok = AutoTokenizer.from_pretrained(p)
        model = AutoModelForCausalLM.from_pretrained(p, dtype=torch_dtype)
    except Exception as exc:  # transformers raises many types; name the directory once
        raise ModelLoadError(f"{p}: cannot load model/tokenizer: {exc}") from exc
    if tok.chat_template is None:
        raise ModelLoadError(f"{p}: tokenizer has no chat template")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    model.to(dev).eval()
    return LoadedModel(str(p), model, tok, dev)


def render_prompts(tokenizer: Any, prompts: Sequence[Messages]) -> list[str]:
    """Apply the chat template (with generation prompt) to every conversation."""
    return [
        tokenizer.apply_chat_template(list(m), tokenize=False, add_generation_prompt=True)
        for m in prompts
    ]


def generate(
    lm: LoadedModel,
    prompts: Sequence[Messages],
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    label: str = "generate",
) -> list[str]:
    """Greedy-decode a reply to every prompt; returns the decoded new text per prompt."""
    import torch

    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError("batch_size and max_new_tokens must be >= 1")
    tok, model = lm.tokenizer, lm.model
    texts = render_prompts(tok, prompts)
    lengths = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    out: list[str | None] = [None] * len(texts)
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else None
    t0 = time.monotonic()
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(lm.device) for k, v in enc.items()}
        with torch.inference_mode():
            gen = model.generate(
                **enc,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=tok.pad_token_id,
                eos_token_id=eos,
                temperature=None,
                top_p=None,
                top_k=None,
            )
        new = gen[:, enc["input_ids"].shape[1] :]
        for i, row in zip(idx, new):
            out[i] = tok.decode(row, skip_special_tokens=True).strip()
        done = min(b + batch_size, len(order))
        print(
            f"[{label}] {done}/{len(order)} prompts, {time.monotonic() - t0:.1f}s",
            file=sys.stderr,
            flush=True,
        )
    return [o if o is not None else "" for o in out]
