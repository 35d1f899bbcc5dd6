"""GGUF export with llama.cpp: convert, quantize, load back, generate, measure perplexity.

* :func:`convert_to_gguf` runs llama.cpp's own ``convert_hf_to_gguf.py`` (extracted with its
  ``conversion/`` and ``gguf-py/`` from the llama-cpp-python sdist by
  ``scripts/install_llama_cpp.sh``, so converter and runtime come from one llama.cpp commit) on a
  Hugging Face model directory, in a subprocess.
* :func:`quantize` calls ``llama_model_quantize`` from llama.cpp through llama-cpp-python.
* :func:`load_gguf`, :func:`chat_reply`, :func:`measure_generation` load a GGUF file back with
  ``llama_cpp.Llama``, answer a chat prompt with the chat template stored in the file, and time
  token generation on CPU.
* :func:`perplexity_gguf` and :func:`perplexity_hf` score the *same token ids* with llama.cpp and
  with transformers, so the quality cost of every quant type is one comparable number.

Every output file is written to a temporary sibling and renamed into place.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from llmpipe.io import atomic_path

CONVERTER_ENV = "LLMPIPE_CONVERT_HF_TO_GGUF"
# Float types the converter writes itself; everything else is produced by llama_model_quantize.
CONVERTER_OUTTYPES = ("f32", "f16", "bf16")


class GGUFError(RuntimeError):
    """Conversion, quantization or loading of a GGUF file failed."""


def _log(msg: str) -> None:
    print(f"[quantize] {msg}", file=sys.stderr, flush=True)


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as exc:  # not installed, or its shared library failed to load
        raise GGUFError(
            f"llama-cpp-python is not importable ({exc}); run scripts/install_llama_cpp.sh"
        ) from exc
    return llama_cpp


# --------------------------------------------------------------------------- quant types


def quant_types() -> dict[str, int]:
    """Map quant names (``Q8_0``, ``Q4_K_M``, ``F16`` ...) to llama.cpp ``llama_ftype`` values."""
    lc = _llama_cpp()
    types = {"F32": lc.LLAMA_FTYPE_ALL_F32}
    for name in dir(lc):
        if name.startswith("LLAMA_FTYPE_MOSTLY_"):
            types[name[len("LLAMA_FTYPE_MOSTLY_"):]] = getattr(lc, name)
    return types


def normalise_quant_type(name: str) -> str:
    """``q4_k_m`` -> ``Q4_K_M``; a clear error for unknown names."""
    if not isinstance(name, str) or not name.strip():
        raise GGUFError(f"quant type {name!r} is not a non-empty string")
    key = name.strip().upper()
    known = quant_types()
    if key not in known:
        raise GGUFError(f"unknown quant type '{name}'; llama.cpp knows: {', '.join(sorted(known))}")
    return key


def gguf_filename(name: str, quant: str) -> str:
    """``<name>-<quant lower case>.gguf``, e.g. ``support-triage-q4_k_m.gguf``."""
    return f"{name}-{quant.lower()}.gguf"


# --------------------------------------------------------------------------- convert


def find_converter() -> Path:
    """Locate llama.cpp's ``convert_hf_to_gguf.py`` for the installed llama-cpp-python."""
    override = os.environ.get(CONVERTER_ENV)
    if override:
        path = Path(override)
        if not path.is_file():
            raise GGUFError(f"${CONVERTER_ENV}={override}: no such file")
        return path
    version = _llama_cpp().__version__
    path = Path(sys.prefix) / "share" / "llmpipe" / f"llama.cpp-convert-{version}" / "convert_hf_to_gguf.py"
    if not path.is_file():
        raise GGUFError(
            f"{path}: llama.cpp converter for llama-cpp-python {version} not found; "
            f"run scripts/install_llama_cpp.sh (or set ${CONVERTER_ENV})"
        )
    return path


def convert_to_gguf(
    model_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    outtype: str = "f16",
    model_name: str | None = None,
) -> Path:
    """Convert an HF model directory to one GGUF file with llama.cpp's converter."""
    model_dir = Path(model_dir)
    out_path = Path(out_path)
    if outtype not in CONVERTER_OUTTYPES:
        raise GGUFError(f"converter outtype '{outtype}' is not one of {', '.join(CONVERTER_OUTTYPES)}")
    if not (model_dir / "config.json").is_file():
        raise GGUFError(f"{model_dir}: not a Hugging Face model directory (no config.json)")
    converter = find_converter()
    # The converter puts the gguf-py of its own llama.cpp commit (extracted beside it) first on
    # sys.path unless NO_LOCAL_GGUF is set; it needs that one (newer than the PyPI gguf release).
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    if not (converter.parent / "gguf-py").is_dir():
        raise GGUFError(f"{converter.parent}/gguf-py missing: re-run scripts/install_llama_cpp.sh")
    with atomic_path(out_path) as tmp:
        cmd = [sys.executable, str(converter), str(model_dir), "--outfile", str(tmp), "--outtype", outtype]
        if model_name:
            cmd += ["--model-name", model_name]
        _log(f"converting {model_dir} -> {out_path.name} ({outtype})")
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            tail = "\n".join(proc.stdout.strip().splitlines()[-25:])
            raise GGUFError(
                f"{converter} failed on {model_dir} (exit {proc.returncode}); last output:\n{tail}"
            )
        if tmp.stat().st_size == 0:
            raise GGUFError(f"{converter} wrote an empty file for {model_dir}")
    return out_path


# --------------------------------------------------------------------------- quantize


def quantize(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    quant: str,
    n_threads: int,
) -> Path:
    """Quantize the GGUF file ``src`` (f16/f32) to ``quant`` with llama.cpp's quantizer."""
    lc = _llama_cpp()
    src, dst = Path(src), Path(dst)
    quant = normalise_quant_type(quant)
    if not src.is_file():
        raise GGUFError(f"{src}: GGUF input for quantization not found")
    params = lc.llama_model_quantize_default_params()
    params.ftype = quant_types()[quant]
    params.nthread = int(n_threads)
    with atomic_path(dst) as tmp:
        rc = lc.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
        if rc != 0:
            raise GGUFError(f"llama_model_quantize({src} -> {quant}) failed with code {rc}")
    return dst


@dataclass(frozen=True)
class GGUFInfo:
    """What a GGUF file holds, read with the ``gguf`` package (no llama.cpp needed)."""

    file_type: str            # llama_ftype name, e.g. "MOSTLY_Q8_0"
    tensor_types: dict[str, int]   # ggml type name -> number of tensors of that type
    n_elements: int           # number of weights
    has_chat_template: bool
    architecture: str


def read_gguf_info(path: str | os.PathLike[str]) -> GGUFInfo:
    from gguf import GGUFReader, LlamaFileType

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # gguf raises ValueError/struct errors on bad files
        raise GGUFError(f"{path}: not a readable GGUF file: {exc}") from exc

    def field(key: str):
        f = reader.get_field(key)
        return None if f is None else f.contents()

    ftype = field("general.file_type")
    counts: dict[str, int] = {}
    n = 0
    for t in reader.tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
        n += int(t.n_elements)
    return GGUFInfo(
        file_type=LlamaFileType(ftype).name if ftype is not None else "unknown",
        tensor_types=dict(sorted(counts.items())),
        n_elements=n,
        has_chat_template=bool(field("tokenizer.chat_template")),
        architecture=str(field("general.architecture")),
    )


# --------------------------------------------------------------------------- load back


def load_gguf(path: str | os.PathLike[str], n_ctx: int, n_threads: int, seed: int = 0):
    """Load a GGUF with llama.cpp (CPU), keeping the logits of every position (for perplexity)."""
    lc = _llama_cpp()
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"{path}: GGUF file not found")
    try:
        return lc.Llama(
            model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=min(n_ctx, 512),
            n_threads=n_threads, n_threads_batch=n_threads, logits_all=True, seed=seed,
            n_gpu_layers=0, verbose=False,
        )
    except Exception as exc:  # llama_cpp raises ValueError("Failed to load model from file")
        raise GGUFError(f"{path}: llama.cpp could not load the model: {exc}") from exc


def chat_reply(llm, messages: list[dict[str, str]], max_tokens: int) -> str:
    """Greedy reply from llama.cpp, formatted with the chat template stored in the GGUF."""
    out = llm.create_chat_completion(messages=messages, temperature=0.0, top_k=1, max_tokens=max_tokens, seed=0)
    return (out["choices"][0]["message"]["content"] or "").strip()


@dataclass(frozen=True)
class GenerationStats:
    prompt_tokens: int
    generated_tokens: int
    prompt_seconds: float
    generation_seconds: float

    @property
    def prompt_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else float("nan")

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.generation_seconds if self.generation_seconds > 0 else float("nan")


def measure_generation(llm, prompt_ids: Sequence[int], n_tokens: int) -> GenerationStats:
    """Time prompt processing and greedy decoding of exactly ``n_tokens`` tokens.

    End-of-sequence is ignored (as llama-bench does) so every model decodes the same number of
    tokens and the rates are comparable. Decoding rate excludes the first token, whose time is
    dominated by prompt processing.
    """
    if n_tokens < 2:
        raise GGUFError("measure_generation needs n_tokens >= 2")
    if len(prompt_ids) + n_tokens > llm.n_ctx():
        raise GGUFError(f"prompt ({len(prompt_ids)}) + {n_tokens} tokens exceed n_ctx={llm.n_ctx()}")
    llm.reset()
    t0 = time.perf_counter()
    t_first = None
    count = 0
    for _tok in llm.generate(list(prompt_ids), top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        count += 1
        if t_first is None:
            t_first = time.perf_counter()
        if count >= n_tokens:
            break
    t_end = time.perf_counter()
    assert t_first is not None
    return GenerationStats(
        prompt_tokens=len(prompt_ids), generated_tokens=count - 1,
        prompt_seconds=t_first - t0, generation_seconds=t_end - t_first,
    )


def llama_tokenize(llm, text: str) -> list[int]:
    """Tokenize chat-template text the way llama.cpp's server does (special tokens parsed, no BOS)."""
    return list(llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))


# --------------------------------------------------------------------------- perplexity


@dataclass(frozen=True)
class Perplexity:
    """Token-weighted perplexity over a set of sequences (first token of each is not scored)."""

    nll_sum: float
    n_tokens: int
    n_sequences: int

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.n_tokens if self.n_tokens else float("nan")

    @property
    def ppl(self) -> float:
        return math.exp(self.mean_nll) if self.n_tokens else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mean_nll": self.mean_nll, "ppl": self.ppl}


def _nll_from_logits(logits, ids: Sequence[int]) -> float:
    """Sum of -log p(ids[i+1] | ids[:i+1]) from a [len(ids), vocab] float array (numpy)."""
    import numpy as np

    x = np.asarray(logits[: len(ids) - 1], dtype=np.float64)
    target = np.asarray(ids[1:], dtype=np.int64)
    m = x.max(axis=1, keepdims=True)
    logz = (m[:, 0] + np.log(np.exp(x - m).sum(axis=1)))
    return float((logz - x[np.arange(len(target)), target]).sum())


def _check_sequences(seqs: Sequence[Sequence[int]]) -> None:
    if not seqs:
        raise GGUFError("perplexity needs at least one token sequence")
    for i, s in enumerate(seqs):
        if len(s) < 2:
            raise GGUFError(f"perplexity: sequence {i} has {len(s)} token(s); at least 2 are needed")


def perplexity_gguf(llm, seqs: Sequence[Sequence[int]], progress_every: int = 16) -> Perplexity:
    """Perplexity of ``seqs`` (token ids) under a llama.cpp model loaded by :func:`load_gguf`."""
    _check_sequences(seqs)
    total, count = 0.0, 0
    for i, ids in enumerate(seqs):
        if len(ids) > llm.n_ctx():
            raise GGUFError(f"perplexity: sequence {i} has {len(ids)} tokens > n_ctx={llm.n_ctx()}")
        llm.reset()
        llm.eval(list(ids))
        total += _nll_from_logits(llm.scores[: len(ids)], ids)
        count += len(ids) - 1
        if progress_every and (i + 1) % progress_every == 0:
            _log(f"  ppl {i + 1}/{len(seqs)} sequences")
    return Perplexity(total, count, len(seqs))


def perplexity_hf(model, seqs: Sequence[Sequence[int]], progress_every: int = 16) -> Perplexity:
    """Perplexity of ``seqs`` under a transformers causal LM (CPU, one sequence at a time)."""
    import torch

    _check_sequences(seqs)
    model.eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for i, ids in enumerate(seqs):
            logits = model(torch.tensor([list(ids)], dtype=torch.long)).logits[0].float().numpy()
            total += _nll_from_logits(logits, ids)
            count += len(ids) - 1
            if progress_every and (i + 1) % progress_every == 0:
                _log(f"  ppl {i + 1}/{len(seqs)} sequences (transformers)")
    return Perplexity(total, count, len(seqs))


# --------------------------------------------------------------------------- chat text


def chat_text(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """Messages formatted with the HF tokenizer's chat template (the model's own format)."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def hf_token_ids(tokenizer, text: str) -> list[int]:
    """Token ids of already-templated text (special tokens come from the template itself)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass(frozen=True)
class TokenSet:
    """What every model is scored on: chat-template texts and their HF token ids."""

    texts: list[str]            # chat-template text of each record
    full_ids: list[list[int]]   # HF token ids of each text (reference for the tokenizer check)
    seqs: list[list[int]]       # the ids scored for perplexity (full_ids cut to max_tokens)
    truncated: int              # how many were cut to max_tokens

    @property
    def n_tokens(self) -> int:
        return sum(len(s) for s in self.seqs)


def perplexity_sequences(
    tokenizer, records: Iterable[dict[str, Any]], max_examples: int, max_tokens: int
) -> TokenSet:
    """Chat-template text and token ids of the first ``max_examples`` records.

    Every model is scored on exactly these ids, so differences come from the weights alone.
    """
    if max_examples < 1 or max_tokens < 2:
        raise GGUFError(f"perplexity needs max_examples >= 1 and max_tokens >= 2 (got {max_examples}, {max_tokens})")
    texts, full, seqs, truncated = [], [], [], 0
    for rec in records:
        if len(seqs) >= max_examples:
            break
        text = chat_text(tokenizer, rec["messages"])
        ids = hf_token_ids(tokenizer, text)
        texts.append(text)
        full.append(ids)
        seqs.append(ids[:max_tokens])
        truncated += len(ids) > max_tokens
    if not seqs:
        raise GGUFError("perplexity: no records to score")
    return TokenSet(texts, full, seqs, truncated)


# --------------------------------------------------------------------------- one file, all checks


def evaluate_gguf(
    path: str | os.PathLike[str],
    tokens: TokenSet,
    prompt_messages: list[dict[str, str]],
    prompt_ids: Sequence[int],
    *,
    n_ctx: int,
    n_threads: int,
    reply_max_tokens: int,
    bench_tokens: int,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load ``path`` with llama.cpp and check it; returns ``(results, timings)``.

    llama.cpp's own tokenization of each text in ``tokens`` is compared with the HF ids
    (``tokenizer_mismatches`` counts texts whose ids differ). Perplexity always uses
    ``tokens.seqs``, the HF ids, so every model sees the same tokens. ``results`` are
    deterministic (size, perplexity, greedy reply ...); ``timings`` holds the wall-clock numbers
    (load and check seconds, prompt and decode tokens/s), which differ on every run.
    """
    path = Path(path)
    size = path.stat().st_size
    t0 = time.perf_counter()
    llm = load_gguf(path, n_ctx=n_ctx, n_threads=n_threads)
    load_s = time.perf_counter() - t0
    try:
        # from llama.cpp itself (gguf.GGUFReader takes seconds on a 49k-token vocabulary)
        n_params = int(llm._model.n_params())
        ftype = int(llm.metadata.get("general.file_type", -1))
        file_type = (_llama_cpp().llama_ftype_name(ftype) or b"?").decode() if ftype >= 0 else "unknown"
        if not llm.metadata.get("tokenizer.chat_template"):
            raise GGUFError(f"{path}: no tokenizer.chat_template in the GGUF metadata; chat replies "
                            "would use a wrong prompt format (does the merged tokenizer have one?)")
        mismatches = sum(
            1 for text, ids in zip(tokens.texts, tokens.full_ids) if llama_tokenize(llm, text) != ids
        )
        ppl = perplexity_gguf(llm, tokens.seqs)
        reply = chat_reply(llm, prompt_messages, max_tokens=reply_max_tokens)
        gen = measure_generation(llm, prompt_ids, n_tokens=bench_tokens)
    finally:
        llm.close()
    eval_s = time.perf_counter() - t0
    results = {
        "file": path.name,
        "file_type": file_type,
        "n_params": n_params,
        "size_bytes": size,
        "size_mb": round(size / 1e6, 2),
        "bits_per_weight": round(size * 8 / n_params, 3) if n_params else None,
        "ppl": ppl.ppl,
        "mean_nll": ppl.mean_nll,
        "ppl_tokens": ppl.n_tokens,
        "tokenizer_mismatches": mismatches,
        "reply": reply,
    }
    timings = {
        "load_seconds": round(load_s, 3),
        "eval_seconds": round(eval_s, 2),
        "prompt_tokens_per_s": round(gen.prompt_tokens_per_s, 2),
        "tokens_per_s": round(gen.tokens_per_s, 2),
        "bench_tokens": gen.generated_tokens,
    }
    return results, timings
