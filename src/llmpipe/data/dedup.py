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
  candidates from datasketch :class:`~datasketch.MinHashLSH` (banding chosen by
  :func:`lsh_params` so that >= 99% of pairs *at* the threshold become candidates), confirmed by
  the MinHash estimate of the Jaccard similarity (>= ``threshold``).

Clustering is greedy in input order: a record is compared with the records kept so far and joins
the cluster of the most similar one (earliest on ties); otherwise it is kept and indexed. So the
first record of every cluster is the one kept, and every removed record's reported Jaccard is its
estimated similarity to that kept record (>= threshold).

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

import contextlib
import gc
import hashlib
import json
import re
import unicodedata
from functools import lru_cache
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from datasketch import LeanMinHash, MinHash, MinHashLSH

from llmpipe.config.data import DedupSection
from llmpipe.data import records as canonical

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
    if not isinstance(record, Mapping):
        raise DedupError(f"record #{index}: expected a JSON object, got {type(record).__name__}")
    messages = record.get("messages")
    if not isinstance(messages, list):
        raise DedupError(f"{describe(record, index)}: 'messages' must be a list")
    out = []
    for j, m in enumerate(messages):
        if not (
            isinstance(m, Mapping)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
        ):
            raise DedupError(
                f"{describe(record, index)}: messages[{j}] needs string 'role' and 'content'"
            )
        if m["role"] in roles:
            out.append((m["role"], normalize_text(m["content"])))
    return out


def exact_key(contents: Sequence[tuple[str, str]]) -> str:
    """sha256 over the JSON of the (role, normalised content) list."""
    blob = json.dumps([list(c) for c in contents], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()


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
    """The (a, b) permutation parameters datasketch draws for (num_perm, seed, affine32)."""
    a, b = MinHash(num_perm=num_perm, seed=seed, scheme=MINHASH_SCHEME).permutations
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


@contextlib.contextmanager
def gc_paused():
    """Pause the cyclic garbage collector while building big LSH indexes.

    MinHashLSH's dict storage allocates one ``set`` per band bucket (millions for 100k records);
    every allocation burst triggers collections that rescan the growing heap, which made the
    insert loop superlinear (measured 20.8 s -> 12.5 s for 100k records). Nothing cyclic is
    created in between; the previous GC state is restored on exit.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def make_lsh(threshold: float, num_perm: int) -> MinHashLSH:
    """An empty datasketch MinHashLSH with :func:`lsh_params` banding."""
    bands_rows = lsh_params(threshold, num_perm)
    return MinHashLSH(threshold=float(threshold), num_perm=num_perm, params=bands_rows)


# --------------------------------------------------------------------------- dedup


def _member(record: Mapping[str, Any], kind: str, jaccard: float, reason: str) -> dict[str, Any]:
    return {
        "id": record.get("id"),
        "source": record.get("source"),
        "kind": kind,
        "jaccard": jaccard,
        "reason": reason,
    }


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
    """
    with gc_paused():
        return _dedup(records, cfg, progress or (lambda _msg: None))


def _dedup(
    records: Sequence[Mapping[str, Any]], cfg: DedupSection, say: Progress
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    n = len(records)

    # 1. Exact duplicates: group by the normalised-content key; the first of a group is its rep.
    texts: list[str] = []
    rep_index: list[int] = []  # for each exact rep (input order): its record index
    exact_copies: dict[int, list[int]] = {}  # rep record index -> later identical records
    first_by_key: dict[str, int] = {}
    for i, rec in enumerate(records):
        contents = selected_contents(rec, cfg.roles, i)
        key = exact_key(contents)
        rep = first_by_key.get(key)
        if rep is None:
            first_by_key[key] = i
            rep_index.append(i)
            texts.append(near_text(contents))
        else:
            exact_copies.setdefault(rep, []).append(i)
    say(f"exact pass: {n} records, {n - len(rep_index)} exact duplicates")

    # 2. Near duplicates among exact reps: MinHash + LSH, greedy in input order.
    sig = minhash_signatures(texts, cfg.num_perm, cfg.shingle_size, progress=say)
    lsh = make_lsh(cfg.threshold, cfg.num_perm)
    near_of: dict[int, tuple[int, float]] = {}  # rep record index -> (kept record index, jaccard)
    kept_rep_pos: list[int] = []  # positions (in rep_index) of kept reps
    empty = 0
    for pos, i in enumerate(rep_index):
        if pos and pos % 20000 == 0:
            say(f"near-duplicate search: {pos}/{len(rep_index)}")
        if not texts[pos]:
            empty += 1  # nothing to shingle: only exact dedup applies
            kept_rep_pos.append(pos)
            continue
        mh = lean_minhash(sig[pos])
        cands = sorted(lsh.query(mh))
        if cands:
            sims = estimated_jaccard(sig[pos], sig[cands])
            best = int(np.argmax(sims))  # first maximum = earliest kept record
            if sims[best] >= cfg.threshold:
                near_of[i] = (rep_index[cands[best]], float(sims[best]))
                continue
        lsh.insert(pos, mh, check_duplication=False)
        kept_rep_pos.append(pos)
    return assemble(records, cfg, rep_index, exact_copies, near_of, kept_rep_pos, empty, say)


def assemble(
    records: Sequence[Mapping[str, Any]],
    cfg: DedupSection,
    rep_index: Sequence[int],
    exact_copies: Mapping[int, list[int]],
    near_of: Mapping[int, tuple[int, float]],
    kept_rep_pos: Sequence[int],
    empty: int,
    say: Progress,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """Kept records, clusters and metrics from the two passes' decisions (shared by the local and
    the Ray engine): ``rep_index`` the record index of each exact representative (input order),
    ``exact_copies`` rep -> its later identical records, ``near_of`` removed rep -> (kept record
    index, Jaccard), ``kept_rep_pos`` positions in ``rep_index`` of the kept reps, ``empty`` reps
    without text."""
    n = len(records)
    lsh_bands, lsh_rows = lsh_params(cfg.threshold, cfg.num_perm)

    # 3. Clusters, keyed by the kept record. A removed record is "exact" when its normalised
    #    content equals the kept record's; copies of a removed near duplicate are "near" too.
    removed_by_kept: dict[int, list[tuple[int, dict[str, Any]]]] = {}

    def remove(index: int, kept: int, kind: str, jaccard: float, reason: str) -> None:
        member = _member(records[index], kind, jaccard, reason)
        removed_by_kept.setdefault(kept, []).append((index, member))

    def rid(index: int) -> Any:
        return records[index].get("id")

    for rep, (kept, jac) in near_of.items():
        why = f"near duplicate (Jaccard {jac:.3f} >= {cfg.threshold}) of kept record {rid(kept)}"
        remove(rep, kept, "near", jac, why)
        for c in exact_copies.get(rep, []):
            remove(c, kept, "near", jac, f"{why}; exact copy of removed record {rid(rep)}")
    for rep, copies in exact_copies.items():
        if rep not in near_of:
            for c in copies:
                why = f"exact duplicate (after normalisation) of kept record {rid(rep)}"
                remove(c, rep, "exact", 1.0, why)
    clusters = []
    for kept in sorted(removed_by_kept):
        members = [m for _, m in sorted(removed_by_kept[kept], key=lambda t: t[0])]
        clusters.append({
            "kept": {"id": rid(kept), "source": records[kept].get("source")},
            "removed": members,
            "size": 1 + len(members),
        })

    kept_idx = sorted(rep_index[p] for p in kept_rep_pos)
    kept_records = [records[i] for i in kept_idx]  # type: ignore[misc]
    exact_removed = sum(1 for c in clusters for m in c["removed"] if m["kind"] == "exact")
    near_removed = sum(1 for c in clusters for m in c["removed"] if m["kind"] == "near")
    if len(kept_records) + exact_removed + near_removed != n:  # internal invariant
        raise AssertionError(
            f"dedup bookkeeping error: {n} in != {len(kept_records)} kept "
            f"+ {exact_removed} exact + {near_removed} near"
        )
    metrics = {
        "records_in": n,
        "records_out": len(kept_records),
        "exact_duplicates_removed": exact_removed,
        "near_duplicates_removed": near_removed,
        "clusters": len(clusters),
        "records_without_text": empty,
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
        f"kept {len(kept_records)}/{n}; removed {exact_removed} exact + {near_removed} near "
        f"in {len(clusters)} clusters"
    )
    return kept_records, clusters, metrics  # type: ignore[return-value]


def read_records(path: str) -> list[dict[str, Any]]:
    """Read a pipeline JSONL file of records (each with an ``id``); errors name the file and line."""
    return canonical.read_records(path, DedupError, require_id=True)
