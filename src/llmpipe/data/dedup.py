"""Exact + near-duplicate removal (the minhash-dedup stage's library code).

What counts as "the same record"
--------------------------------
Only the messages whose role is listed in ``dedup.roles`` (params.yaml: user, assistant) make up a
record's dedup text; the system prompt is left out because it is the same for every record and
would make unrelated records look alike. Each selected message is normalised with
:func:`normalize_text`: Unicode NFKC, ``str.casefold()`` (lower case), every run of whitespace
collapsed to one space, leading/trailing whitespace stripped. Punctuation is **kept**: in this
pipeline the assistant reply is JSON, where punctuation is meaningful, and records that differ
only in a few punctuation marks are caught by the near-duplicate pass anyway.

* **Exact duplicates**: same sha256 over the (role, normalised content) list -- so records that
  differ only in case or whitespace are exact duplicates.
* **Near duplicates**: MinHash (datasketch, ``affine32`` scheme, seed :data:`MINHASH_SEED`) over
  the set of character ``shingle_size``-grams of the normalised texts joined with ``"\\n"``,
  candidates from LSH banding (chosen by :func:`lsh_params` so that >= 99% of pairs *at* the
  threshold become candidates: two records are candidates when they agree on every value of a
  band, datasketch :class:`~datasketch.MinHashLSH`'s bucket rule), confirmed by the MinHash
  estimate of the Jaccard similarity (>= ``threshold``).

Clustering is greedy in input order: a record is compared with the records kept so far and joins
the cluster of the most similar one (earliest on ties); otherwise it is kept. So the first record
of every cluster is the one kept, and every removed record's reported Jaccard is its estimated
similarity to that kept record (>= threshold).

Bounded memory
--------------
There is no LSH index of Python objects (datasketch's, with the record list, took 891 MB at 100k
records). Pass 1 keeps per record only fixed-size arrays: a 32-byte exact-key digest, the
signature, its low bytes and one 64-bit key per band (:class:`_Signer`; :func:`dedup_file` keeps
them in files read back as memory maps). Exact groups come from a sort of the digests
(:func:`exact_groups`); near duplicates from ``lsh_index`` (the LSH buckets as sorted arrays of
band keys, candidates confirmed on the signatures, the greedy in blocks of records in input
order), which gives the datasketch loop's decisions (tests/test_dedup.py compares the two). Pass
2 of :func:`dedup_file` streams the input again and writes the kept records.

Speed
-----
``MinHash.bulk``/``update_batch`` hash every shingle with SHA-1 in Python (measured 0.9 s per
2,000 records of 400 chars here, i.e. ~45 s per 100k). :func:`minhash_signatures` computes the
*same* signatures as
``datasketch.MinHash(num_perm, seed, hashfunc=shingle_hash).update_batch(shingles)`` but
vectorised with numpy over many records at once: shingle hashes are FNV-1a over the code points,
computed for all windows of a chunk of texts in ``shingle_size`` array operations; then the
datasketch permutation ``a * fmix32(h) + b (mod 2**32)`` and a segmented minimum
(``np.minimum.reduceat``) per record. tests/test_dedup.py checks equality with datasketch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from llmpipe.config.data import DedupSection
from llmpipe.data import records as canonical
from llmpipe.data.dedup_report import ClusterReport, SourceSpool, source_spool
from llmpipe.data.lsh_index import BucketIndex, near_pass
from llmpipe.io import jsonl_line, write_jsonl_lines

if TYPE_CHECKING:  # imported where used: datasketch imports scipy (~1.5 CPU-s per process)
    from datasketch import LeanMinHash, MinHashLSH

MINHASH_SEED = 1  # datasketch's default seed; fixed so signatures are reproducible
MINHASH_SCHEME = "affine32"

_U32 = np.uint32
_FNV_OFFSET = 2166136261
_FNV_PRIME = 16777619
_MAX_HASH = np.uint32(0xFFFFFFFF)
_BLOCK = 8192  # shingles per (num_perm x block) work buffer: 128 x 8192 x 4 B = 4 MiB
_CHUNK_RECORDS = 4096  # texts encoded/hashed together

Progress = Callable[[str], None]


class DedupError(ValueError):
    """A record cannot be deduplicated (malformed record or configuration)."""


# --------------------------------------------------------------------------- text and keys

_WS = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """NFKC, casefold, collapse whitespace runs to one space, strip. Punctuation is kept."""
    if text.isascii():  # fast path: NFKC is the identity and casefold is lower() on ASCII
        return _WS.sub(" ", text.lower()).strip()
    return _WS.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def describe(record: Mapping[str, Any], index: int) -> str:
    """``record #i (id X, from file:line)`` for error messages."""
    src = record.get("source") if isinstance(record, Mapping) else None
    where = ""
    if isinstance(src, Mapping) and "file" in src:
        where = f", from {src.get('file')}:{src.get('line')}"
    rid = record.get("id") if isinstance(record, Mapping) else None
    return f"record #{index} (id {rid!r}{where})"


def selected_contents(
    record: Mapping[str, Any], roles: Sequence[str], index: int = 0
) -> list[tuple[str, str]]:
    """(role, normalised content) of the messages whose role is in ``roles``, in order."""
    if type(record) is not dict and not isinstance(record, Mapping):  # dict first: no ABC check
        raise DedupError(f"record #{index}: expected a JSON object, got {type(record).__name__}")
    messages = record.get("messages")
    if not isinstance(messages, list):
        raise DedupError(f"{describe(record, index)}: 'messages' must be a list")
    out = []
    for j, m in enumerate(messages):
        if not (
            (type(m) is dict or isinstance(m, Mapping))
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
        ):
            raise DedupError(
                f"{describe(record, index)}: messages[{j}] needs string 'role' and 'content'"
            )
        if m["role"] in roles:
            out.append((m["role"], normalize_text(m["content"])))
    return out


_KEY_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))  # json.dumps(..) with these


def exact_key(contents: Sequence[tuple[str, str]]) -> str:
    """sha256 over the JSON of the (role, normalised content) list."""
    return _exact_digest(contents).hex()


def _exact_digest(contents: Sequence[tuple[str, str]]) -> bytes:
    blob = _KEY_JSON.encode([list(c) for c in contents])
    return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).digest()


def near_text(contents: Sequence[tuple[str, str]]) -> str:
    """The text MinHash shingles: the non-empty normalised contents joined with a newline."""
    return "\n".join(c for _, c in contents if c)


# --------------------------------------------------------------------------- MinHash


def shingles(text: str, k: int) -> set[str]:
    """Character k-grams of ``text``; a non-empty text shorter than k is one shingle."""
    if not text:
        return set()
    if len(text) < k:
        return {text}
    return {text[i : i + k] for i in range(len(text) - k + 1)}


def shingle_hash(shingle: str) -> int:
    """32-bit FNV-1a over the code points of ``shingle`` (the reference for the numpy version).

    Usable as ``datasketch.MinHash(hashfunc=shingle_hash)``.
    """
    h = _FNV_OFFSET
    for ch in shingle:
        h = ((h ^ ord(ch)) * _FNV_PRIME) & 0xFFFFFFFF
    return h


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3 32-bit finalizer, as datasketch applies it before the affine32 permutation."""
    h = h ^ (h >> _U32(16))
    h = h * _U32(0x85EBCA6B)
    h = h ^ (h >> _U32(13))
    h = h * _U32(0xC2B2AE35)
    return h ^ (h >> _U32(16))


@lru_cache(maxsize=8)
def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The (a, b) permutation parameters datasketch draws for (num_perm, seed, affine32): its
    ``MinHash._init_permutations``, written out so that signing does not import datasketch
    (which imports scipy: ~1.5 CPU-s in every process that signs, e.g. each Ray worker).
    tests/test_dedup.py checks the signatures against datasketch's."""
    gen = np.random.RandomState(seed)
    a = gen.randint(0, 1 << 31, num_perm, dtype=_U32) * _U32(2) + _U32(1)
    b = gen.randint(0, 1 << 32, num_perm, dtype=_U32)
    return a.astype(_U32).reshape(-1, 1), b.astype(_U32).reshape(-1, 1)


def _codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")


def _shingle_hashes(texts: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    """FNV-1a hashes of all k-shingle windows of ``texts`` (concatenated, record by record).

    Returns (hashes, counts) with counts[i] = number of shingle windows of texts[i]. Windows
    are positional (a repeated shingle appears twice), which does not change a minimum.
    """
    lens = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
    counts = np.where(lens >= k, lens - k + 1, np.where(lens > 0, 1, 0))
    total = int(counts.sum())
    hashes = np.empty(total, dtype=_U32)
    if total == 0:
        return hashes, counts
    long_mask = lens >= k
    short_idx = np.flatnonzero((lens > 0) & ~long_mask)
    offsets = np.concatenate(([0], np.cumsum(counts)[:-1]))
    if long_mask.any():
        long_texts = [t for t, ok in zip(texts, long_mask) if ok]
        cp = _codepoints("".join(long_texts))
        n_win = len(cp) - k + 1
        h = np.full(n_win, _FNV_OFFSET, dtype=_U32)
        for j in range(k):
            h ^= cp[j : j + n_win]
            h *= _U32(_FNV_PRIME)
        llens = lens[long_mask]
        lcounts = llens - k + 1
        starts = np.concatenate(([0], np.cumsum(llens)[:-1]))  # text starts in cp
        win_off = np.concatenate(([0], np.cumsum(lcounts)[:-1]))  # starts in the window list
        idx = np.arange(int(lcounts.sum()), dtype=np.int64) + np.repeat(starts - win_off, lcounts)
        long_hashes = h[idx]
        if len(short_idx):
            slot = np.ones(total, dtype=bool)
            slot[offsets[short_idx]] = False
            hashes[slot] = long_hashes
        else:
            hashes[:] = long_hashes
    for i in short_idx:
        hashes[offsets[i]] = shingle_hash(texts[i])
    return hashes, counts


def minhash_signatures(
    texts: Sequence[str],
    num_perm: int,
    shingle_size: int,
    seed: int = MINHASH_SEED,
    progress: Progress | None = None,
) -> np.ndarray:
    """MinHash signatures (``uint32[len(texts), num_perm]``) of the shingle sets of ``texts``.

    Row i equals ``MinHash(num_perm, seed, hashfunc=shingle_hash, scheme="affine32")`` updated
    with ``shingles(texts[i], shingle_size)``; an empty text gives the empty sketch (all
    ``2**32 - 1``).
    """
    a, b = _permutations(num_perm, seed)
    sig = np.full((len(texts), num_perm), _MAX_HASH, dtype=_U32)
    buf = np.empty((num_perm, _BLOCK), dtype=_U32)
    for c0 in range(0, len(texts), _CHUNK_RECORDS):
        part = texts[c0 : c0 + _CHUNK_RECORDS]
        hashes, counts = _shingle_hashes(part, shingle_size)
        if len(hashes) == 0:
            continue
        hashes = _fmix32(hashes)
        nonempty = np.flatnonzero(counts > 0)
        seg_start = np.concatenate(([0], np.cumsum(counts)[:-1]))[nonempty]  # strictly increasing
        total = len(hashes)
        for s0 in range(0, total, _BLOCK):
            s1 = min(total, s0 + _BLOCK)
            i0 = int(np.searchsorted(seg_start, s0, side="right")) - 1  # record holding s0
            i1 = int(np.searchsorted(seg_start, s1, side="left"))
            starts = seg_start[i0:i1] - s0
            starts[0] = 0
            work = buf[:, : s1 - s0]
            np.multiply(a, hashes[s0:s1][None, :], out=work)
            np.add(work, b, out=work)
            mins = np.minimum.reduceat(work, starts, axis=1).T
            rows = nonempty[i0:i1] + c0
            sig[rows] = np.minimum(sig[rows], mins)
        done = min(c0 + _CHUNK_RECORDS, len(texts))
        if progress is not None and (done == len(texts) or (c0 // _CHUNK_RECORDS) % 5 == 4):
            progress(f"minhash: {done}/{len(texts)} signatures")
    return sig


def lean_minhash(signature: np.ndarray, seed: int = MINHASH_SEED) -> LeanMinHash:
    """Wrap a signature row for datasketch (LSH insert/query)."""
    from datasketch import LeanMinHash

    return LeanMinHash(seed=seed, hashvalues=signature, scheme=MINHASH_SCHEME)


def estimated_jaccard(sig: np.ndarray, others: np.ndarray) -> np.ndarray:
    """MinHash Jaccard estimate of ``sig`` against each row of ``others``."""
    return np.count_nonzero(others == sig, axis=-1) / sig.shape[-1]


LSH_TARGET_RECALL = 0.99


def lsh_params(
    threshold: float, num_perm: int, target: float = LSH_TARGET_RECALL
) -> tuple[int, int]:
    """(bands, rows) with the most rows per band such that a pair whose Jaccard equals
    ``threshold`` becomes an LSH candidate with probability >= ``target``.

    datasketch's default optimiser balances false positives and negatives, which at 0.8 / 128
    perms (9 x 13) misses 60% of pairs at the threshold and 31% at 0.85. Candidates are confirmed
    with the signature estimate anyway, so extra candidates only cost a vectorised comparison.
    """
    best = (max(2, num_perm), 1)
    for r in range(1, num_perm // 2 + 1):
        b = num_perm // r
        if b < 2:
            break
        if 1.0 - (1.0 - float(threshold) ** r) ** b >= target:
            best = (b, r)
    return best


def make_lsh(threshold: float, num_perm: int) -> MinHashLSH:
    """An empty datasketch MinHashLSH with :func:`lsh_params` banding."""
    from datasketch import MinHashLSH

    bands_rows = lsh_params(threshold, num_perm)
    return MinHashLSH(threshold=float(threshold), num_perm=num_perm, params=bands_rows)


# --------------------------------------------------------------------------- dedup


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_PRIME = np.uint64(0x100000001B3)


def band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """``int64[n, bands]``: a 64-bit hash of (band index, the band's ``rows`` signature values).

    Equal bands give equal keys; a key collision is harmless because every candidate pair is
    confirmed on the band's values (:func:`_confirm`)."""
    keys = np.empty((len(sig), bands), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(bands):
            h = np.full(len(sig), np.uint64(k + 1) * _GOLDEN, dtype=np.uint64)
            for j in range(k * rows, (k + 1) * rows):
                h = (h ^ sig[:, j].astype(np.uint64)) * _PRIME
            keys[:, k] = h
    return keys.view(np.int64)


class _Columns:
    """Per-record arrays grown batch by batch, in memory or in files under ``workdir`` (then
    read back as ``np.memmap``, so a large corpus's signatures are paged by the OS rather than
    held as process memory)."""

    def __init__(self, workdir: str | None):
        self.workdir = workdir
        self.parts: dict[str, list[np.ndarray]] = {}
        self.files: dict[str, Any] = {}
        self.meta: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}
        self.rows: dict[str, int] = {}

    def add(self, name: str, block: np.ndarray) -> None:
        self.meta.setdefault(name, (block.dtype, block.shape[1:]))
        self.rows[name] = self.rows.get(name, 0) + len(block)
        if self.workdir is None:
            self.parts.setdefault(name, []).append(block)
        else:
            if name not in self.files:
                self.files[name] = open(os.path.join(self.workdir, f"{name}.bin"), "wb")
            self.files[name].write(np.ascontiguousarray(block).tobytes())

    def get(self, name: str) -> np.ndarray:
        dtype, shape = self.meta[name]
        n = self.rows.get(name, 0)
        if self.workdir is None or n == 0:
            parts = self.parts.get(name) or [np.empty((0, *shape), dtype)]
            return np.concatenate(parts)
        fh = self.files.pop(name, None)
        if fh is not None:
            fh.close()
        return np.memmap(os.path.join(self.workdir, f"{name}.bin"), dtype=dtype, mode="r", shape=(n, *shape))


class _Signer:
    """Pass 1 of the dedup, batch by batch: per record the exact key (sha256 digest of the
    normalised contents), whether it has near-duplicate text, its MinHash signature and its LSH
    band keys. Only these fixed-size arrays are kept, never the records."""

    def __init__(self, cfg: DedupSection, workdir: str | None, say: Progress):
        self.cfg, self.say = cfg, say
        self.bands, self.rows = lsh_params(cfg.threshold, cfg.num_perm)
        self.cols = _Columns(workdir)
        self.texts: list[str] = []
        self.digests = bytearray()
        self.n = 0

    def add(self, record: Mapping[str, Any]) -> None:
        contents = selected_contents(record, self.cfg.roles, self.n)
        self.digests += _exact_digest(contents)  # exact_key()'s bytes: equal keys <=> equal digests
        self.texts.append(near_text(contents))
        self.n += 1
        if len(self.texts) >= _CHUNK_RECORDS:
            self.flush()

    def flush(self) -> None:
        if not self.texts:
            return
        sig = minhash_signatures(self.texts, self.cfg.num_perm, self.cfg.shingle_size)
        self.cols.add("key", np.frombuffer(bytes(self.digests), dtype=np.uint8).reshape(-1, 32))
        self.cols.add("empty", np.fromiter((not t for t in self.texts), dtype=bool, count=len(self.texts)))
        self.cols.add("sig", sig)
        self.cols.add("sig8", sig.astype(np.uint8))  # the low bytes: the near pass's prefilter
        keys = band_keys(sig, self.bands, self.rows)
        for k in range(self.bands):  # one array per band: the near pass reads one band at a time
            self.cols.add(f"band{k}", keys[:, k])
        self.texts, self.digests = [], bytearray()
        if self.n % (_CHUNK_RECORDS * 25) < _CHUNK_RECORDS:
            self.say(f"minhash: {self.n} signatures")


def exact_groups(keys: np.ndarray) -> np.ndarray:
    """``rep[i]``: the first record (input order) whose exact key equals record i's (keys:
    ``uint8[n, 32]`` digests)."""
    n = len(keys)
    rep = np.arange(n, dtype=np.int64)
    if n < 2:
        return rep
    words = np.ascontiguousarray(keys).view(np.uint64)  # [n, 4]
    order = np.lexsort(words.T[::-1])  # stable: equal keys keep input order
    sorted_words = words[order]
    new_group = np.r_[True, (sorted_words[1:] != sorted_words[:-1]).any(axis=1)]
    first = order[np.flatnonzero(new_group)]
    rep[order] = first[np.cumsum(new_group) - 1]
    return rep


@dataclass
class Decisions:
    """What the dedup decided, per input position: ``rep_index`` the exact representatives
    (input order), ``exact_copies`` rep -> its later identical records, ``near_of`` removed rep
    -> (kept record, Jaccard), ``kept`` a mask of the records written out, ``empty`` the number of
    representatives without text."""

    n: int
    rep_index: list[int]
    exact_copies: dict[int, list[int]]
    near_of: dict[int, tuple[int, float]]
    kept: np.ndarray
    empty: int

    @property
    def kept_rep_pos(self) -> list[int]:
        return [p for p, i in enumerate(self.rep_index) if i not in self.near_of]


def decide(signer: _Signer, say: Progress) -> Decisions:
    """Exact groups, confirmed near pairs and the greedy, from pass 1's arrays."""
    signer.flush()
    cols = signer.cols

    def near(skip: np.ndarray) -> dict[int, tuple[int, float]]:
        n = signer.n
        every = np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)
        index = BucketIndex(skip, cols.get("sig8"), cols.get("sig"), signer.bands, signer.rows,
                            signer.cfg.threshold, [(cols.get(f"band{k}"), every) for k in range(signer.bands)])
        near_of, confirmed = near_pass(lambda lo, hi, removed: [index.pairs(lo, hi, removed)], n,
                                       signer.cfg.num_perm, say=say)
        say(f"near pass: {confirmed} confirmed pairs ({signer.bands} bands), {len(near_of)} near duplicates")
        return near_of

    if signer.n == 0:
        return Decisions(0, [], {}, {}, np.zeros(0, dtype=bool), 0)
    return decisions(cols.get("key"), cols.get("empty"), near, say)


def decisions(keys: np.ndarray, empty: np.ndarray, near: Callable[[np.ndarray], dict[int, tuple[int, float]]],
              say: Progress) -> Decisions:
    """:class:`Decisions` from the exact-key digests (``uint8[n, 32]``) and the no-text flags of
    all records; ``near(skip)`` decides the near duplicates among the records not in ``skip``
    (exact copies and records without text). Shared by the local and the Ray engine."""
    n = len(keys)
    if n == 0:
        return Decisions(0, [], {}, {}, np.zeros(0, dtype=bool), 0)
    empty = np.asarray(empty, dtype=bool)
    rep = exact_groups(keys)
    is_copy = rep != np.arange(n)
    exact_copies: dict[int, list[int]] = {}
    for c in np.flatnonzero(is_copy).tolist():
        exact_copies.setdefault(int(rep[c]), []).append(c)
    say(f"exact pass: {n} records, {int(is_copy.sum())} exact duplicates")
    near_of = near(is_copy | empty)
    kept = ~is_copy
    if near_of:
        kept[np.fromiter(near_of, dtype=np.int64, count=len(near_of))] = False
    return Decisions(n, np.flatnonzero(~is_copy).tolist(), exact_copies, near_of, kept,
                     int((empty & ~is_copy).sum()))


def dedup_records(
    records: Sequence[Mapping[str, Any]],
    cfg: DedupSection,
    progress: Progress | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """Remove exact and near duplicates, keeping the first record of each cluster.

    Returns ``(kept, clusters, metrics)``: ``kept`` are the input records (same objects, input
    order); ``clusters`` has one dict per cluster with at least one removed record (ordered by the
    kept record's position): ``{"kept": {"id", "source"}, "removed": [{"id", "source", "kind",
    "jaccard", "reason"}], "size"}``; ``metrics`` holds the counts and the params used.
    :func:`dedup_file` does the same on a file in bounded memory.
    """
    say = progress or (lambda _msg: None)
    signer = _Signer(cfg, None, say)
    for rec in records:
        signer.add(rec)
    d = decide(signer, say)
    clusters = ClusterReport(d.near_of, d.exact_copies, cfg.threshold,
                             lambda i: (records[i].get("id"), records[i].get("source")))
    kept = [records[i] for i in np.flatnonzero(d.kept).tolist()]
    return kept, list(clusters), assemble(clusters, len(records), cfg, d, say, len(kept))


def dedup_file(
    path: str | os.PathLike[str],
    out_records: str | os.PathLike[str],
    cfg: DedupSection,
    shards: int = 1,
    progress: Progress | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """:func:`dedup_records` over a records file or shard directory in memory bounded by the
    batch, not the corpus: pass 1 streams the records and keeps per record only its exact-key
    digest, MinHash signature and band keys (in files under a temporary directory next to
    ``out_records``, read back as memory maps); pass 2 streams the input again and writes the
    kept records to ``out_records`` (``shards`` > 1: a directory of shards). Returns
    ``(clusters, metrics)``, which hold only ids and sources. Same bytes as :func:`dedup_records`
    followed by ``write_records``.
    """
    say = progress or (lambda _msg: None)
    out_dir = os.path.dirname(os.path.abspath(out_records))
    os.makedirs(out_dir, exist_ok=True)
    hint = " (did the previous stage run?)"
    with source_spool(out_dir) as sources:  # every record's id and source, for the cluster report
        with tempfile.TemporaryDirectory(prefix=".dedup-", suffix=".tmp", dir=out_dir) as work:
            signer = _Signer(cfg, work, say)
            canonical_line: list[bool] = []  # the line is exactly what write_records would write
            for file, lineno, line in canonical.iter_record_lines(path, DedupError, missing_hint=hint):
                rec = canonical.parse_record(file, lineno, line, DedupError, require_id=True)
                canonical_line.append(jsonl_line(rec) == line)
                signer.add(rec)
                sources.add(rec)
            d = decide(signer, say)
            del signer
        return write_kept(path, out_records, cfg, d, canonical_line, sources, shards, say)


def write_kept(
    path: str | os.PathLike[str],
    out_records: str | os.PathLike[str],
    cfg: DedupSection,
    d: Decisions,
    canonical_line: Sequence[bool],
    sources: SourceSpool,
    shards: int = 1,
    progress: Progress | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Pass 2 of :func:`dedup_file` (shared with the Ray engine): stream the input again, write
    the kept records ``d.kept`` to ``out_records`` (a line in the pipeline's own spelling,
    ``canonical_line[i]``, is copied as it is, any other is parsed and rewritten) and return
    ``(clusters, metrics)``; the report's ids and sources come from pass 1's ``sources``."""
    say = progress or (lambda _msg: None)
    hint = " (did the previous stage run?)"
    if len(sources) != d.n:
        raise DedupError(f"{path}: {len(sources)} ids and sources for {d.n} records (internal error)")
    clusters = ClusterReport(d.near_of, d.exact_copies, cfg.threshold, sources)
    seen = 0

    def kept_lines() -> Iterator[str]:
        nonlocal seen
        for i, (file, lineno, line) in enumerate(canonical.iter_record_lines(path, DedupError, missing_hint=hint)):
            if i >= d.n:
                break  # the input grew: reported below
            seen = i + 1
            if d.kept[i]:
                yield line if canonical_line[i] else jsonl_line(canonical.parse_record(file, lineno, line, DedupError))

    n_kept = int(d.kept.sum())
    write_jsonl_lines(out_records, kept_lines(), shards, n_kept)  # reads the generator to its end
    if seen != d.n or len(canonical_line) != d.n:
        raise DedupError(f"{path}: changed while being deduplicated ({seen} records on the second pass, {d.n} on the first)")
    return clusters, assemble(clusters, d.n, cfg, d, say, n_kept)


def assemble(clusters: ClusterReport, n: int, cfg: DedupSection, d: Decisions, say: Progress,
             n_kept: int) -> dict[str, Any]:
    """The metrics of the decisions ``d`` over ``n`` records, ``n_kept`` of them written, and
    their cluster report (shared by the local and the Ray engine); checks the bookkeeping."""
    lsh_bands, lsh_rows = lsh_params(cfg.threshold, cfg.num_perm)
    exact_removed, near_removed = clusters.exact_removed, clusters.near_removed
    if n_kept != len(d.kept_rep_pos) or n_kept + exact_removed + near_removed != n:  # internal invariant
        raise AssertionError(
            f"dedup bookkeeping error: {n} in != {n_kept} kept "
            f"+ {exact_removed} exact + {near_removed} near"
        )
    metrics = {
        "records_in": n,
        "records_out": n_kept,
        "exact_duplicates_removed": exact_removed,
        "near_duplicates_removed": near_removed,
        "clusters": len(clusters),
        "records_without_text": d.empty,
        "params": {
            **cfg.model_dump(mode="json"),
            "normalization": "nfkc+casefold+collapse_whitespace (punctuation kept)",
            "minhash_seed": MINHASH_SEED,
            "minhash_scheme": MINHASH_SCHEME,
            "shingle_hash": "fnv1a32-codepoints",
            "lsh_bands": lsh_bands,
            "lsh_rows": lsh_rows,
        },
    }
    say(
        f"kept {n_kept}/{n}; removed {exact_removed} exact + {near_removed} near "
        f"in {len(clusters)} clusters"
    )
    return metrics


def read_records(path: str) -> list[dict[str, Any]]:
    """Read a pipeline JSONL file of records (each with an ``id``); errors name the file and line."""
    return canonical.read_records(path, DedupError, require_id=True)
