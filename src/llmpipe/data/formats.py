"""Readers for raw instruction data: chat ``messages`` JSONL, Alpaca and ShareGPT.

Reading is split from validation: this module turns bytes on disk into candidate conversations
(``RawItem``: a parsed JSON object with its file and line) or ``ReadProblem`` entries naming the
file, line and what is wrong (invalid UTF-8, malformed JSON, a line over the size limit, a
truncated JSON array, an empty file...). ``normalise`` then maps each object of any supported
format onto the canonical ``[{role, content}, ...]`` list.

Supported layouts:
- ``*.jsonl``: one JSON object per line, any of the three formats (mixed is fine).
- ``*.json``: a JSON array of objects (typical for Alpaca exports), or JSON Lines.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

SUFFIXES = (".jsonl", ".json")
BOM = "\ufeff"  # UTF-8 byte order mark, tolerated at the start of any line

# ShareGPT / OpenAI role spellings seen in the wild, mapped onto the canonical three.
ROLE_ALIASES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "human": "user",
    "prompter": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "bard": "assistant",
    "bing": "assistant",
}


@dataclass
class RawItem:
    """One parsed JSON value from an input file, with where it came from."""

    file: str
    line: int
    obj: Any


@dataclass
class ReadProblem:
    """Something in an input file that is not a usable JSON object."""

    file: str
    line: int
    reason: str
    detail: str
    excerpt: str = ""


@dataclass
class Normalised:
    format: str
    messages: list[dict[str, str]]
    metadata: dict[str, Any] = field(default_factory=dict)
    # where each message came from in the input object, e.g. "conversations[3]" (for reports)
    where: list[str] = field(default_factory=list)


class FormatError(ValueError):
    """A JSON object that cannot be mapped to a conversation; ``reason`` is a short code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def discover(inputs: list[str]) -> list[Path]:
    """Expand files/directories from ``validate.inputs`` into a sorted, de-duplicated file list."""
    files: list[Path] = []
    for entry in inputs:
        p = Path(entry)
        if p.is_dir():
            files.extend(sorted(q for q in p.rglob("*") if q.is_file() and q.suffix in SUFFIXES))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"validate.inputs: '{entry}' does not exist")
    seen: set[Path] = set()
    unique = []
    for f in files:
        if f.resolve() not in seen:
            seen.add(f.resolve())
            unique.append(f)
    return unique


def _excerpt(text: str | bytes, limit: int = 200) -> str:
    if isinstance(text, bytes):
        text = text[:limit].decode("utf-8", errors="replace")
    return text[:limit]


def _read_lines(path: Path, max_line_bytes: int) -> Iterator[tuple[int, bytes | None, int]]:
    """Yield (line_no, line_bytes, length); bytes is None when the line is over the limit.

    An over-long line is skipped in chunks, never held in memory as a whole.
    """
    with open(path, "rb") as fh:
        line_no = 0
        while True:
            chunk = fh.readline(max_line_bytes + 1)
            if not chunk:
                return
            line_no += 1
            if len(chunk) > max_line_bytes and not chunk.endswith(b"\n"):
                length = len(chunk)
                while True:  # discard the rest of this line
                    rest = fh.readline(1 << 20)
                    length += len(rest)
                    if not rest or rest.endswith(b"\n"):
                        break
                yield line_no, None, length
            else:
                yield line_no, chunk, len(chunk)


def _iter_jsonl(path: Path, max_line_bytes: int) -> Iterator[RawItem | ReadProblem]:
    name = str(path)
    for line_no, chunk, length in _read_lines(path, max_line_bytes):
        if chunk is None:
            yield ReadProblem(
                name, line_no, "line_too_long",
                f"line is {length} bytes, over validate.max_line_bytes={max_line_bytes}",
            )
            continue
        try:
            text = chunk.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield ReadProblem(
                name, line_no, "invalid_utf8",
                f"not valid UTF-8 at byte {exc.start} of the line ({exc.reason})", _excerpt(chunk),
            )
            continue
        # A UTF-8 BOM may start any line, not only the file's first: `cat a.jsonl b.jsonl` of
        # files written with BOMs puts one in the middle.
        text = text.removeprefix(BOM)
        if not text.strip():
            continue  # blank lines are allowed between records
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            yield ReadProblem(
                name, line_no, "malformed_json", f"invalid JSON at column {exc.colno}: {exc.msg}",
                _excerpt(text),
            )
            continue
        yield RawItem(name, line_no, obj)


def _iter_json_array(path: Path, text: str) -> Iterator[RawItem | ReadProblem]:
    """Decode a JSON array element by element so a truncated file keeps its complete records."""
    name = str(path)
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    n = len(text)

    def skip_ws(i: int) -> int:
        while i < n and text[i] in " \t\r\n\ufeff":  # a BOM may start a line
            i += 1
        return i

    counted = [0, 1]  # newlines are counted up to position counted[0], which is on line counted[1]

    def line_of(i: int) -> int:
        """Line number of position ``i``; counts only from the last position asked (positions
        only grow), so a big array file is scanned once, not once per element."""
        if i < counted[0]:
            return text.count("\n", 0, i) + 1
        counted[1] += text.count("\n", counted[0], i)
        counted[0] = i
        return counted[1]

    pos = skip_ws(pos)
    if pos < n and text[pos] == "]":
        return
    while True:
        pos = skip_ws(pos)
        if pos >= n:
            yield ReadProblem(name, line_of(pos), "truncated_json_array",
                              "file ends inside the JSON array (missing ']'): truncated file?")
            return
        start_line = line_of(pos)
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            # A well-formed array file ends with ']'; if it does not, the failure is truncation.
            truncated = not text.rstrip().endswith("]")
            reason = "truncated_json_array" if truncated else "malformed_json"
            detail = (
                "file ends in the middle of an array element: truncated file?"
                if truncated
                else f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
            )
            yield ReadProblem(name, exc.lineno if not truncated else start_line, reason, detail,
                              _excerpt(text[pos:pos + 200]))
            return  # the rest of the array cannot be located reliably
        yield RawItem(name, start_line, obj)
        pos = skip_ws(end)
        if pos >= n:
            yield ReadProblem(name, line_of(pos), "truncated_json_array",
                              "file ends inside the JSON array (missing ']'): truncated file?")
            return
        if text[pos] == ",":
            pos += 1
            continue
        if text[pos] == "]":
            trailing = text[pos + 1:].strip()
            if trailing:
                yield ReadProblem(name, line_of(pos + 1), "malformed_json",
                                  "unexpected data after the end of the JSON array",
                                  _excerpt(trailing))
            return
        yield ReadProblem(name, line_of(pos), "malformed_json",
                          f"expected ',' or ']' between array elements, found {text[pos]!r}",
                          _excerpt(text[pos:pos + 200]))
        return


def iter_file(path: str | os.PathLike[str], max_line_bytes: int) -> Iterator[RawItem | ReadProblem]:
    """Yield every JSON object (or problem) in one input file, in file order."""
    path = Path(path)
    name = str(path)
    size = path.stat().st_size
    if size == 0:
        yield ReadProblem(name, 0, "empty_file", "file is empty")
        return
    if path.suffix == ".json":
        with open(path, "rb") as fh:
            head = fh.read(4096).lstrip().removeprefix(BOM.encode("utf-8")).lstrip()
        if head.startswith(b"["):
            raw = path.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                line = raw.count(b"\n", 0, exc.start) + 1
                yield ReadProblem(name, line, "invalid_utf8",
                                  f"not valid UTF-8 at byte {exc.start} of the file ({exc.reason})")
                return
            yield from _iter_json_array(path, text)
            return
    got_any = False
    for item in _iter_jsonl(path, max_line_bytes):
        got_any = True
        yield item
    if not got_any:
        yield ReadProblem(name, 0, "empty_file", "file holds only whitespace")


def _text_content(content: Any, where: str) -> str:
    """OpenAI content is a string or a list of parts; only text parts are supported."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                raise FormatError("non_text_content", f"{where}: only text content parts are supported")
        return "".join(texts)
    raise FormatError("wrong_type", f"{where}: content must be a string, got {type(content).__name__}")


def _role(raw: Any, where: str) -> str:
    if not isinstance(raw, str):
        raise FormatError("wrong_type", f"{where}: role must be a string, got {type(raw).__name__}")
    role = ROLE_ALIASES.get(raw.strip().lower())
    if role is None:
        raise FormatError("unknown_role", f"{where}: unknown role {raw!r}")
    return role


def _metadata(obj: dict[str, Any]) -> dict[str, Any]:
    meta = obj.get("metadata")
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise FormatError("wrong_type", f"metadata must be an object, got {type(meta).__name__}")
    return meta


def detect_format(obj: Any) -> str:
    if not isinstance(obj, dict):
        raise FormatError("not_an_object", f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        return "messages"
    if "conversations" in obj:
        return "sharegpt"
    if "instruction" in obj and "output" in obj:
        return "alpaca"
    keys = ", ".join(sorted(map(str, obj))[:8]) or "none"
    raise FormatError(
        "unknown_format",
        f"not a chat 'messages', ShareGPT 'conversations' or Alpaca 'instruction'/'output' "
        f"record (keys: {keys})",
    )


def normalise(obj: Any) -> Normalised:
    """Map one JSON object of any supported format onto canonical messages."""
    fmt = detect_format(obj)
    if fmt == "messages":
        msgs = obj["messages"]
        if not isinstance(msgs, list):
            raise FormatError("wrong_type", f"messages must be a list, got {type(msgs).__name__}")
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict):
                raise FormatError("wrong_type", f"messages[{i}] must be an object")
            out.append({"role": _role(m.get("role"), f"messages[{i}]"),
                        "content": _text_content(m.get("content"), f"messages[{i}]")})
        return Normalised(fmt, out, _metadata(obj), [f"messages[{i}]" for i in range(len(out))])
    if fmt == "sharegpt":
        convs = obj["conversations"]
        if not isinstance(convs, list):
            raise FormatError("wrong_type", f"conversations must be a list, got {type(convs).__name__}")
        out = []
        for i, m in enumerate(convs):
            if not isinstance(m, dict):
                raise FormatError("wrong_type", f"conversations[{i}] must be an object")
            out.append({"role": _role(m.get("from"), f"conversations[{i}]"),
                        "content": _text_content(m.get("value"), f"conversations[{i}]")})
        where = [f"conversations[{i}]" for i in range(len(out))]
        if isinstance(obj.get("system"), str) and obj["system"].strip() and not (
            out and out[0]["role"] == "system"
        ):
            out.insert(0, {"role": "system", "content": obj["system"]})
            where.insert(0, "system")
        return Normalised(fmt, out, _metadata(obj), where)
    # alpaca
    for key in ("instruction", "input", "output", "system"):
        if key in obj and obj[key] is not None and not isinstance(obj[key], str):
            raise FormatError("wrong_type", f"{key} must be a string, got {type(obj[key]).__name__}")
    instruction = obj.get("instruction") or ""
    extra = obj.get("input") or ""
    user = f"{instruction}\n\n{extra}" if instruction.strip() and extra.strip() else instruction + extra
    out = []
    where = []
    if (obj.get("system") or "").strip():
        out.append({"role": "system", "content": obj["system"]})
        where.append("system")
    out += [{"role": "user", "content": user}, {"role": "assistant", "content": obj.get("output") or ""}]
    where += ["instruction+input", "output"]
    return Normalised(fmt, out, _metadata(obj), where)
