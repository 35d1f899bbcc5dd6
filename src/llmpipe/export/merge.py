"""Merge a LoRA/DoRA adapter into its base model and prove the merge is faithful.

The merge runs in float32 (base weights upcast), so the check compares like with like: logits of
the adapter model (base + LoRA branch) and of the merged model on a few validation examples must
agree within ``tolerance`` (max absolute difference). The merged model is then cast to the
requested dtype (bf16/fp16 on GPU boxes) and saved as a standalone safetensors model with the
tokenizer and chat template; the logit difference after that cast is recorded too (it measures
the cast, not the merge).

For an adapter trained with QLoRA the base weights here are the full-precision ones, as usual
for QLoRA merges; the check then verifies the merge, not the quantisation gap.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from llmpipe.config.model import MergeSection
from llmpipe.model.base import torch_dtype


class MergeError(RuntimeError):
    """The adapter cannot be merged, or the merged model does not match the adapter model."""


def _log(msg: str) -> None:
    print(f"[merge] {msg}", file=sys.stderr, flush=True)


@dataclass
class MergeResult:
    max_abs_logit_diff: float           # fp32 adapter model vs fp32 merged model
    max_abs_logit_diff_saved: float     # fp32 adapter model vs merged model in the saved dtype
    tolerance: float
    verified_examples: int
    verified_tokens: int
    dtype: str
    num_parameters: int
    weights_sha256: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _logits(model, batches: Sequence[list[int]]):
    import torch

    outs = []
    with torch.no_grad():
        for ids in batches:
            x = torch.tensor([ids], device=model.device)
            outs.append(model(input_ids=x).logits.float().cpu())
    return outs


def _max_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def merge_with_val_check(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path,
                         val_path: str | Path, merge: MergeSection, max_seq_len: int) -> MergeResult:
    """The merge stage's recipe: verify on the first ``merge.verify_examples`` validation examples
    (tokenised like training), merge, and write the merged model to ``out_dir`` atomically."""
    from llmpipe.io import atomic_dir
    from llmpipe.model.base import load_base_tokenizer
    from llmpipe.train.data import load_records, tokenize_records

    tokenizer = load_base_tokenizer(base_dir)
    val = tokenize_records(tokenizer, load_records(val_path), max_seq_len)
    with atomic_dir(out_dir) as tmp:
        return merge_adapter(base_dir, adapter_dir, tmp, val.input_ids[:merge.verify_examples], dtype=merge.dtype,
                             tolerance=merge.tolerance)


def merge_adapter(
    base_dir: str | Path,
    adapter_dir: str | Path,
    out_dir: str | Path,
    verify_ids: Sequence[list[int]],
    *,
    dtype: str,
    tolerance: float,
) -> MergeResult:
    """Merge ``adapter_dir`` into ``base_dir``; write the model to ``out_dir`` (filled in place)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from llmpipe.io import sha256_file
    from llmpipe.model.base import load_base_tokenizer

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise MergeError(f"{adapter_dir}: no adapter_config.json (run the train stage first)")
    if not verify_ids:
        raise MergeError("no examples to verify the merge on")
    out_dtype = torch_dtype(dtype)
    tokenizer = load_base_tokenizer(base_dir)
    _log(f"loading {base_dir} (float32) + adapter {adapter_dir}")
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    model.eval()
    ref = _logits(model, verify_ids)
    merged = model.merge_and_unload()
    merged.eval()
    got = _logits(merged, verify_ids)
    diff = _max_diff(ref, got)
    _log(f"fp32 merge check on {len(verify_ids)} examples: max |logit diff| = {diff:.3e} (tolerance {tolerance})")
    if not diff <= tolerance:
        raise MergeError(f"merged model logits differ from the adapter model's by {diff:.3e} > {tolerance}")
    if out_dtype != torch.float32:
        merged = merged.to(out_dtype)
    diff_saved = _max_diff(ref, _logits(merged, verify_ids)) if out_dtype != torch.float32 else diff
    merged.config.dtype = out_dtype
    merged.config.use_cache = True
    _log(f"saving merged model ({dtype}) to {out_dir}")
    merged.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    shas = {p.name: sha256_file(p) for p in sorted(out_dir.glob("*.safetensors"))}
    return MergeResult(
        max_abs_logit_diff=diff,
        max_abs_logit_diff_saved=diff_saved,
        tolerance=tolerance,
        verified_examples=len(verify_ids),
        verified_tokens=sum(len(x) for x in verify_ids),
        dtype=dtype,
        num_parameters=int(sum(p.numel() for p in merged.parameters())),
        weights_sha256=shas,
    )
