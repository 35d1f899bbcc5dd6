"""Deterministic, stratified train/val/test split + content hashes + contamination report.

Determinism
-----------
The split depends only on the *set* of records and the params, not on the input order:

* Records are grouped into strata by ``metadata[stratify_key]`` (records without the key, or
  without metadata, form the stratum ``"<missing>"``; non-string values are labelled by their
  JSON). With ``stratify_key: null`` there is one stratum ``"<all>"``.
* Within a stratum, records are ordered by ``sha256(f"{seed}:{id}")`` (ties, e.g. repeated ids,
  by the record's canonical JSON). The first ``n_train`` go to train, the next ``n_val`` to val,
  the rest to test.
* The per-stratum counts come from the ratios by largest remainder (ties: train, val, test);
  then, if the stratum has at least as many records as there are splits with a ratio > 0, every
  such split that got none takes one record from the largest split. So a stratum with >= 3
  records lands in all three splits when all ratios are > 0, and otherwise every count is within
  one record of ``n * ratio``.
* Each split file is ordered by the same hash (so strata are interleaved) and serialised exactly
  like :func:`llmpipe.io.write_jsonl` (key-sorted JSON, one record per line, UTF-8).

Pinned records: with ``pin_key`` set (params.yaml: ``"split"``), a record whose
``metadata[pin_key]`` names a split (``train``/``val``/``test``) goes to that split and takes no
part in the stratified allocation above, so pinning records never moves any other record. The
bundled safety examples use it to stay in train (the held-out task test set stays pure task
data). Any other value of the key is an error.

Hashes: ``sha256`` of each split file's bytes; the dataset version is the sha256 of the three
hex digests concatenated in the order train, val, test (ASCII, no separator).

Contamination: MinHash/LSH (the signatures and band keys of :mod:`llmpipe.data.dedup`) over the
train records; every val/test record is queried, and each (record, train record) pair that
agrees on a whole LSH band (datasketch ``MinHashLSH``'s bucket rule, with
:func:`~llmpipe.data.dedup.lsh_params` banding) and has an estimated Jaccard >=
``contamination_threshold`` is reported -- nothing is dropped. Pairs come by split (val, test),
query record (file order), then Jaccard descending and the train record's position in train.

Bounded memory
--------------
:func:`split_file` never holds the records. Pass 1 (:func:`scan_lines`, batch by batch: in this
process, or on Ray actors through ``batch_map``) keeps per record only what the assignment and
the contamination check need: the 32-byte order digest, a stratum code, the pinned split, the
line's place in the input (file, byte offset, length), whether the line is already canonical,
and its MinHash signature and band keys (in files read back as memory maps: ``num_perm x 4 +
bands x 8`` bytes, 680 at the defaults). The assignment is a sort of the digests; the
contamination check a per-band sorted index of the train records' band keys, queried block by
block. Pass 2 writes each split file in its order, reading each record's line back by offset
(a canonical line is copied as it is, any other is parsed and re-serialised).
:func:`split_records` runs the same code on a list of records.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from llmpipe.config.data import SplitSection
from llmpipe.data import records as canonical
from llmpipe.data.dedup import (
    DedupError,
    Progress,
    band_keys,
    lsh_params,
    minhash_signatures,
    near_text,
    selected_contents,
)
from llmpipe.data.lsh_index import count_true, low_bit_codes, may_reach, range_pairs, stable_argsort
from llmpipe.io import atomic_path, jsonl_line, write_jsonl

SPLITS = ("train", "val", "test")
MISSING_STRATUM = "<missing>"
ALL_STRATUM = "<all>"
PINNED_STRATUM = "<pinned>"


@dataclass
class SplitResult:
    """Everything the split stage writes: file bytes, contamination pairs, metrics."""

    splits: dict[str, list[dict[str, Any]]]
    files: dict[str, bytes]
    contamination: list[dict[str, Any]]
    metrics: dict[str, Any]


# --------------------------------------------------------------------------- assignment


_ABSENT = object()


def _metadata_value(record: Mapping[str, Any], key: str) -> Any:
    """``record["metadata"][key]``, or ``_ABSENT`` when the record has no such metadata."""
    meta = record.get("metadata")
    return meta[key] if isinstance(meta, Mapping) and key in meta else _ABSENT


def stratum_of(record: Mapping[str, Any], key: str | None) -> str:
    if key is None:
        return ALL_STRATUM
    value = _metadata_value(record, key)
    if value is _ABSENT:
        return MISSING_STRATUM
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def canonical_json(record: Mapping[str, Any]) -> str:
    """The record's line in a JSONL file (same format as llmpipe.io.write_jsonl)."""
    return json.dumps(record, ensure_ascii=False, sort_keys=True)


def order_key(record: Mapping[str, Any], seed: int) -> tuple[str, str]:
    """Position of a record in the seeded pseudo-random order (input-order independent)."""
    digest = hashlib.sha256(f"{seed}:{record.get('id')}".encode("utf-8")).hexdigest()
    return digest, canonical_json(record)


def allocate(n: int, ratios: Mapping[str, float]) -> dict[str, int]:
    """Records per split for a stratum of ``n`` records (see the module docstring)."""
    # Exact rational arithmetic on the ratios as written (0.1 is 1/10), renormalised to sum to 1.
    fr = [Fraction(repr(float(ratios[s]))) for s in SPLITS]
    exact = [n * f / sum(fr) for f in fr]
    counts = [math.floor(x) for x in exact]
    rest = n - sum(counts)
    by_frac = sorted(range(len(SPLITS)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_frac[:rest]:
        counts[i] += 1
    positive = [i for i, s in enumerate(SPLITS) if float(ratios[s]) > 0]
    if n >= len(positive):
        for i in positive:
            if counts[i] == 0:
                donor = max(range(len(SPLITS)), key=lambda j: (counts[j], -j))
                counts[donor] -= 1
                counts[i] += 1
    return dict(zip(SPLITS, counts))


def pinned_split(record: Mapping[str, Any], pin_key: str | None) -> str | None:
    """The split ``record`` is pinned to by ``metadata[pin_key]`` (None: not pinned)."""
    value = _ABSENT if pin_key is None else _metadata_value(record, pin_key)
    if value is _ABSENT:
        return None
    if value not in SPLITS:
        raise ValueError(
            f"record {record.get('id')!r}: metadata.{pin_key} pins it to a split, so it must be "
            f"one of {list(SPLITS)}, got {value!r} (or set split.pin_key: null)"
        )
    return value


def serialize(records: Sequence[Mapping[str, Any]]) -> bytes:
    return "".join(canonical_json(r) + "\n" for r in records).encode("utf-8")


def dataset_version(file_hashes: Mapping[str, str]) -> str:
    """sha256 over the split files' hex digests, concatenated in the order train, val, test."""
    return hashlib.sha256("".join(file_hashes[s] for s in SPLITS).encode("ascii")).hexdigest()


# --------------------------------------------------------------------------- pass 1: scan

Line = tuple[str, int, str]  # (file, line number, text) of one input line


@dataclass
class Scanned:
    """Pass 1 of one batch: what the assignment and the contamination check need per record."""

    digest: np.ndarray  # uint8[m, 32]: sha256(f"{seed}:{id}")
    strata: list[str]  # the batch's stratum names
    stratum: np.ndarray  # int32[m]: index into strata (-1: pinned)
    pinned: np.ndarray  # int8[m]: the split a record is pinned to (-1: none)
    canonical: np.ndarray  # bool[m]: the input line is the record's output line
    empty: np.ndarray  # bool[m]: no contamination text
    sig: np.ndarray  # uint32[m, num_perm]
    bands: np.ndarray  # int64[m, bands]


BatchMap = Callable[[Iterator[tuple[int, list[Line]]]], Iterator[Scanned]]  # (first position, lines)
SCAN_BATCH = 4096  # records scanned together in this process (signatures are vectorised per batch)


def scan_records(records: Sequence[Mapping[str, Any]], cfg: SplitSection, start: int = 0,
                 lines: Sequence[str] | None = None) -> Scanned:
    """Pass 1 over ``records`` (input positions ``start``...); ``lines``: their input lines."""
    m = len(records)
    digest = bytearray()
    names: dict[str, int] = {}
    stratum = np.full(m, -1, dtype=np.int32)
    pinned = np.full(m, -1, dtype=np.int8)
    canon = np.zeros(m, dtype=bool)
    texts = []
    for j, rec in enumerate(records):
        if not isinstance(rec, Mapping) or not isinstance(rec.get("id"), str):
            raise ValueError(f"record #{start + j}: expected a JSON object with a string 'id'")
        digest += hashlib.sha256(f"{cfg.seed}:{rec['id']}".encode("utf-8")).digest()
        target = pinned_split(rec, cfg.pin_key)
        if target is None:
            stratum[j] = names.setdefault(stratum_of(rec, cfg.stratify_key), len(names))
        else:
            pinned[j] = SPLITS.index(target)
        if lines is not None:
            canon[j] = jsonl_line(rec) == lines[j]  # type: ignore[arg-type]
        texts.append(near_text(selected_contents(rec, cfg.contamination_roles, start + j)))
    bands, rows = lsh_params(cfg.contamination_threshold, cfg.contamination_num_perm)
    sig = minhash_signatures(texts, cfg.contamination_num_perm, cfg.contamination_shingle_size)
    return Scanned(np.frombuffer(bytes(digest), dtype=np.uint8).reshape(m, 32), list(names), stratum, pinned,
                   canon, np.fromiter((not t for t in texts), dtype=bool, count=m), sig, band_keys(sig, bands, rows))


def scan_lines(lines: Sequence[Line], cfg: SplitSection, start: int = 0) -> Scanned:
    """:func:`scan_records` of input lines (the unit of work a Ray actor gets)."""
    recs = [canonical.parse_record(f, n, text, DedupError, require_id=True) for f, n, text in lines]
    return scan_records(recs, cfg, start, [text for _, _, text in lines])


class _Arrays:
    """Per-record arrays grown batch by batch; the large ones (signatures, band keys) go to files
    under ``workdir`` and are read back as memory maps."""

    def __init__(self, workdir: str | None):
        self.workdir = workdir
        self.parts: dict[str, list[np.ndarray]] = {}
        self.files: dict[str, Any] = {}
        self.meta: dict[str, tuple[np.dtype, tuple[int, ...], int]] = {}

    def add(self, name: str, block: np.ndarray, on_disk: bool = False) -> None:
        dtype, shape, n = self.meta.get(name, (block.dtype, block.shape[1:], 0))
        self.meta[name] = (dtype, shape, n + len(block))
        if on_disk and self.workdir is not None:
            if name not in self.files:
                self.files[name] = open(os.path.join(self.workdir, f"{name}.bin"), "wb")
            self.files[name].write(np.ascontiguousarray(block).tobytes())
        else:
            self.parts.setdefault(name, []).append(block)

    def get(self, name: str, dtype: Any = np.uint8, shape: tuple[int, ...] = ()) -> np.ndarray:
        """The whole column (``dtype``/``shape``: of an empty one, when no batch came)."""
        if name not in self.meta:
            return np.empty((0, *shape), dtype)
        dtype, shape, n = self.meta[name]
        if name in self.files:
            self.files[name].close()
            path = self.files.pop(name).name
            self.parts[name] = [np.memmap(path, dtype=dtype, mode="r", shape=(n, *shape))]
        if len(self.parts[name]) > 1:
            self.parts[name] = [np.concatenate(self.parts[name])]
        return self.parts[name][0]


class _Scan:
    """The pass-1 arrays of all records, in input order."""

    def __init__(self, cfg: SplitSection, workdir: str | None):
        self.cfg = cfg
        self.cols = _Arrays(workdir)
        self.names: dict[str, int] = {}
        self.n = 0

    def add(self, s: Scanned) -> None:
        codes = np.array([self.names.setdefault(name, len(self.names)) for name in s.strata] + [-1], dtype=np.int32)
        # copies: arrays from Ray are views of the whole batch's object (signatures included)
        self.cols.add("digest", s.digest.copy())
        self.cols.add("stratum", codes[s.stratum])  # -1 picks the appended -1
        self.cols.add("pinned", s.pinned.copy())
        self.cols.add("canonical", s.canonical.copy())
        self.cols.add("empty", s.empty.copy())
        self.cols.add("sig", s.sig, on_disk=True)
        self.cols.add("bands", s.bands, on_disk=True)
        self.n += len(s.digest)


# --------------------------------------------------------------------------- sources


class _ListSource:
    """Records in a list (:func:`split_records`)."""

    def __init__(self, records: Sequence[Mapping[str, Any]]):
        self.records = records

    def record(self, i: int) -> Mapping[str, Any]:
        return self.records[i]

    def line(self, i: int, canonical_line: bool) -> bytes:
        return (canonical_json(self.records[i]) + "\n").encode("utf-8")


class _FileSource:
    """A records file or shard directory, each record's line read back by its byte offset."""

    def __init__(self, path: str | os.PathLike[str]):
        self.files = canonical.record_files(path, DedupError, missing_hint=" (did the previous stage run?)")
        self.where: dict[str, list[np.ndarray]] = {"file": [], "offset": [], "length": [], "lineno": []}
        self.fds: list[int] = []

    def lines(self, batch: int) -> Iterator[list[Line]]:
        """Batches of (file, line number, text), recording every line's place in the input."""
        out: list[Line] = []
        place: dict[str, list[int]] = {k: [] for k in self.where}
        for k, file in enumerate(self.files):
            offset = 0
            with open(file, "rb") as fh:
                for lineno, raw in enumerate(fh, start=1):
                    at, offset = offset, offset + len(raw)
                    try:
                        text = raw.decode("utf-8")
                    except UnicodeDecodeError as exc:
                        raise DedupError(f"{file}:{lineno}: not valid UTF-8 ({exc.reason})") from None
                    if not text.strip():
                        continue
                    out.append((file, lineno, text))
                    for key, value in (("file", k), ("offset", at), ("length", len(raw)), ("lineno", lineno)):
                        place[key].append(value)
                    if len(out) >= batch:
                        self._keep(place)
                        yield out
                        out = []
        if out:
            self._keep(place)
            yield out

    def _keep(self, place: dict[str, list[int]]) -> None:
        for key, values in place.items():
            self.where[key].append(np.array(values, dtype=np.int64))
            values.clear()

    def finish(self) -> None:
        self.place = {k: np.concatenate(v) if v else np.empty(0, np.int64) for k, v in self.where.items()}
        self.where = {}
        self.fds = [os.open(f, os.O_RDONLY) for f in self.files]

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def raw(self, i: int) -> bytes:
        p = self.place
        data = os.pread(self.fds[p["file"][i]], int(p["length"][i]), int(p["offset"][i]))
        if len(data) != p["length"][i]:
            raise DedupError(f"{self.files[p['file'][i]]}: changed while being split")
        return data

    def record(self, i: int) -> dict[str, Any]:
        file, lineno = self.files[self.place["file"][i]], int(self.place["lineno"][i])
        return canonical.parse_record(file, lineno, self.raw(i).decode("utf-8"), DedupError, require_id=True)

    def line(self, i: int, canonical_line: bool) -> bytes:
        return self.raw(i) if canonical_line else jsonl_line(self.record(i)).encode("utf-8")


# --------------------------------------------------------------------------- assignment


@dataclass
class Pairs:
    """Contamination pairs in report order: the query's split (index into ``SPLITS``), input
    position and the train record's rank in train (its line in train.jsonl), and the number of
    equal signature values (Jaccard = equal / num_perm)."""

    split: np.ndarray
    query: np.ndarray
    train: np.ndarray
    equal: np.ndarray


@dataclass
class Plan:
    """The split of the scanned records: input positions of each split in file order, counts per
    stratum, and the contamination pairs."""

    order: dict[str, np.ndarray]
    per_stratum: dict[str, dict[str, int]]
    pairs: Pairs


def global_order(digest: np.ndarray, source: Any) -> np.ndarray:
    """Input positions sorted by :func:`order_key`: the digest, ties by the canonical JSON."""
    n = len(digest)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    words = np.ascontiguousarray(digest).view(">u8")  # [n, 4], big-endian: sorts like the hex digest
    order = np.lexsort(words.T[::-1])
    w = words[order]
    tie = np.flatnonzero((w[1:] == w[:-1]).all(axis=1))  # order[t] and order[t + 1]: same id
    if len(tie):
        starts = tie[np.r_[True, np.diff(tie) > 1]]
        for s in starts.tolist():
            e = s + 1
            while e < n and (w[e] == w[s]).all():
                e += 1
            run = order[s:e].tolist()
            order[s:e] = sorted(run, key=lambda i: canonical_json(source.record(i)))  # stable
    return order.astype(np.int64)


def assign_positions(scan: _Scan, source: Any) -> tuple[dict[str, np.ndarray], dict[str, dict[str, int]]]:
    """Input positions per split in file order, and counts per stratum (``"<pinned>"`` too)."""
    cfg = scan.cfg
    order = global_order(scan.cols.get("digest", np.uint8, (32,)), source)
    code = scan.cols.get("stratum", np.int32)
    pin = scan.cols.get("pinned", np.int8)
    split_of = np.full(scan.n, -1, dtype=np.int8)
    split_of[pin >= 0] = pin[pin >= 0]
    free = order[code[order] >= 0]  # unpinned, in the seeded order
    by_code = free[np.argsort(code[free], kind="stable")]  # grouped by stratum, each in the seeded order
    sorted_codes = code[by_code]
    per_stratum: dict[str, dict[str, int]] = {}
    for name in sorted(scan.names):
        c = scan.names[name]
        lo, hi = np.searchsorted(sorted_codes, [c, c + 1])
        counts = allocate(int(hi - lo), cfg.ratios)
        per_stratum[name] = counts
        at = int(lo)
        for k, s in enumerate(SPLITS):
            split_of[by_code[at:at + counts[s]]] = k
            at += counts[s]
    pinned = {s: int(np.count_nonzero(pin == k)) for k, s in enumerate(SPLITS)}
    if any(pinned.values()):
        per_stratum[PINNED_STRATUM] = pinned
    return {s: order[split_of[order] == k] for k, s in enumerate(SPLITS)}, per_stratum


# --------------------------------------------------------------------------- contamination

_QUERY_BLOCK = 1 << 14  # query records per block
_PAIR_BLOCK = 1 << 15  # candidate pairs checked at once: 2 x 32768 x num_perm x 4 B = 32 MiB at 128


def contamination_positions(order: Mapping[str, np.ndarray], sig: np.ndarray, band_key: np.ndarray,
                            empty: np.ndarray, cfg: SplitSection, say: Progress) -> Pairs:
    """Every contamination pair, in report order: by split (val, test), query record (file
    order), then Jaccard descending and train rank. ``sig``/``band_key``/``empty`` are indexed by
    input position (memory maps welcome).

    One band at a time: the train records' keys of the band, sorted (12 bytes per train record),
    are searched for the val/test records' keys in blocks of ``_QUERY_BLOCK``; the candidate pairs,
    in blocks of at most ``_PAIR_BLOCK``, meet the near pass's filters (``lsh_index``): the 2-bit
    codes of the values (an upper bound on the equal values, 32 bytes a record at 128
    permutations), then the full signatures, the Jaccard estimate before the bands. A pair is kept
    at the first band its two signatures agree on in whole (so a 64-bit key collision never adds
    one), so each confirmed pair is held once."""
    num_perm = cfg.contamination_num_perm
    threshold = cfg.contamination_threshold
    bands, rows = lsh_params(threshold, num_perm)
    empty = np.asarray(empty)
    train = order["train"]
    t_rank = np.flatnonzero(~empty[train]).astype(np.int32 if len(train) < 2**31 else np.int64)
    t_pos = train[t_rank]
    queries = [order[name][~empty[order[name]]] for name in SPLITS[1:]]
    q_pos = np.concatenate(queries)  # val, then test: file order, records with text
    q_split = np.repeat(np.arange(1, len(SPLITS), dtype=np.int8), [len(q) for q in queries])
    hits_q, hits_t, hits_eq = [], [], []
    search = bands if len(t_pos) and len(q_pos) else 0
    codes = low_bit_codes(sig) if search else None
    for k in range(search):
        keys = np.asarray(band_key[t_pos, k])
        o = stable_argsort(keys)
        keys, ranks = keys[o], t_rank[o]
        for q0 in range(0, len(q_pos), _QUERY_BLOCK):
            block = q_pos[q0:q0 + _QUERY_BLOCK]
            qkeys = np.asarray(band_key[block, k])
            lo = np.searchsorted(keys, qkeys, side="left")
            for partner, pq in range_pairs(lo, np.searchsorted(keys, qkeys, side="right") - lo, _PAIR_BLOCK):
                pt = ranks[partner]
                ok = may_reach(np.take(codes, block[pq], axis=0) ^ np.take(codes, train[pt], axis=0), num_perm, threshold)
                pq, pt = pq[ok], pt[ok]
                eq = np.asarray(sig[block[pq]]) == np.asarray(sig[train[pt]])
                equal = count_true(eq)
                ok = equal / num_perm >= threshold  # as estimated_jaccard() >= threshold
                passed = np.flatnonzero(ok)
                band_eq = eq[passed, :(k + 1) * rows].reshape(len(passed), k + 1, rows).all(axis=2)
                ok[passed] = band_eq[:, k] & ~band_eq[:, :k].any(axis=1)  # band k is the first whole equal band
                hits_q.append((pq[ok] + q0).astype(np.int64))
                hits_t.append(pt[ok].astype(np.int64))
                hits_eq.append(equal[ok].astype(np.int32))
    if hits_q:
        qi, t, e = (np.concatenate(x) for x in (hits_q, hits_t, hits_eq))
        o = np.lexsort((t, -e, qi))  # query (val then test, file order), Jaccard descending, train rank
        qi, t, e = qi[o], t[o], e[o]
    else:
        qi, t, e = np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int32)
    pairs = Pairs(q_split[qi], q_pos[qi], t, e)
    for j, name in enumerate(SPLITS[1:], start=1):
        found = int(np.count_nonzero(pairs.split == j))
        say(f"contamination check {name}: {len(order[name])} records vs {len(train)} train, {found} pairs")
    return pairs


def contamination_pair(
    name: str, rec: Mapping[str, Any], train_rec: Mapping[str, Any], jac: float, cfg: SplitSection
) -> dict[str, Any]:
    """One line of the contamination report."""
    return {
        "split": name,
        "id": rec.get("id"),
        "source": rec.get("source"),
        "train_id": train_rec.get("id"),
        "train_source": train_rec.get("source"),
        "jaccard": jac,
        "reason": f"near duplicate of a train record (Jaccard {jac:.3f} >= "
        f"{cfg.contamination_threshold}); reported, not dropped",
    }


# --------------------------------------------------------------------------- all together


def _local_map(cfg: SplitSection) -> BatchMap:
    return lambda batches: (scan_lines(lines, cfg, start) for start, lines in batches)


def _numbered(batches: Iterator[list[Line]]) -> Iterator[tuple[int, list[Line]]]:
    """Each batch with the input position of its first line (scan_lines' record numbers)."""
    start = 0
    for batch in batches:
        yield start, batch
        start += len(batch)


def _plan(scan: _Scan, source: Any, say: Progress) -> Plan:
    order, per_stratum = assign_positions(scan, source)
    sizes = ", ".join(f"{s}={len(order[s])}" for s in SPLITS)
    say(f"assigned: {sizes} over {len(per_stratum)} strata")
    pairs = contamination_positions(order, scan.cols.get("sig"), scan.cols.get("bands"),
                                    scan.cols.get("empty", bool), scan.cfg, say)
    return Plan(order, per_stratum, pairs)


def _contamination(plan: Plan, source: Any, cfg: SplitSection) -> Iterator[dict[str, Any]]:
    """The contamination report's rows, record ids and sources read back by position (the train
    partners of a query recur: the last few thousand records read are cached)."""

    @lru_cache(maxsize=4096)
    def who(i: int) -> dict[str, Any]:
        rec = source.record(i)
        return {"id": rec.get("id"), "source": rec.get("source")}

    train, num_perm = plan.order["train"], cfg.contamination_num_perm
    p = plan.pairs
    for s, q, t, e in zip(p.split.tolist(), p.query.tolist(), p.train.tolist(), p.equal.tolist()):
        yield contamination_pair(SPLITS[s], who(q), who(int(train[t])), e / num_perm, cfg)


def _metrics(plan: Plan, digest: np.ndarray, cfg: SplitSection, hashes: Mapping[str, str], n: int) -> dict[str, Any]:
    """metrics/data.json's content (``digest``: the order digests, one per id, by position)."""
    p = plan.pairs
    contaminated = np.unique(np.c_[p.split[:, None].astype(np.uint8), np.asarray(digest)[p.query]], axis=0)
    return {
        "dataset_version": dataset_version(hashes),
        "records": n,
        "counts": {s: len(plan.order[s]) for s in SPLITS},
        "sha256": dict(hashes),
        "strata": plan.per_stratum,
        "contamination_pairs": len(p.query),
        "contamination_by_split": {s: int(np.count_nonzero(p.split == j)) for j, s in enumerate(SPLITS) if j},
        "contaminated_records": len(contaminated),  # (split, id) pairs: one digest per id
        "pinned": plan.per_stratum.get(PINNED_STRATUM, {s: 0 for s in SPLITS}),
        "params": cfg.model_dump(mode="json"),
    }


def split_file(
    path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    cfg: SplitSection,
    progress: Progress | None = None,
    batch_map: BatchMap | None = None,
    batch_size: int = SCAN_BATCH,
    contamination_path: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Split a records file or shard directory into ``out_dir``/{train,val,test}.jsonl and write
    the contamination report (default ``out_dir``/contamination.jsonl), in memory bounded by the
    batch, not the corpus (two passes, see the module docstring). Returns the metrics. The bytes
    are :func:`split_records`'.

    ``batch_map`` runs pass 1 on batches of input lines (default: in this process; the Ray engine
    passes an actor pool) and yields their :class:`Scanned` in input order."""
    say = progress or (lambda _msg: None)
    source = _FileSource(path)
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".split-", suffix=".tmp", dir=out_dir) as work:
        scan = _Scan(cfg, work)
        for scanned in (batch_map or _local_map(cfg))(_numbered(source.lines(batch_size))):
            scan.add(scanned)
        source.finish()
        say(f"read {scan.n} records from {path}")
        try:
            plan = _plan(scan, source, say)
            canon = scan.cols.get("canonical", bool)
            hashes = {}
            for s in SPLITS:
                h = hashlib.sha256()
                with atomic_path(os.path.join(out_dir, f"{s}.jsonl")) as tmp, open(tmp, "wb") as fh:
                    for i in plan.order[s].tolist():
                        data = source.line(i, bool(canon[i]))
                        h.update(data)
                        fh.write(data)
                hashes[s] = h.hexdigest()
            write_jsonl(contamination_path or os.path.join(out_dir, "contamination.jsonl"),
                        _contamination(plan, source, cfg))
            metrics = _metrics(plan, scan.cols.get("digest", np.uint8, (32,)), cfg, hashes, scan.n)
        finally:
            source.close()
            del scan
    return metrics


def split_records(
    records: Sequence[Mapping[str, Any]],
    cfg: SplitSection,
    progress: Progress | None = None,
) -> SplitResult:
    """Split, hash and contamination-check ``records`` (nothing is written here): the same
    computation as :func:`split_file`, with the records in a list."""
    say = progress or (lambda _msg: None)
    scan = _Scan(cfg, None)
    for start in range(0, len(records), SCAN_BATCH):
        scan.add(scan_records(records[start:start + SCAN_BATCH], cfg, start))
    source = _ListSource(records)
    plan = _plan(scan, source, say)
    splits = {s: [dict(records[i]) for i in plan.order[s].tolist()] for s in SPLITS}
    files = {s: serialize(splits[s]) for s in SPLITS}
    hashes = {s: hashlib.sha256(files[s]).hexdigest() for s in SPLITS}
    contamination = list(_contamination(plan, source, cfg))
    metrics = _metrics(plan, scan.cols.get("digest", np.uint8, (32,)), cfg, hashes, len(records))
    return SplitResult(splits=splits, files=files, contamination=contamination, metrics=metrics)


__all__ = [
    "SPLITS",
    "BatchMap",
    "Scanned",
    "SplitResult",
    "allocate",
    "contamination_pair",
    "dataset_version",
    "pinned_split",
    "scan_lines",
    "split_file",
    "split_records",
    "stratum_of",
]
