"""Where the code is in a chat message: fenced blocks, inline code, stack traces, code lines.

pii-scrub runs the structured recognizers (email, phone, card, IP, IBAN, secrets...) over the
whole message, but names only over prose: spaCy's NER reads identifiers, class names and
trace frames as people, and a name inside code is a literal the model should learn as is.
"""

from __future__ import annotations

import re

# ``` or ~~~ fences (with an optional info string); an unclosed fence runs to the end.
_FENCE = re.compile(r"^[ \t]*(`{3,}|~{3,})[^\n]*\n.*?(?:^[ \t]*\1[ \t]*$|\Z)", re.MULTILINE | re.DOTALL)
_INLINE = re.compile(r"`[^`\n]+`")
# Lines that are code or a stack trace even without a fence.
_CODE_LINE = re.compile(
    r"^[ \t]*(?:"
    r"Traceback \(most recent call last\):|File \"[^\"]+\", line \d+|at [\w$.<>/\[\]-]+\(.*\)\s*$|"
    r"(?:[\w.]+\.)?\w*(?:Error|Exception|Warning)(?:\[\w+\])?:\s|npm ERR!|panic: |goroutine \d+ |-->\s|\d+\s+\|"
    r"|(?:def \w+\s*\(|class \w+\s*[(:{<]|(?:import|from) [\w.]+(?: import [\w., *]+| as \w+)?;?\s*$|"
    r"(?:const|let|var|val|auto) \w+\s*[:=]|function\s*\w*\s*\(|(?:public|private|protected|static|final)\s+[\w<>\[\],]+\s+\w+|"
    r"package [\w.]+;?\s*$|func [\w(]|fn \w+\s*[(<]|#include\s*[<\"]|using [\w.]+;|return\b.*;\s*$|"
    r"(?:SELECT|INSERT INTO|UPDATE|DELETE FROM|CREATE TABLE|ALTER TABLE|DROP TABLE|FROM|WHERE|JOIN|GROUP BY|ORDER BY|LIMIT)\s).*"
    r"|.*(?:[;{}]|\)\s*:|=>|->)\s*$"
    r"|[\w.\[\]\"']+\s*(?:[+\-*/]?=|==|!=)\s*\S.*"
    r")$",
    re.MULTILINE,
)


def merge_spans(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted (start, end) spans with overlapping or touching ones joined."""
    merged: list[tuple[int, int]] = []
    for s, e in sorted(spans):
        if merged and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(e, merged[-1][1]))
        else:
            merged.append((s, e))
    return merged


def code_spans(text: str) -> list[tuple[int, int]]:
    """Sorted, non-overlapping (start, end) spans of code in ``text``."""
    if not any(c in text for c in "`;{}()=:>|"):
        return []
    spans = [m.span() for m in _FENCE.finditer(text)]
    fenced = list(spans)

    def outside(s: int, e: int) -> bool:
        return not any(fs < e and s < fe for fs, fe in fenced)

    spans += [m.span() for m in _INLINE.finditer(text) if outside(*m.span())]
    spans += [m.span() for m in _CODE_LINE.finditer(text) if outside(*m.span())]
    return merge_spans(spans)


def prose_segments(text: str, code: list[tuple[int, int]]) -> list[tuple[int, str]]:
    """(offset, text) of the pieces of ``text`` outside ``code`` that hold a letter."""
    out, pos = [], 0
    for s, e in code + [(len(text), len(text))]:
        if s > pos and any(c.isalpha() for c in text[pos:s]):
            out.append((pos, text[pos:s]))
        pos = max(pos, e)
    return out
