"""Typed view of the ``eval:`` params section (clear errors for missing / wrong keys)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from llmpipe.params import ParamsError


def _get(d: Mapping[str, Any], key: str, typ: type | tuple[type, ...], where: str, default: Any = ...) -> Any:
    if key not in d or d[key] is None and default is not ... and default is None:
        if default is ...:
            raise ParamsError(f"params.yaml: {where}.{key} is missing")
        return default
    v = d[key]
    if isinstance(v, bool) and bool not in (typ if isinstance(typ, tuple) else (typ,)):
        raise ParamsError(f"params.yaml: {where}.{key} must be {typ}, got {v!r}")
    if not isinstance(v, typ):
        raise ParamsError(f"params.yaml: {where}.{key} must be {typ}, got {v!r}")
    return v


@dataclass
class EvalConfig:
    schema: str
    fields: list[str]
    require_key_order: bool = True
    limit: int | None = None
    max_new_tokens: int = 48
    batch_size: int = 16
    device: str = "auto"
    num_threads: int | None = None
    seed: int = 1234
    fewshot_k: int = 4
    fewshot_seed: int = 1234
    fewshot_stratify_key: str | None = "intent"
    lm_eval_task_dir: str = "data/eval/lm_eval"
    lm_eval_tasks: dict[str, str] = field(default_factory=dict)
    lm_eval_batch_size: int = 16
    lm_eval_limit: int | None = None
    lm_eval_chat_template: bool = False
    safety_data: str = "data/eval/safety/harmful_requests.jsonl"
    safety_system_prompt: str | None = None
    safety_max_new_tokens: int = 64
    judge: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_params(cls, ev: Mapping[str, Any]) -> "EvalConfig":
        fs = ev.get("fewshot") or {}
        le = ev.get("lm_eval") or {}
        sf = ev.get("safety") or {}
        fields = _get(ev, "fields", list, "eval")
        if not fields or not all(isinstance(f, str) for f in fields):
            raise ParamsError("params.yaml: eval.fields must be a non-empty list of key names")
        tasks = _get(le, "tasks", dict, "eval.lm_eval")
        if not tasks:
            raise ParamsError("params.yaml: eval.lm_eval.tasks must name at least one task")
        cfg = cls(
            schema=_get(ev, "schema", str, "eval"),
            fields=list(fields),
            require_key_order=_get(ev, "require_key_order", bool, "eval", True),
            limit=_get(ev, "limit", int, "eval", None),
            max_new_tokens=_get(ev, "max_new_tokens", int, "eval"),
            batch_size=_get(ev, "batch_size", int, "eval"),
            device=_get(ev, "device", str, "eval", "auto"),
            num_threads=_get(ev, "num_threads", int, "eval", None),
            seed=_get(ev, "seed", int, "eval", 1234),
            fewshot_k=_get(fs, "k", int, "eval.fewshot"),
            fewshot_seed=_get(fs, "seed", int, "eval.fewshot", 1234),
            fewshot_stratify_key=_get(fs, "stratify_key", str, "eval.fewshot", None),
            lm_eval_task_dir=_get(le, "task_dir", str, "eval.lm_eval"),
            lm_eval_tasks={str(k): str(v) for k, v in tasks.items()},
            lm_eval_batch_size=_get(le, "batch_size", int, "eval.lm_eval", 16),
            lm_eval_limit=_get(le, "limit", int, "eval.lm_eval", None),
            lm_eval_chat_template=_get(le, "apply_chat_template", bool, "eval.lm_eval", False),
            safety_data=_get(sf, "data", str, "eval.safety"),
            safety_system_prompt=_get(sf, "system_prompt", str, "eval.safety", None),
            safety_max_new_tokens=_get(sf, "max_new_tokens", int, "eval.safety", 64),
            judge=dict(ev.get("judge") or {}),
        )
        for name in ("max_new_tokens", "batch_size", "lm_eval_batch_size", "safety_max_new_tokens"):
            if getattr(cfg, name) < 1:
                raise ParamsError(f"params.yaml: eval {name} must be >= 1")
        return cfg

    @property
    def judge_enabled(self) -> bool:
        return bool(self.judge.get("enabled", False))
