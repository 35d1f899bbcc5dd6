"""Small, dependency-free I/O helpers shared by every stage.

Every output is written to a temporary sibling first and renamed into place, so a stage that
crashes never leaves a half-written file behind (DESIGN.md: "write to temp, then rename").
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator


def _tmp_sibling(path: Path, suffix: str = "") -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    return Path(name)


def _replace(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` onto ``path``. A directory on either side cannot be renamed over the other
    in one step: the old ``path`` is first moved aside (into a fresh sibling dir) and removed."""
    if path.exists() and (path.is_dir() or tmp.is_dir()):
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
        os.replace(path, old / path.name)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success (a directory
    at ``path``, e.g. a sharded output of an earlier run, is replaced as a whole).

    On an exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        yield tmp
        _replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it replaces ``path`` as a whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        _replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as pretty, key-sorted JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def read_json(path: str | os.PathLike[str]) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_jsonl(path: str | os.PathLike[str], rows: Iterable[dict[str, Any]]) -> int:
    """Write ``rows`` as JSON Lines (key-sorted, UTF-8 kept), atomically. Returns the number of
    rows written."""
    return write_jsonl_lines(path, map(jsonl_line, rows))


def read_jsonl(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Read a JSON Lines file written by this pipeline (trusted input: errors propagate)."""
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


TIMINGS_DIR = "timings"


def write_timings(stage: str, timings: dict[str, Any], root: str | os.PathLike[str] = ".") -> Path:
    """Write a stage's wall-clock numbers to ``timings/<stage>.json``.

    Timings are not results: they differ on every run, so they stay out of metrics/ (which
    reviewers diff) and out of every DVC-tracked output (so a moved timing never changes
    dvc.lock or re-runs a downstream stage). The folder is git-ignored; benchmarks and the
    README quote them.
    """
    path = Path(root) / TIMINGS_DIR / f"{stage}.json"
    write_json(path, timings)
    return path


# --------------------------------------------------------------------------- sharded records

SHARD_FILE = "part-{:05d}.jsonl"  # llmpipe.data.records.SHARD_NAME reads them back


_JSONL = json.JSONEncoder(ensure_ascii=False, sort_keys=True)  # json.dumps(row, ...) with these, built once


def jsonl_line(row: dict[str, Any]) -> str:
    """One JSON Lines row exactly as :func:`write_jsonl` writes it (newline included)."""
    return _JSONL.encode(row) + "\n"


def shard_sizes(total: int, shards: int) -> list[int]:
    """Rows per shard: shard k holds rows ``[k*total//shards, (k+1)*total//shards)``, a
    contiguous run of the input order (sizes differ by at most one; shards may be empty)."""
    return [(k + 1) * total // shards - k * total // shards for k in range(shards)]


def write_jsonl_lines(path: str | os.PathLike[str], lines: Iterable[str], shards: int = 1,
                      total: int | None = None) -> int:
    """Write serialised JSONL lines (each ending in a newline), atomically, to one file
    (``shards`` == 1) or to a directory at ``path`` of ``shards`` files ``part-00000.jsonl``...
    (``shards`` > 1, ``total`` lines in all, split by :func:`shard_sizes`), so that the shards
    concatenated in name order are the single file's bytes. A file or directory already at
    ``path`` is replaced as a whole. Returns the number of lines written."""
    path = Path(path)
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    if shards == 1:
        n = 0
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
            for line in lines:
                fh.write(line)
                n += 1
        return n
    if total is None:
        raise ValueError("a sharded write needs the total number of lines")
    sizes = shard_sizes(total, shards)
    it = iter(lines)
    n = 0
    with atomic_dir(path) as tmp:
        for k, size in enumerate(sizes):
            with open(tmp / SHARD_FILE.format(k), "w", encoding="utf-8") as fh:
                for _ in range(size):
                    line = next(it, None)
                    if line is None:
                        raise ValueError(f"{path}: {n} lines given, {total} announced")
                    fh.write(line)
                    n += 1
        if next(it, None) is not None:
            raise ValueError(f"{path}: more than the {total} lines announced")
    return n


def write_records(path: str | os.PathLike[str], rows: Iterable[dict[str, Any]], shards: int = 1,
                  total: int | None = None) -> int:
    """Write records like :func:`write_jsonl` (``shards`` == 1: the same bytes), or as a
    directory of ``shards`` JSONL shards (see :func:`write_jsonl_lines`); ``total`` defaults to
    ``len(rows)``."""
    if shards > 1 and total is None:
        total = len(rows)  # type: ignore[arg-type]
    return write_jsonl_lines(path, (jsonl_line(r) for r in rows), shards, total)
