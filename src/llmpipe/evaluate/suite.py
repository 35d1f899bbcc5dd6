"""Compose generation + scorers into the evaluation of one system on the held-out test set."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from llmpipe.evaluate import generation, harness, judge, safety, scorers
from llmpipe.config.evaluate import EvalSection
from llmpipe.evaluate.fewshot import fewshot_prompt
from llmpipe.evaluate.records import prompt_messages, reference_reply
from llmpipe.io import sha256_file


def task_eval(
    lm: generation.LoadedModel,
    records: Sequence[dict[str, Any]],
    *,
    system: str,
    fields: Sequence[str],
    validator: Any,
    max_new_tokens: int,
    batch_size: int,
    examples: Sequence[dict[str, Any]] = (),
    require_key_order: bool = True,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Generate a reply to every test record and score it.

    ``examples`` (few-shot) are inserted as earlier turns; empty = zero-shot. Returns the
    aggregate metrics and one row per record (prompt, reference, output and its scores).
    """
    prompts = [fewshot_prompt(r, examples) if examples else prompt_messages(r) for r in records]
    outputs = generation.generate(lm, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, label=system)
    rows = []
    for rec, out in zip(records, outputs):
        ref = reference_reply(rec)
        s = scorers.score_example(out, ref, fields, validator, require_key_order)
        user = [m["content"] for m in rec["messages"][:-1] if m["role"] == "user"]
        rows.append(
            {
                "system": system,
                "id": rec["id"],
                "metadata": rec.get("metadata", {}),
                "user": user[-1] if user else "",
                "reference": ref,
                "output": out,
                **s,
            }
        )
    metrics = scorers.aggregate(rows, fields)
    return metrics, rows


def model_fingerprint(model_dir: str | Path) -> dict[str, str]:
    """sha256 of every weight file in an HF model dir (reproducibility: which model was scored)."""
    d = Path(model_dir)
    files = sorted(p for p in d.glob("*.safetensors"))
    return {p.name: sha256_file(p) for p in files}


def evaluate_model(
    model_dir: str | Path,
    cfg: EvalSection,
    test: Sequence[dict[str, Any]],
    *,
    systems: Mapping[str, Sequence[dict[str, Any]]],
    progress: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
) -> dict[str, Any]:
    """Everything eval measures for one model directory.

    ``systems`` maps a system name to its few-shot examples (empty = zero-shot); each is run on
    the test records. Then the safety set and the lm-eval tasks run on the same model. Returns
    {"task": {system: metrics}, "rows": [...], "safety": metrics, "safety_rows": [...],
    "lm_eval": scores, "lm_eval_samples": [...], "timings": {...}}; "timings" holds wall-clock
    seconds, which are not results (the stages write them to timings/, never to metrics).
    """
    import gc

    import torch

    seed = cfg.seed
    torch.manual_seed(seed)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    validator = scorers.load_schema(cfg.schema_)
    timing: dict[str, float] = {}
    out: dict[str, Any] = {"task": {}, "rows": []}
    t = time.monotonic()
    lm = generation.load_model(model_dir, device=cfg.device)
    timing["load"] = round(time.monotonic() - t, 1)
    progress(f"loaded {model_dir} on {lm.device} in {timing['load']}s")
    for name, examples in systems.items():
        t = time.monotonic()
        metrics, rows = task_eval(
            lm, test, system=name, fields=cfg.fields, validator=validator,
            max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, examples=examples,
            require_key_order=cfg.require_key_order,
        )
        if examples:
            metrics["fewshot_k"] = len(examples)
        out["task"][name] = metrics
        out["rows"].extend(rows)
        timing[f"task_{name}"] = round(time.monotonic() - t, 1)
        progress(f"{name}: task_accuracy={metrics['task_accuracy']:.3f} exact_match={metrics['exact_match']:.3f} "
                 f"format_compliance={metrics['format_compliance']:.3f} ({timing[f'task_{name}']}s)")
    t = time.monotonic()
    requests = safety.load_requests(cfg.safety.data)
    replies = generation.generate(
        lm, safety.prompts(requests, cfg.safety.system_prompt),
        max_new_tokens=cfg.safety.max_new_tokens, batch_size=cfg.batch_size, label="safety",
    )
    out["safety"], out["safety_rows"] = safety.score(requests, replies, validator)
    timing["safety"] = round(time.monotonic() - t, 1)
    progress(f"safety: refusal_rate={out['safety']['refusal_rate']:.3f} ({timing['safety']}s)")
    device = lm.device
    del lm
    gc.collect()
    t = time.monotonic()
    out["lm_eval"], out["lm_eval_samples"] = harness.run(
        model_dir, cfg.lm_eval.task_dir, dict(cfg.lm_eval.tasks),
        batch_size=cfg.lm_eval.batch_size, limit=cfg.lm_eval.limit, device=device,
        dtype="bfloat16" if device == "cuda" else "float32",
        apply_chat_template=cfg.lm_eval.apply_chat_template, seed=seed,
    )
    timing["lm_eval"] = round(time.monotonic() - t, 1)
    progress("lm-eval: " + ", ".join(f"{k}={v['score']:.3f}" for k, v in out["lm_eval"].items())
             + f" ({timing['lm_eval']}s)")
    out["timings"] = timing
    return out


def run_judge(cfg: EvalSection, rows: Sequence[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Judge each system's outputs (first ``eval.judge.limit`` rows per system)."""
    j = judge.from_config(cfg.judge, seed=cfg.seed)
    metrics: dict[str, Any] = {}
    verdicts: list[dict[str, Any]] = []
    try:
        for name in dict.fromkeys(r["system"] for r in rows):
            sys_rows = [r for r in rows if r["system"] == name]
            m, v = judge.judge_outputs(j, sys_rows, limit=cfg.judge.limit)
            metrics[name] = m
            verdicts.extend({"system": name, **x} for x in v)
    finally:
        j.close()
    return metrics, verdicts
