"""Repair a conversation before it is judged: the ``validate.repair`` policy.

Real chat dumps break the canonical shape (optional system prompt, then user/assistant turns
alternating, starting with the user and ending with the assistant) in a few predictable ways.
Public ShareGPT dumps split long chats into chunks, so most chunks start with a ``gpt`` turn;
exports hold empty turns and runs of turns by the same speaker. FastChat's and axolotl's
loaders repair such conversations rather than drop them; so does this module, one switch per
repair, applied in this order:

1. ``drop_empty_turns``: drop every empty or whitespace-only turn except the last one (an empty
   final reply is rejected: there is nothing to train on).
2. ``drop_leading_non_user``: drop the assistant turns before the first user turn (after the
   system prompt, if any).
3. ``same_role_turns``: a run of consecutive turns with the same role is merged into one turn
   (``merge``: contents joined with ``merge_separator``), reduced to its last turn (``drop``:
   the one the next turn answers) or left alone (``reject``: the record is rejected with
   ``bad_alternation``).
4. ``drop_trailing_user``: drop a final user turn that got no reply.

Each applied repair is a ``Repair``: its kind, the role, where the turns were in the input
record (e.g. ``conversations[0]``) and how many turns it removed (a merge of a run of three
removes two). What is left is then validated as usual; a record that is still not a valid
conversation is rejected with the usual reason code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llmpipe.config.data import RepairSection

REPAIR_KINDS = (
    "drop_empty_turn",
    "drop_leading_non_user",
    "merge_same_role",
    "drop_same_role",
    "drop_trailing_user",
)
EXCERPT_CHARS = 80


@dataclass(frozen=True)
class Repair:
    kind: str
    role: str
    turns: tuple[str, ...]  # where the affected turns are in the input record
    removed: int  # turns this repair removed from the conversation
    excerpt: str = ""  # start of a dropped turn's text (empty for merges)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "role": self.role, "turns": list(self.turns),
                               "removed": self.removed}
        if self.excerpt:
            out["excerpt"] = self.excerpt
        return out


@dataclass
class _Turn:
    role: str
    content: str
    where: tuple[str, ...]


def _excerpt(turns: list[_Turn]) -> str:
    text = " | ".join(t.content.strip() for t in turns if t.content.strip())
    return text[:EXCERPT_CHARS]


def repair_messages(
    messages: list[dict[str, str]], where: list[str], policy: RepairSection
) -> tuple[list[dict[str, str]], list[Repair]]:
    """Apply ``policy`` to ``messages`` (``where[i]`` names message i in the input record).

    Returns the repaired messages and the repairs made, in the order they were made.
    """
    turns = [_Turn(m["role"], m["content"], (w,)) for m, w in zip(messages, where, strict=True)]
    repairs: list[Repair] = []

    if policy.drop_empty_turns:
        kept = []
        for i, t in enumerate(turns):
            if i < len(turns) - 1 and not t.content.strip():
                repairs.append(Repair("drop_empty_turn", t.role, t.where, 1))
            else:
                kept.append(t)
        turns = kept

    if policy.drop_leading_non_user:
        start = 1 if turns and turns[0].role == "system" else 0
        end = start
        while end < len(turns) and turns[end].role == "assistant":
            end += 1
        if end > start:
            dropped = turns[start:end]
            repairs.append(Repair("drop_leading_non_user", "assistant",
                                  tuple(w for t in dropped for w in t.where), len(dropped),
                                  _excerpt(dropped)))
            turns = turns[:start] + turns[end:]

    if policy.same_role_turns != "reject":
        kept = []
        i = 0
        while i < len(turns):
            j = i
            while j + 1 < len(turns) and turns[j + 1].role == turns[i].role:
                j += 1
            run = turns[i : j + 1]
            if len(run) == 1:
                kept.append(run[0])
            elif policy.same_role_turns == "merge":
                where_all = tuple(w for t in run for w in t.where)
                repairs.append(Repair("merge_same_role", run[0].role, where_all, len(run) - 1))
                content = policy.merge_separator.join(t.content for t in run)
                kept.append(_Turn(run[0].role, content, where_all))
            else:  # drop: keep the last turn of the run
                dropped = run[:-1]
                repairs.append(Repair("drop_same_role", run[0].role,
                                      tuple(w for t in dropped for w in t.where), len(dropped),
                                      _excerpt(dropped)))
                kept.append(run[-1])
            i = j + 1
        turns = kept

    # only when a reply is left before it (else the record is rejected as it stands)
    if policy.drop_trailing_user and turns and turns[-1].role == "user" and any(
        t.role == "assistant" for t in turns[:-1]
    ):
        last = turns.pop()
        repairs.append(Repair("drop_trailing_user", "user", last.where, 1, _excerpt([last])))

    return [{"role": t.role, "content": t.content} for t in turns], repairs
