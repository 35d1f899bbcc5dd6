"""AWQ (W4A16) with llm-compressor, run in the AWQ virtualenv (``.venv-awq``), not the main one.

    <awq venv>/bin/python src/llmpipe/export/awq_worker.py REQUEST.json RESULT.json

``llmpipe.export.awq`` writes REQUEST.json (paths, the recipe, and the token ids: calibration
ids from the train split and the perplexity ids the quantize stage scores the GGUFs on, all made
by the main environment's tokenizer), runs this file with the AWQ venv's interpreter and
``PYTHONPATH`` set to the repository's ``src`` (for ``llmpipe.export.gguf.perplexity_hf``, the
function the quantize stage scores the merged model with), and reads RESULT.json.

Steps: load the merged model (fp32) -> its perplexity on the ids -> llm-compressor ``oneshot``
with an ``AWQModifier`` (4-bit integer weights, groups of ``group_size`` along the input
dimension, activations untouched) -> cast to ``dtype`` -> save compressed-tensors
(``pack-quantized``) + tokenizer
-> load the saved checkpoint back with transformers + compressed-tensors -> its perplexity on
the same ids -> a greedy chat reply.

Why a separate interpreter: llmcompressor 0.14.0.1 pins transformers<=5.17 and
compressed-tensors==0.19.0; the project's environment has transformers 5.23 (scripts/setup_awq.sh).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def _log(msg: str) -> None:
    print(f"[quantize-awq] {msg}", file=sys.stderr, flush=True)


def _cpu_without_pinned_memory() -> None:
    """Let AWQ run on a machine without an accelerator.

    llmcompressor 0.14.0.1's AWQ smoothing pins its cached activations unconditionally
    (``cache.pin_memory(batch_index)`` in ``modifiers/transform/awq/base.py``), for fast
    host-to-device copies. Pinning needs an accelerator: on a CPU-only machine torch raises
    ``RuntimeError: Cannot access accelerator device when none is available``. The cache already
    lives on the CPU, where the model runs, so not pinning changes nothing but the copy speed.
    Only applied when torch sees no CUDA device.
    """
    from llmcompressor.pipelines.cache import IntermediatesCache

    IntermediatesCache._pin_intermediate = classmethod(lambda cls, intermediate: None)


def _recipe(req: dict):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.awq import AWQModifier

    # Like llm-compressor's W4A16 / W4A16_ASYM presets, but with our group size: a model whose
    # linear layers' input widths are not multiples of the group size is refused (SmolLM2-135M:
    # hidden 576 = 4.5 x 128, so the presets' 128 cannot apply; 64 divides 576 and 1536).
    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(num_bits=4, type="int", symmetric=req["symmetric"], strategy="group",
                                 group_size=req["group_size"]),
    )
    return AWQModifier(ignore=req["ignore"], config_groups={"group_0": scheme}, n_grid=req["n_grid"])


def main(request_path: str, result_path: str) -> int:
    req = json.loads(Path(request_path).read_text(encoding="utf-8"))
    import compressed_tensors
    import llmcompressor
    import torch
    import transformers
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmpipe.export.gguf import perplexity_hf

    torch.set_num_threads(req["n_threads"])
    torch.manual_seed(0)
    if not torch.cuda.is_available():
        _cpu_without_pinned_memory()
    src, out = Path(req["model_dir"]), Path(req["out_dir"])
    seqs, cal = req["ppl_ids"], req["calibration_ids"]
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    merged = perplexity_hf(model, seqs)
    timings["merged_ppl_seconds"] = round(time.perf_counter() - t0, 2)
    _log(f"merged (fp32, transformers {transformers.__version__}): ppl {merged.ppl:.4f} "
         f"on {merged.n_tokens} tokens")

    t0 = time.perf_counter()
    dataset = Dataset.from_dict({"input_ids": cal, "attention_mask": [[1] * len(s) for s in cal]})
    _log(f"AWQ W4A16 (group {req['group_size']}, {'sym' if req['symmetric'] else 'asym'}, "
         f"n_grid {req['n_grid']}) on {len(cal)} calibration samples, {sum(map(len, cal))} tokens")
    oneshot(model=model, dataset=dataset, recipe=[_recipe(req)], max_seq_length=req["max_seq_length"],
            num_calibration_samples=len(cal), shuffle_calibration_samples=False)
    timings["awq_seconds"] = round(time.perf_counter() - t0, 2)

    # Calibrated and smoothed in float32; saved in the serving dtype (quantize_awq.dtype): the
    # scales and the unquantized tensors (embeddings, norms) in float32 would make the 4-bit
    # checkpoint of a small model larger than llama.cpp's Q8_0 (the tied embedding alone is a
    # fifth of SmolLM2-135M's weights).
    t0 = time.perf_counter()
    model = model.to(getattr(torch, req["dtype"]))
    model.save_pretrained(out, save_compressed=True)
    tok.save_pretrained(out)
    del model
    timings["save_seconds"] = round(time.perf_counter() - t0, 2)

    # Score what was written, not what is in memory: load the checkpoint back from disk.
    t0 = time.perf_counter()
    q = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    awq = perplexity_hf(q, seqs)
    timings["awq_ppl_seconds"] = round(time.perf_counter() - t0, 2)
    _log(f"AWQ checkpoint: ppl {awq.ppl:.4f} ({100 * (awq.ppl - merged.ppl) / merged.ppl:+.2f}% vs merged)")

    with torch.inference_mode():
        prompt = torch.tensor([req["prompt_ids"]], dtype=torch.long)
        gen = q.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                         max_new_tokens=req["reply_max_tokens"], pad_token_id=tok.pad_token_id)
    reply = tok.decode(gen[0, prompt.shape[1]:], skip_special_tokens=True).strip()
    _log(f"AWQ reply: {reply[:80]!r}")

    result = {
        "merged": merged.to_dict(),
        "awq": awq.to_dict(),
        "reply": reply,
        "quantization_config": json.loads((out / "config.json").read_text(encoding="utf-8"))
        .get("quantization_config", {}),
        "versions": {"llmcompressor": llmcompressor.__version__,
                     "compressed_tensors": compressed_tensors.__version__,
                     "transformers": transformers.__version__, "torch": torch.__version__},
        "timings": timings,
    }
    Path(result_path).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(f"usage: {sys.argv[0]} REQUEST.json RESULT.json")
    sys.exit(main(sys.argv[1], sys.argv[2]))
