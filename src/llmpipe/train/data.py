"""Turn canonical chat records into token ids + labels with an assistant-only loss mask.

The model's own chat template renders each conversation. A token is trained on (label = its id)
only if it lies inside an assistant turn: the reply text *and* the end-of-turn token that closes
it (``<|im_end|>`` for SmolLM2), so the tuned model learns to stop. System and user turns, the
role headers and anything after the end-of-turn token (the template's trailing newline) get
label -100.

Spans are found on characters, not tokens: we render the conversation up to each assistant turn
(with the generation prompt) and up to the end of that turn, and map the character range to
tokens through the fast tokenizer's offset mapping. That is robust to BPE merges at the
boundaries. Examples longer than ``max_seq_len`` are not truncated (that would cut the reply and
its end-of-turn token); they are counted and skipped, with their ids, in :class:`Tokenized`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from llmpipe.data.records import iter_json_objects

IGNORE_INDEX = -100


class DataError(ValueError):
    """A training record cannot be used (names file, line and problem)."""


@dataclass
class Tokenized:
    input_ids: list[list[int]] = field(default_factory=list)
    labels: list[list[int]] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)  # {"id", "reason", "tokens"}

    @property
    def num_tokens(self) -> int:
        return sum(len(x) for x in self.input_ids)

    @property
    def num_target_tokens(self) -> int:
        return sum(sum(1 for t in lab if t != IGNORE_INDEX) for lab in self.labels)

    def to_dataset(self):
        from datasets import Dataset

        return Dataset.from_dict({"input_ids": self.input_ids, "labels": self.labels})


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """Read a split JSONL file; a broken line raises :class:`DataError` naming file and line."""
    path = Path(path)
    out = []
    for lineno, rec in iter_json_objects(path, DataError, missing_hint=" (training data; run the split stage first)"):
        msgs = rec.get("messages")
        if not isinstance(msgs, list) or not msgs or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in msgs
        ):
            raise DataError(f"{path}:{lineno}: record has no valid 'messages' list")
        if msgs[-1]["role"] != "assistant":
            raise DataError(f"{path}:{lineno}: last message must be from the assistant")
        rec.setdefault("id", f"{path.name}:{lineno}")
        out.append(rec)
    if not out:
        raise DataError(f"{path}: no records")
    return out


def _render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def assistant_char_spans(tokenizer, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """Render ``messages``; return the text and the char spans of every assistant turn.

    A span starts after the assistant header (generation prompt) and ends after the turn's
    end-of-turn token; the template's trailing text after it (e.g. a newline) is excluded.
    """
    eot = tokenizer.eos_token
    full = _render(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        upto = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not full.startswith(upto) or not upto.startswith(prefix):
            raise DataError("chat template is not prefix-consistent; cannot locate assistant turns")
        start, end = len(prefix), len(upto)
        k = upto.rfind(eot, start, end) if eot else -1
        if k < 0:
            raise DataError(f"chat template does not close the assistant turn with {eot!r}")
        spans.append((start, k + len(eot)))
    return full, spans


def tokenize_example(tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 outside assistant turns) for one conversation."""
    text, spans = assistant_char_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [IGNORE_INDEX] * len(ids)
    for j, (s, e) in enumerate(enc["offset_mapping"]):
        if e <= s:
            continue
        for a, b in spans:
            if s >= a and e <= b:
                labels[j] = ids[j]
                break
    return ids, labels


def tokenize_records(
    tokenizer, records: Iterable[dict[str, Any]], max_seq_len: int
) -> Tokenized:
    """Tokenise records; too-long or target-free ones are skipped and reported."""
    out = Tokenized()
    eos_id = tokenizer.eos_token_id
    for rec in records:
        ids, labels = tokenize_example(tokenizer, rec["messages"])
        rid = str(rec.get("id"))
        if len(ids) > max_seq_len:
            out.skipped.append({"id": rid, "reason": f"longer than model.max_seq_len ({len(ids)} > {max_seq_len})",
                                "tokens": len(ids), "source": rec.get("source")})
            continue
        if eos_id not in [t for t in labels if t != IGNORE_INDEX]:
            out.skipped.append({"id": rid, "reason": "no trainable assistant tokens", "tokens": len(ids),
                                "source": rec.get("source")})
            continue
        out.input_ids.append(ids)
        out.labels.append(labels)
        out.ids.append(rid)
    return out


def decode_targets(tokenizer, input_ids: list[int], labels: list[int]) -> str:
    """The text the loss is computed on (for tests and debugging)."""
    return tokenizer.decode([t for t, lab in zip(input_ids, labels) if lab != IGNORE_INDEX],
                            skip_special_tokens=False)
