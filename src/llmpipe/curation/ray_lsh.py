"""MinHash-LSH confirmed pairs across a Ray cluster (minhash-dedup's shuffle and reduce).

The design follows NeMo Curator's fuzzy dedup (minhash -> LSH buckets -> candidate pairs ->
connected components), with the local engine's exact semantics, on Ray core tasks (no Ray Data
sort shuffle, no executor, stats or autoscaling actors: on a 2-core box they cost more than the
work):

1. Each signing task (``ray_dedup``) splits its batch's LSH band keys into P hash partitions,
   one task return value each (:func:`bucket_partitions`): equal keys land in the same
   partition, so every LSH bucket lies whole in one partition.
2. One actor per partition (:class:`BucketIndex`) holds its buckets for the near pass and
   returns, block by block in input order, the local engine's candidate pairs in them (a
   block record and an earlier kept record, or two block records), confirmed by signature
   similarity (signatures and band keys read from the object store).

The greedy over the confirmed pairs (the local rule) belongs to the caller (``ray_dedup``).
"""

from __future__ import annotations

import numpy as np

from llmpipe.data.dedup import _range_pairs

__all__ = ["BucketIndex", "bucket_partitions"]


def bucket_partitions(first: int, keys: np.ndarray, parts: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The band keys ``keys`` (``int64[n, bands]``, records ``first``..``first + n - 1``) as
    ``parts`` hash partitions of (key, record, band) entries: equal keys land in the same
    partition."""
    n, bands = keys.shape
    flat = np.ascontiguousarray(keys).reshape(-1)
    ids = np.repeat(np.arange(first, first + n, dtype=np.int32 if first + n < 2**31 else np.int64), bands)
    band = np.tile(np.arange(bands, dtype=np.uint16), n)
    part = (flat.view(np.uint64) >> np.uint64(33)) % np.uint64(parts)  # keys are hashes already
    order = np.argsort(part, kind="stable")
    bounds = np.searchsorted(part[order], np.arange(parts + 1, dtype=np.uint64))
    return [(flat[order[s:e]], ids[order[s:e]], band[order[s:e]]) for s, e in zip(bounds[:-1], bounds[1:])]


def _gather(batches: list[np.ndarray], batch: int, ids: np.ndarray) -> np.ndarray:
    """Rows ``ids`` of per-batch arrays (batch j holds the rows ``j * batch`` ...)."""
    out = np.empty((len(ids), *batches[0].shape[1:]), dtype=batches[0].dtype)
    if not len(ids):
        return out
    which = ids // batch
    order = np.argsort(which, kind="stable")
    w = which[order]
    bounds = np.flatnonzero(np.r_[True, w[1:] != w[:-1], True])
    for s, e in zip(bounds[:-1], bounds[1:]):
        sel = order[s:e]
        j = int(w[s])
        out[sel] = batches[j][ids[sel] - j * batch]
    return out


def _fetch(items: list) -> list[np.ndarray]:
    """Arrays from the object store (a list of refs), or the arrays themselves (no Ray)."""
    if items and not isinstance(items[0], np.ndarray):
        import ray

        return ray.get(items)
    return items


class BucketIndex:
    """One hash partition of the LSH buckets, held by a Ray actor for the whole near pass: the
    local engine's per-band index of kept records (``dedup.near_duplicates``), spread over P
    actors by band key.

    The near pass runs in blocks of records in input order. For a block, :meth:`pairs` returns
    the confirmed pairs (a, b) with b in the block and a an earlier record sharing a bucket that
    is still kept (records removed so far have been dropped) or in the block -- exactly the local
    engine's candidates. A pair sharing several buckets is taken only in the first band where
    its keys are equal (its band keys are compared), so its signatures are compared once, in
    one partition; it is confirmed when the signatures agree on a whole band (datasketch's
    bucket rule: a 64-bit key collision never adds a pair) and the estimated Jaccard reaches
    ``threshold``, in blocks of ``_PAIR_BLOCK`` candidates. The caller runs the greedy over the
    block's pairs and names the block's removed records in the next call."""

    def __init__(self, skip: np.ndarray, refs: list, batch: int, rows: int, threshold: float, *entries):
        rec = np.concatenate([e[1] for e in entries])
        keep = ~skip[rec]
        rec = rec[keep]
        key = np.concatenate([e[0] for e in entries])[keep]
        band = np.concatenate([e[2] for e in entries])[keep]
        del keep
        order = np.argsort(key, kind="stable")  # entries come in record order: buckets, records ascending
        key = key[order]
        shared = np.r_[key[1:] == key[:-1], False] | np.r_[False, key[1:] == key[:-1]]
        order = order[shared]  # an entry alone in its bucket never pairs
        self.key, self.rec, self.band = key[shared], rec[order], band[order]
        self.removed = np.zeros(len(skip), dtype=bool)
        self.keys, self.sigs = _fetch(refs[0]), _fetch(refs[1])  # zero-copy from the object store
        self.batch, self.rows, self.threshold = batch, rows, threshold

    def pairs(self, lo: int, hi: int, removed: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if len(removed):  # removed records leave the index, as in the local engine
            self.removed[removed] = True
            live = ~self.removed[self.rec]
            self.key, self.rec, self.band = self.key[live], self.rec[live], self.band[live]
        key, rec, band = self.key, self.rec, self.band
        out_a, out_b, out_eq = [], [], []
        in_block = np.flatnonzero((rec >= lo) & (rec < hi))
        if len(in_block):
            run_start = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
            start_of = run_start[np.searchsorted(run_start, in_block, side="right") - 1]
            bands = self.keys[0].shape[1]
            num_perm = self.sigs[0].shape[1]
            # earlier entries of each block entry's bucket: kept records before the block, block records
            for partner, query in _range_pairs(start_of, in_block - start_of):
                first, later = partner, in_block[query]
                k = band[later]
                x, y = rec[first], rec[later]
                first_equal = np.argmax(_gather(self.keys, self.batch, x) == _gather(self.keys, self.batch, y), axis=1)
                # else: taken in an earlier band, or a 64-bit key collision (across bands or records)
                take = (first_equal == k) & (band[first] == k) & (x != y)
                x, y = x[take], y[take]
                eq = _gather(self.sigs, self.batch, x) == _gather(self.sigs, self.batch, y)
                agree = eq[:, : bands * self.rows].reshape(len(x), bands, self.rows).all(axis=2).any(axis=1)
                equal = np.count_nonzero(eq, axis=1)
                ok = agree & (equal / num_perm >= self.threshold)  # as estimated_jaccard() >= threshold
                out_a.append(x[ok])
                out_b.append(y[ok])
                out_eq.append(equal[ok].astype(np.int32))
        if not out_a:
            return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.int32)
        return np.concatenate(out_a), np.concatenate(out_b), np.concatenate(out_eq)
