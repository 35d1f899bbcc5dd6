"""minhash-dedup's cluster report, made one cluster at a time.

The report has one line per cluster with at least one removed record, in the order of the kept
records' input positions: ``{"kept": {"id", "source"}, "removed": [{"id", "source", "kind",
"jaccard", "reason"}], "size"}``, members in input order. A removed record is ``exact`` when its
normalised content equals the kept record's; copies of a removed near duplicate are ``near``
too.

:class:`ClusterReport` holds only numbers per removed record (kept position, position, kind,
Jaccard, the removed record it copies: 28 bytes) and builds each cluster's dicts when it is
read, so writing the report never holds it whole. Ids and sources come from a ``lookup``: the
records themselves (``dedup_records``), or :class:`SourceSpool`, which pass 1 of ``dedup_file``
(on Ray: its signing tasks) fills with the id and source of every record, in a temporary file.
"""

from __future__ import annotations

import json
import mmap
import tempfile
from array import array
from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping

import numpy as np

Lookup = Callable[[int], tuple[Any, Any]]  # input position -> (id, source)

_NEAR, _EXACT = 0, 1


class ClusterReport(Sequence):
    """The clusters of ``near_of`` (removed record -> (kept record, Jaccard)) and
    ``exact_copies`` (exact representative -> its later identical records), by input position;
    ``lookup`` gives a position's (id, source). Compares equal to the list of its clusters."""

    def __init__(self, near_of: Mapping[int, tuple[int, float]], exact_copies: Mapping[int, list[int]],
                 threshold: float, lookup: Lookup):
        kept, index, jac, via = array("q"), array("q"), array("d"), array("q")  # 8 bytes an item
        for rep, (k, j) in near_of.items():
            copies = exact_copies.get(rep, ())
            kept.extend([k] * (1 + len(copies)))
            index.append(rep)
            index.extend(copies)
            jac.extend([j] * (1 + len(copies)))
            via.append(-1)
            via.extend([rep] * len(copies))
        n_near = len(kept)
        for rep, copies in exact_copies.items():
            if rep not in near_of:
                kept.extend([rep] * len(copies))
                index.extend(copies)
        kind = np.zeros(len(kept), np.int8)
        kind[n_near:] = _EXACT
        kept_a, index_a = np.frombuffer(kept, np.int64), np.frombuffer(index, np.int64)
        order = np.lexsort((index_a, kept_a))
        self.kept, self.index, self.kind = kept_a[order], index_a[order], kind[order]
        self.jac = np.r_[np.frombuffer(jac, np.float64), np.ones(len(kept) - n_near)][order]
        self.via = np.r_[np.frombuffer(via, np.int64), np.full(len(kept) - n_near, -1, np.int64)][order]
        del kept, index, jac, via, kept_a, index_a, order
        new = np.r_[True, self.kept[1:] != self.kept[:-1]] if len(self.kept) else np.zeros(0, bool)
        self.starts = np.r_[np.flatnonzero(new), len(self.kept)]
        self.threshold, self.lookup = threshold, lookup

    @property
    def exact_removed(self) -> int:
        return int(np.count_nonzero(self.kind == _EXACT))

    @property
    def near_removed(self) -> int:
        return int(np.count_nonzero(self.kind == _NEAR))

    def __len__(self) -> int:
        return len(self.starts) - 1

    def __getitem__(self, c):  # type: ignore[override]
        if isinstance(c, slice):
            return [self[k] for k in range(*c.indices(len(self)))]
        if c < 0:
            c += len(self)
        if not 0 <= c < len(self):
            raise IndexError(c)
        s, e = int(self.starts[c]), int(self.starts[c + 1])
        kept_id, kept_source = self.lookup(int(self.kept[s]))
        members = []
        for m in range(s, e):
            rid, source = self.lookup(int(self.index[m]))
            if self.kind[m] == _EXACT:
                jac, reason = 1.0, f"exact duplicate (after normalisation) of kept record {kept_id}"
            else:
                jac = float(self.jac[m])
                reason = f"near duplicate (Jaccard {jac:.3f} >= {self.threshold}) of kept record {kept_id}"
                if self.via[m] >= 0:
                    reason += f"; exact copy of removed record {self.lookup(int(self.via[m]))[0]}"
            members.append({"id": rid, "source": source, "kind": "exact" if self.kind[m] == _EXACT else "near",
                            "jaccard": jac, "reason": reason})
        return {"kept": {"id": kept_id, "source": kept_source}, "removed": members, "size": 1 + len(members)}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for c in range(len(self)):
            yield self[c]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (list, ClusterReport)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]


def source_line(record: Mapping[str, Any]) -> bytes:
    """A record's (id, source) as :class:`SourceSpool` stores it: a JSON array, ``\\u``-escaped
    (an exact round trip)."""
    return json.dumps([record.get("id"), record.get("source")]).encode("ascii")


class SourceSpool:
    """(id, source) of every input position, added in input order while pass 1 reads the
    records and read back by position: one JSON array each (:func:`source_line`) in an unnamed
    temporary file under ``dir`` (gone when closed), an 8-byte end offset per position in
    memory. Pass 2 then parses none of the records the report names."""

    def __init__(self, dir: str):
        self.ends = array("q")
        self.fh = tempfile.TemporaryFile(dir=dir)
        self.size, self.view = 0, None

    def add(self, record: Mapping[str, Any]) -> None:
        line = source_line(record)
        self.fh.write(line)
        self.size += len(line)
        self.ends.append(self.size)

    def extend(self, lines: bytes, lengths: np.ndarray) -> None:
        """Add the :func:`source_line` of consecutive positions, joined (``lengths`` each)."""
        self.fh.write(lines)
        self.ends.extend((np.cumsum(lengths, dtype=np.int64) + self.size).tolist())
        self.size += len(lines)

    def __len__(self) -> int:
        return len(self.ends)

    def __call__(self, position: int) -> tuple[Any, Any]:
        if self.view is None:
            self.fh.flush()
            self.view = mmap.mmap(self.fh.fileno(), 0, access=mmap.ACCESS_READ) if self.size else b""
        if not 0 <= position < len(self.ends):
            raise KeyError(position)
        start = self.ends[position - 1] if position else 0
        rid, source = json.loads(self.view[start:self.ends[position]].decode("ascii"))
        return rid, source

    def close(self) -> None:
        if isinstance(self.view, mmap.mmap):
            self.view.close()
        self.view = None
        self.fh.close()


@contextmanager
def source_spool(dir: str) -> Iterator[SourceSpool]:
    """A :class:`SourceSpool` for a dedup run: closed if the run fails; on success the cluster
    report the run returns holds it (and reads from it as it is written)."""
    spool = SourceSpool(dir)
    try:
        yield spool
    except BaseException:
        spool.close()
        raise
