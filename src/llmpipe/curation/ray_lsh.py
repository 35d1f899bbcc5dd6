"""MinHash-LSH confirmed pairs across a Ray cluster (minhash-dedup's shuffle and reduce).

The design follows NeMo Curator's fuzzy dedup (minhash -> LSH buckets -> candidate pairs ->
connected components), with the local engine's exact semantics, on Ray core tasks (no Ray Data
sort shuffle, no executor, stats or autoscaling actors: on a 2-core box they cost more than the
work):

1. Each signing task (``ray_dedup``) splits its batch's LSH band keys into P hash partitions,
   one task return value each (:func:`bucket_partitions`): equal keys land in the same
   partition, so every LSH bucket lies whole in one partition.
2. One reduce task per partition takes partition p of every batch and lists the candidate pairs
   of each bucket, confirmed by signature similarity (:func:`confirmed_pairs`; signatures and
   band keys read from the object store).

What is done with the confirmed pairs (connected components, the greedy in input order) belongs
to the caller.
"""

from __future__ import annotations

import numpy as np

from llmpipe.data.dedup import _range_pairs

__all__ = ["bucket_partitions", "confirmed_pairs"]


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


def confirmed_pairs(entries: list[tuple[np.ndarray, np.ndarray, np.ndarray]], skip: np.ndarray,
                    key_batches: list[np.ndarray], sig_batches: list[np.ndarray], batch: int, rows: int,
                    threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The confirmed pairs of one hash partition (its (key, record, band) entries from every
    batch; records in ``skip`` take no part): (a, b, equal) with a < b, ``equal`` the number of
    equal signature values. ``key_batches``/``sig_batches``: every record's band keys and
    signature, ``batch`` records per array.

    Every pair of records sharing a bucket is a candidate, but a pair sharing several buckets
    is taken only in the first band where its keys are equal (its band keys are compared), so
    each candidate pair is confirmed once, in one partition. It is confirmed when the two
    signatures agree on a whole band (datasketch's bucket rule: a 64-bit key collision never
    adds a pair) and their estimated Jaccard reaches ``threshold``. Candidates are taken in
    blocks of ``_PAIR_BLOCK`` pairs."""
    rec = np.concatenate([e[1] for e in entries])
    keep = ~skip[rec]
    rec = rec[keep]
    key = np.concatenate([e[0] for e in entries])[keep]
    band = np.concatenate([e[2] for e in entries])[keep]
    del keep
    # entries arrive in record order (batches in input order, records ascending in each), so a
    # stable sort by key gives buckets with their records ascending
    order = np.argsort(key, kind="stable")
    key = key[order]
    in_bucket = np.r_[key[1:] == key[:-1], False] | np.r_[False, key[1:] == key[:-1]]
    order = order[in_bucket]  # entries alone in their bucket have no pair
    key = key[in_bucket]
    rec, band = rec[order], band[order]
    del order, in_bucket
    out_a, out_b, out_eq = [], [], []
    if len(key) > 1:
        run_start = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
        run_end = np.r_[run_start[1:], len(key)]
        after = np.repeat(run_end, run_end - run_start) - 1 - np.arange(len(key))
        bands = key_batches[0].shape[1]
        num_perm = sig_batches[0].shape[1]
        for later, first in _range_pairs(np.arange(len(key)) + 1, after):
            k = band[first]
            first_equal = np.argmax(_gather(key_batches, batch, rec[first]) == _gather(key_batches, batch, rec[later]),
                                    axis=1)
            # else: taken in an earlier band, or a 64-bit key collision (across bands or records)
            take = (first_equal == k) & (band[later] == k) & (rec[first] != rec[later])
            x, y = rec[first][take], rec[later][take]
            eq = _gather(sig_batches, batch, x) == _gather(sig_batches, batch, y)
            agree = eq[:, : bands * rows].reshape(len(x), bands, rows).all(axis=2).any(axis=1)
            equal = np.count_nonzero(eq, axis=1)
            ok = agree & (equal / num_perm >= threshold)  # as estimated_jaccard() >= threshold
            out_a.append(x[ok])
            out_b.append(y[ok])
            out_eq.append(equal[ok].astype(np.int32))
    if not out_a:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.int32)
    return np.concatenate(out_a), np.concatenate(out_b), np.concatenate(out_eq)
