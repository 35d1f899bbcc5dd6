"""The prompted few-shot baseline: k solved training examples placed in the prompt.

Fine-tuning must beat prompting (the guides' rule), so the base model also gets a fair chance
with in-context examples. Examples are chosen deterministically (seeded), cycling through the
strata of ``metadata[stratify_key]`` (records without the key, such as the safety examples, are
not task demonstrations and are skipped) so the k examples cover as many labels as possible, and are
rendered as earlier user/assistant turns of the same conversation.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Any, Sequence

from llmpipe.evaluate.records import Messages, prompt_messages, reference_reply


def select_examples(
    train: Sequence[dict[str, Any]], k: int, seed: int, stratify_key: str | None = "intent"
) -> list[dict[str, Any]]:
    """Pick ``k`` training records, round-robin over strata, deterministic for a given seed."""
    if k < 0:
        raise ValueError(f"eval.fewshot.k must be >= 0, got {k}")
    if k == 0:
        return []
    strata: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for rec in sorted(train, key=lambda r: r["id"]):
        meta = rec.get("metadata") or {}
        if stratify_key and stratify_key not in meta:
            continue      # not a task example (e.g. the safety records pinned to train)
        label = str(meta[stratify_key]) if stratify_key else ""
        strata[label].append(rec)
    n = sum(len(v) for v in strata.values())
    if n < k:
        which = f" with metadata.{stratify_key}" if stratify_key else ""
        raise ValueError(f"few-shot needs k={k} training examples{which}, the train split has {n}")
    rng = random.Random(seed)
    pools = []
    for label in sorted(strata):
        pool = strata[label][:]
        rng.shuffle(pool)
        pools.append(pool)
    rng.shuffle(pools)
    chosen: list[dict[str, Any]] = []
    while len(chosen) < k:
        for pool in pools:
            if pool and len(chosen) < k:
                chosen.append(pool.pop())
    return chosen


def fewshot_prompt(record: dict[str, Any], examples: Sequence[dict[str, Any]]) -> Messages:
    """The record's prompt with the examples inserted as earlier turns after the system message."""
    msgs = prompt_messages(record)
    system = [m for m in msgs[:1] if m["role"] == "system"]
    rest = msgs[len(system) :]
    shots: Messages = []
    for ex in examples:
        ex_msgs = [m for m in prompt_messages(ex) if m["role"] != "system"]
        shots.extend(ex_msgs)
        shots.append({"role": "assistant", "content": reference_reply(ex)})
    return system + shots + rest
