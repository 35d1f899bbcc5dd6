"""The whole of params.yaml as one typed model, and the loader every stage uses.

``load_params()`` validates the whole file (so a misspelled key in any section is an error in
every stage) and returns a ``Params``. ``load_stage_params(DECLARED)`` does the same and returns
a view that lets a stage read only the keys it declares: each stage script lists them in a
module-level ``PARAMS`` that equals its ``params:`` in dvc.yaml (tests/test_dvc_deps.py checks
it), so DVC's params hashes cover every key a stage can read.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import yaml
from pydantic import BaseModel, Field, ValidationError

from llmpipe.config.base import ParamsError, Section, format_errors
from llmpipe.config.data import CurationSection, DedupSection, PiiSection, SplitSection, ValidateSection
from llmpipe.config.evaluate import EvalSection, GateSection
from llmpipe.config.export import QuantizeAwqSection, QuantizeSection
from llmpipe.config.model import LoraSection, MergeSection, ModelSection, TrainSection
from llmpipe.config.serve import DeploySection, RegistrySection, ServeSection

DEFAULT_PARAMS = "params.yaml"


class Params(Section):
    """params.yaml, top to bottom in pipeline order."""

    seed: int
    model: ModelSection
    curation: CurationSection
    validate_: ValidateSection = Field(alias="validate")  # `validate` is a BaseModel method name
    pii: PiiSection
    dedup: DedupSection
    split: SplitSection
    lora: LoraSection
    train: TrainSection
    merge: MergeSection
    quantize: QuantizeSection
    quantize_awq: QuantizeAwqSection
    eval: EvalSection
    gate: GateSection
    registry: RegistrySection
    serve: ServeSection
    deploy: DeploySection


def params_path(path: str | os.PathLike[str] | None = None) -> Path:
    return Path(path or os.environ.get("LLMPIPE_PARAMS", DEFAULT_PARAMS))


def read_yaml(path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The raw mapping in params.yaml (for tools that need the text, e.g. params diffs)."""
    p = params_path(path)
    if not p.exists():
        raise ParamsError(f"{p}: parameters file not found (run from the repository root)")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ParamsError(f"{p}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ParamsError(f"{p}: top level must be a mapping of sections")
    return data


def parse_params(data: dict[str, Any], source: str = DEFAULT_PARAMS) -> Params:
    try:
        return Params.model_validate(data)
    except ValidationError as exc:
        raise ParamsError(format_errors(Params, exc, source)) from None


def load_params(path: str | os.PathLike[str] | None = None) -> Params:
    """Read and validate the whole params file (``path``, ``$LLMPIPE_PARAMS`` or params.yaml)."""
    p = params_path(path)
    return parse_params(read_yaml(p), str(p))


def _attr(name: str) -> str:
    return "validate_" if name == "validate" else ("schema_" if name == "schema" else name)


class StageParams:
    """A read-only view of ``Params`` limited to the dotted keys a stage declares.

    Reading a declared key (or anything below a declared section) gives the real typed value;
    reading anything else raises, naming the key to add to the stage's ``params:`` in dvc.yaml.
    """

    __slots__ = ("_obj", "_path", "_declared")

    def __init__(self, obj: BaseModel, declared: Sequence[str], path: str = "") -> None:
        object.__setattr__(self, "_obj", obj)
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_declared", tuple(declared))

    def __getattr__(self, name: str) -> Any:
        key = name[:-1] if name.endswith("_") and name[:-1] in ("validate", "schema") else name
        full = f"{self._path}.{key}" if self._path else key
        value = getattr(self._obj, _attr(key))
        if any(full == d or full.startswith(d + ".") for d in self._declared):
            return value
        if isinstance(value, BaseModel) and any(d.startswith(full + ".") for d in self._declared):
            return StageParams(value, self._declared, full)
        raise ParamsError(
            f"this stage reads params key '{full}' but does not declare it: add it to the stage's "
            f"PARAMS and to its params: in dvc.yaml"
        )

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("params are read-only")


def load_stage_params(declared: Sequence[str], path: str | os.PathLike[str] | None = None) -> StageParams:
    """Validate the whole params file, then give the stage a view of its declared keys only."""
    params = load_params(path)
    for key in declared:
        obj: Any = params
        for part in key.split("."):
            if not isinstance(obj, BaseModel) or _attr(part) not in type(obj).model_fields:
                raise ParamsError(f"declared params key '{key}' does not exist in {params_path(path)}")
            obj = getattr(obj, _attr(part))
    return StageParams(params, declared)
