"""The near-duplicate pass of minhash-dedup: LSH buckets, candidate pairs confirmed by
signature, and the local rule in input order. One implementation for both engines: the local
engine holds one :class:`BucketIndex` over all band keys in its process; the Ray engine holds one
per hash partition of the band keys (:func:`bucket_partitions`), each in an actor.

The rule (``dedup``'s docstring): records are decided in input order; a record is removed as a
near duplicate of the most similar earlier record that is still *kept* and shares an LSH bucket
with it (the earliest on ties) when their estimated Jaccard reaches the threshold, else it is
kept. :func:`near_pass` runs it in blocks of :data:`BLOCK_RECORDS` records: each index returns a
block's confirmed pairs, :func:`greedy` decides them, and the block's removed records leave the
indexes before the next block, so a family of near duplicates costs one candidate per member
and kept record, not one per pair.

Costs, per candidate pair (a block record and an earlier record in one of its buckets). On a
corpus whose families of similar records grow with it, the candidates grow faster than the
records (5.1M at 100k records, 410M at 1M on the scale benchmark's corpus), so what one costs
sets the near pass's time. Each candidate meets three filters, the cheapest first, each an
upper bound on the count of equal signature values, so none rejects a pair the next would pass:

* **2 bits per value** (``sig2``, 32 bytes a record at 128 permutations, packed here from the
  low bytes): two values that are equal have equal low bits, so the count of equal 2-bit codes
  bounds the true count from above. A pair below the threshold on it can never be confirmed; a
  pair at Jaccard 0.5 passes with probability ~1e-5, one at 0.6 with 0.005, one at 0.7 with
  0.25 (128 permutations, threshold 0.8);
* then, once per pair (a pair sharing several buckets comes once per bucket), **the low byte**
  of each value (``sig8``, a quarter of the signature), the same bound with 8 bits;
* then **the full signatures**, which confirm it.

Removed records are masked at once and dropped from the arrays when they make up a quarter of
the entries (:meth:`BucketIndex._compact`), so there is no index rebuild per block.

Memory per index: 12 bytes per (record, band) entry that shares its bucket with another record
(singletons never pair), 12 bytes of bookkeeping per entry and the 2-bit codes (32 bytes a
record at 128 permutations); the low bytes and the signatures are read where they lie (a memory
map locally, the object store on Ray).
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

PAIR_BLOCK = 1 << 17  # candidate pairs filtered at once: 2 x 131072 x 128 B = 32 MiB of low bytes at 128 perms
BLOCK_RECORDS = 1 << 13  # records decided together; smaller blocks pair fewer undecided records
COMPACT_SHARE = 4  # drop removed records' entries when they are 1/4 of an index

Progress = Callable[[str], None]

__all__ = ["BLOCK_RECORDS", "BucketIndex", "bucket_partitions", "count_true", "greedy", "low_bit_codes",
           "may_reach", "near_pass", "range_pairs", "stable_argsort", "unique_ints"]


def range_pairs(lo: np.ndarray, count: np.ndarray, block: int | None = None
                ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """For queries q with partner ranges ``[lo[q], lo[q] + count[q])``: (partner, query) index
    arrays in blocks of at most ``block`` (default :data:`PAIR_BLOCK`) pairs, in query order (a
    query's range may span two or more blocks)."""
    block = block or PAIR_BLOCK
    q = np.flatnonzero(count)
    if not len(q):
        return
    c = np.asarray(count)[q].astype(np.int64)
    end = np.cumsum(c)
    begin = end - c
    total = int(end[-1])
    for s in range(0, total, block):
        e = min(total, s + block)
        qa, qb = np.searchsorted(end, [s, e - 1], side="right")
        first = np.maximum(begin[qa:qb + 1], s)  # this block's share of each query's range
        cc = np.minimum(end[qa:qb + 1], e) - first
        queries = np.repeat(q[qa:qb + 1], cc)
        offset = np.asarray(lo)[q[qa:qb + 1]] + (first - begin[qa:qb + 1]) - (np.cumsum(cc) - cc)
        yield np.repeat(offset, cc) + np.arange(e - s), queries


def bucket_partitions(first: int, keys: np.ndarray, parts: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The band keys ``keys`` (``int64[n, bands]``, records ``first``..``first + n - 1``) as
    ``parts`` hash partitions of (key, record) entries, records ascending within a partition:
    equal keys land in the same partition, so every bucket lies whole in one."""
    n, bands = keys.shape
    flat = np.ascontiguousarray(keys).reshape(-1)
    ids = np.repeat(np.arange(first, first + n, dtype=np.int32 if first + n < 2**31 else np.int64), bands)
    if parts == 1:
        return [(flat, ids)]
    part = (flat.view(np.uint64) >> np.uint64(33)) % np.uint64(parts)  # keys are hashes already
    order = np.argsort(part, kind="stable")
    bounds = np.searchsorted(part[order], np.arange(parts + 1, dtype=np.uint64))
    return [(flat[order[s:e]], ids[order[s:e]]) for s, e in zip(bounds[:-1], bounds[1:])]


class BucketIndex:
    """LSH buckets of the records not in ``skip`` (exact copies, records without text): the
    (band key, record) ``entries`` -- a list of array pairs, records ascending in each, e.g. one
    per band or a Ray engine partition per signing batch, consumed -- sorted by key.

    :meth:`pairs` returns a block's confirmed pairs (a, b): b in the block, a < b an earlier
    record in one of b's buckets that is not removed (still kept, or undecided in the block), the
    signatures agreeing on a whole band (so a 64-bit key collision never adds a pair) with an
    estimated Jaccard >= ``threshold``; each pair once, with its count of equal signature values.
    ``sig8``/``sig`` hold the low bytes and the full signatures, one row per record (memory maps
    locally, zero-copy object-store arrays on Ray); ``sig2`` their :func:`low_bit_codes`, packed
    here when not given (the Ray engine puts them once for all its indexes)."""

    def __init__(self, skip: np.ndarray, sig8: np.ndarray, sig: np.ndarray, bands: int, rows: int,
                 threshold: float, entries: list[tuple[np.ndarray, np.ndarray]], sig2: np.ndarray | None = None):
        skip = np.asarray(skip, dtype=bool)
        keys, recs = [], []
        entries.reverse()
        while entries:  # consumed: each array is released once filtered
            key, rec = entries.pop()
            live = ~skip[rec]
            keys.append(np.asarray(key)[live])
            recs.append(np.asarray(rec)[live])
            del key, rec, live
        key = np.concatenate(keys) if keys else np.empty(0, np.int64)
        del keys
        rec = np.concatenate(recs) if recs else np.empty(0, np.int32)
        del recs
        order = stable_argsort(key)  # records ascending within a bucket
        self.key, self.rec = key[order], rec[order]
        del key, rec, order
        self.removed = np.zeros(len(skip), dtype=bool)
        self.sig8, self.sig = np.asarray(sig8), np.asarray(sig)  # a plain view of a memmap: faster indexing
        self.sig2 = low_bit_codes(self.sig8) if sig2 is None else np.asarray(sig2)
        self.bands, self.rows, self.threshold = bands, rows, float(threshold)
        self._compact()

    def _compact(self) -> None:
        """Drop the entries of removed records and of buckets left with one entry; rebuild the
        bucket starts and the by-record order."""
        key, rec = self.key, self.rec
        if self.removed.any():
            live = ~self.removed[rec]
            key, rec = key[live], rec[live]
        if len(key):
            same = key[1:] == key[:-1]
            shared = np.r_[same, False] | np.r_[False, same]  # an entry alone in its bucket never pairs
            key, rec = key[shared], rec[shared]
            del same, shared
        self.key, self.rec = key, rec
        del key, rec
        new_run = np.r_[True, self.key[1:] != self.key[:-1]] if len(self.key) else np.empty(0, bool)
        starts = np.flatnonzero(new_run)
        pos_type = np.int32 if len(self.key) < 2**31 else np.int64
        self.run_start = starts.astype(pos_type)[np.cumsum(new_run) - 1]
        self.by_rec = stable_argsort(self.rec).astype(pos_type)
        self.rec_sorted = self.rec[self.by_rec]
        self.entries_of = np.bincount(self.rec, minlength=len(self.removed)).astype(np.uint16)
        self.stale = 0

    def pairs(self, lo: int, hi: int, removed: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The confirmed pairs of block [lo, hi), told the records the previous block removed."""
        removed = np.asarray(removed, dtype=np.int64)
        if len(removed):
            self.removed[removed] = True
            self.stale += int(self.entries_of[removed].sum())
            if self.stale * COMPACT_SHARE >= len(self.key):
                self._compact()
        i0, i1 = np.searchsorted(self.rec_sorted, np.array([lo, hi], dtype=self.rec_sorted.dtype))  # same dtype: no copy
        block = np.sort(self.by_rec[i0:i1]).astype(np.int64)
        found_a, found_b = [], []
        if len(block):
            start = self.run_start[block].astype(np.int64)
            for partner, query in range_pairs(start, block - start):  # earlier entries of each bucket
                a, b = self.rec[partner].astype(np.int64), self.rec[block[query]].astype(np.int64)
                ok = (a < b) & ~self.removed[a]  # a < b: a 64-bit key collision across bands may break the order
                a, b = a[ok], b[ok]
                xor = np.take(self.sig2, a, axis=0) ^ np.take(self.sig2, b, axis=0)
                ok = may_reach(xor, self.sig8.shape[1], self.threshold)
                found_a.append(a[ok])
                found_b.append(b[ok])
        if not found_a:
            return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.int32)
        n = len(self.removed)
        pair = unique_ints(np.concatenate(found_a) * n + np.concatenate(found_b))  # a pair sharing several buckets: once
        del found_a, found_b
        a, b = pair // n, pair % n
        keep = [np.empty(0, bool)]
        for s in range(0, len(a), PAIR_BLOCK):
            x, y = a[s:s + PAIR_BLOCK], b[s:s + PAIR_BLOCK]
            keep.append(self._agree(self.sig8[x] == self.sig8[y])[0])
        ok = np.concatenate(keep)
        a, b = a[ok], b[ok]
        out_a, out_b, out_eq = [a[:0]], [b[:0]], [np.empty(0, np.int32)]
        for s in range(0, len(a), PAIR_BLOCK // 4):  # full signatures: 4 x the bytes
            x, y = a[s:s + PAIR_BLOCK // 4], b[s:s + PAIR_BLOCK // 4]
            ok, equal = self._agree(self.sig[x] == self.sig[y])
            out_a.append(x[ok])
            out_b.append(y[ok])
            out_eq.append(equal[ok].astype(np.int32))
        return np.concatenate(out_a), np.concatenate(out_b), np.concatenate(out_eq)

    def _agree(self, eq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ok, equal) for the pairs (rows of the equality matrix ``eq``): ``equal`` their counts of
        equal values, ``ok`` whether the estimated Jaccard reaches the threshold and they agree on
        a whole band. The count comes first: few pairs pass it, and numpy's reduction over a
        band's 6 values costs ~15x the count (measured)."""
        equal = count_true(eq)
        ok = equal / eq.shape[1] >= self.threshold  # as estimated_jaccard() >= threshold
        passed = np.flatnonzero(ok)
        if len(passed):
            by_band = eq[passed, : self.bands * self.rows].reshape(len(passed), self.bands, self.rows)
            whole = by_band[:, :, 0].copy()
            for j in range(1, self.rows):
                whole &= by_band[:, :, j]
            ok[passed] = whole.any(axis=1)
        return ok, equal


_LOW_OF_PAIRS = np.uint64(0x5555555555555555)  # the low bit of every 2-bit code in a word


def low_bit_codes(sig8: np.ndarray) -> np.ndarray:
    """The low 2 bits of every signature value (``sig8``: ``[n, num_perm]``, the signatures or
    their low bytes; a memory map is read 65,536 rows at a time), packed 4 to a byte: ``uint64[n, ceil(num_perm / 32)]``, zero-padded (padding never
    differs). Equal values have equal codes."""
    n, num_perm = sig8.shape
    words = -(-num_perm // 32)
    out = np.zeros((n, words * 8), np.uint8)
    for s in range(0, n, 1 << 16):
        v = (np.asarray(sig8[s:s + (1 << 16)]) & 3).astype(np.uint8)
        if num_perm % 32:
            v = np.pad(v, ((0, 0), (0, words * 32 - num_perm)))
        out[s:s + len(v)] = v[:, 0::4] | (v[:, 1::4] << 2) | (v[:, 2::4] << 4) | (v[:, 3::4] << 6)
    return out.view(np.uint64)


_TOP = np.uint64(0xFFFFFFFF00000000)
_LOW = np.uint64(0xFFFFFFFF)
_CHUNK = 1 << 20


def stable_argsort(x: np.ndarray) -> np.ndarray:
    """``np.argsort(x, kind="stable")`` for a 1-d int32 or int64 array, 2.5-4x faster (21M int64
    keys: 1.8 s instead of 6.9 s; 14M int32: 1.3 s instead of 5.0 s, measured here): numpy's
    sort of values is vectorised, its argsort is not. The value's top 32 bits and the position
    are packed into one uint64 and sorted as values, in place; int64 values that share their top
    32 bits but differ (rare for hash keys) are then put in order among themselves. Memory: the
    result (8 bytes a value) and 1M-value chunks, as ``np.argsort``."""
    n = len(x)
    if n >= 2**32 or x.dtype not in (np.int32, np.int64):
        return np.argsort(x, kind="stable")
    if x.dtype == np.int32:  # the whole value fits in the top half
        packed = x.astype(np.int64)
        packed += 2**31
        packed = packed.view(np.uint64)
        packed <<= np.uint64(32)
    else:  # flipping the sign bit maps int64 order onto uint64 order
        packed = x.view(np.uint64) ^ np.uint64(1 << 63)
        packed &= _TOP
    for s in range(0, n, _CHUNK):
        packed[s:s + _CHUNK] |= np.arange(s, min(n, s + _CHUNK), dtype=np.uint64)
    packed.sort()
    tops = []
    if x.dtype == np.int64:  # runs of one top half holding several values
        for s in range(0, n - 1, _CHUNK):
            w = packed[s:s + _CHUNK + 1]
            top = w >> np.uint64(32)
            value = x[(w & _LOW).astype(np.int64)]
            mixed = (top[1:] == top[:-1]) & (value[1:] != value[:-1])
            if mixed.any():
                tops.append(top[1:][mixed])
    if tops:
        top = unique_ints(np.concatenate(tops))
        lo = np.searchsorted(packed, top << np.uint64(32), side="left")
        hi = np.searchsorted(packed, (top << np.uint64(32)) | _LOW, side="right")
    packed &= _LOW
    order = packed.view(np.int64)
    if tops:  # order each such run by (value, position)
        pos = np.concatenate([np.arange(a, b) for a, b in zip(lo.tolist(), hi.tolist())])
        run = np.repeat(np.arange(len(top)), hi - lo)
        sub = order[pos]
        order[pos] = sub[np.lexsort((sub, x[sub], run))]
    return order


def unique_ints(x: np.ndarray) -> np.ndarray:
    """``np.unique(x)`` for a 1-d integer array, by sort: numpy 2.4's ``np.unique`` hashes
    instead and took 12.5 s on 12M int64 where this takes 0.34 s (measured here)."""
    x = np.sort(x)
    return x[np.r_[True, x[1:] != x[:-1]]] if len(x) else x


def may_reach(xor: np.ndarray, num_perm: int, threshold: float) -> np.ndarray:
    """Whether pairs may reach ``threshold`` as estimated Jaccard, from the XOR of their 2-bit
    codes (rows of :func:`low_bit_codes`): their count of equal codes, an upper bound on their
    count of equal values, does (the same test as the full signatures')."""
    differ = np.bitwise_count((xor | (xor >> np.uint64(1))) & _LOW_OF_PAIRS)
    mismatches = differ[:, 0].astype(np.int64) if differ.shape[1] else np.zeros(len(differ), np.int64)
    for w in range(1, differ.shape[1]):  # a few words: columns beat numpy's axis-1 reduction
        mismatches += differ[:, w]
    return (num_perm - mismatches) / num_perm >= threshold


def count_true(eq: np.ndarray) -> np.ndarray:
    """``np.count_nonzero(eq, axis=1)`` for a C-contiguous boolean matrix, ~2x faster by
    counting the bits of 8 booleans at a time when the rows allow it."""
    if eq.shape[1] % 8 == 0 and eq.flags.c_contiguous and hasattr(np, "bitwise_count"):
        return np.bitwise_count(eq.view(np.uint64)).sum(axis=1, dtype=np.int64)
    return np.count_nonzero(eq, axis=1)


def greedy(a: np.ndarray, b: np.ndarray, equal: np.ndarray, num_perm: int,
           near_of: dict[int, tuple[int, float]] | None = None) -> dict[int, tuple[int, float]]:
    """The local rule in input order over confirmed pairs (a < b, repeats allowed): record b is
    removed as a near duplicate of the most similar earlier record a that is still kept (the
    earliest on ties); a record with no kept partner is kept. Adds to and returns ``near_of``:
    removed record -> (kept record, Jaccard).

    This is the datasketch loop's decision: its candidates for b are the earlier kept records
    sharing a bucket, the first maximum of their estimated Jaccard wins if it reaches the
    threshold, and only confirmed pairs can reach it."""
    near_of = {} if near_of is None else near_of
    order = np.lexsort((a, b))
    a_l, b_l, e_l = a[order].tolist(), b[order].tolist(), equal[order].tolist()
    j, total = 0, len(b_l)
    while j < total:
        rec, best, best_eq = b_l[j], -1, -1
        while j < total and b_l[j] == rec:
            if e_l[j] > best_eq and a_l[j] not in near_of:
                best, best_eq = a_l[j], e_l[j]
            j += 1
        if best >= 0:
            near_of[rec] = (best, best_eq / num_perm)
    return near_of


def near_pass(pairs: Callable[[int, int, np.ndarray], list], n: int, num_perm: int,
              block: int | None = None, say: Progress | None = None) -> tuple[dict[int, tuple[int, float]], int]:
    """The near pass over ``n`` records in blocks in input order: ``pairs(lo, hi, removed)``
    gives every index's confirmed pairs of block [lo, hi), told the records removed by the block
    before; :func:`greedy` decides them. Returns (removed record -> (kept record, Jaccard),
    confirmed pairs seen)."""
    block = block or BLOCK_RECORDS
    near_of: dict[int, tuple[int, float]] = {}
    removed = np.empty(0, np.int64)
    confirmed = 0
    every = max(1, (1 << 17) // block)
    for step, lo in enumerate(range(0, n, block)):
        found = pairs(lo, min(n, lo + block), removed)
        a, b, equal = (np.concatenate(x) for x in zip(*found))
        confirmed += len(a)
        before = len(near_of)
        greedy(a, b, equal, num_perm, near_of)  # adds the block's decisions in input order
        removed = np.fromiter(list(near_of)[before:], dtype=np.int64, count=len(near_of) - before)
        if say is not None and step and step % every == 0:
            say(f"near pass: {lo}/{n} records, {confirmed} confirmed pairs, {len(near_of)} near duplicates")
    return near_of, confirmed
