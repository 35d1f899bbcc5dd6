"""MinHash-LSH similar pairs on Ray Data (minhash-dedup, and split's contamination check).

The design follows NeMo Curator's fuzzy dedup (minhash -> LSH buckets -> edges -> connected
components), with the local engine's exact semantics:

1. ``sign_batch`` (in ``map_batches``): MinHash signatures (``llmpipe.data.dedup``'s numpy
   signatures, equal to datasketch's) and one 64-bit key per LSH band (band index and the band's
   ``rows`` hash values).
2. Band keys are grouped across the cluster: a hash shuffle on the key (``repartition(keys=...,
   sort=True)``, the shuffle Ray's own ``groupby().map_groups()`` runs) puts every bucket in one
   block, where ``_bucket_pairs`` lists the candidate pairs of each bucket with numpy.
3. ``_confirm`` (in ``map_batches``, signatures from the object store) keeps a pair only if the
   two signatures agree on a whole band (datasketch's bucket test, so a 64-bit key collision
   never adds a pair) and their estimated Jaccard reaches the threshold.

What is done with the confirmed pairs (connected components, greedy in input order) belongs to
the caller: ``ray_dedup`` and ``ray_split``.
"""

from __future__ import annotations

import numpy as np

from llmpipe.config.data import CurationSection
from llmpipe.curation.ray_runtime import group_blocks, iter_tables
from llmpipe.data.dedup import _range_pairs, band_keys, minhash_signatures

__all__ = ["band_keys", "bucket_partitions", "confirmed_pairs", "sign_batch", "similar_pairs"]


def sign_batch(texts: list[str], num_perm: int, shingle_size: int, bands: int, rows: int):
    """Signatures (uint32[n, num_perm]) and band keys (int64[n, bands]) of ``texts``."""
    sig = minhash_signatures(texts, num_perm, shingle_size)
    return sig, band_keys(sig, bands, rows)


def _explode(table, skip: list, bands: int):
    """One row per (record, band): {bucket, i, side}; records marked in ``skip`` take no part."""
    import pyarrow as pa

    skip_mask = _cached(skip[0])
    i = table.column("i").to_numpy()
    keep = ~skip_mask[i]
    i = i[keep]
    keys = np.frombuffer(b"".join(table.column("bands").to_pylist()), dtype=np.int64).reshape(-1, bands)[keep]
    side = table.column("side").to_numpy()[keep]
    return pa.table({"bucket": keys.reshape(-1), "i": np.repeat(i, bands), "side": np.repeat(side, bands)})


def _bucket_pairs(table, cross: bool):
    """Candidate pairs (a < b, or index a x query b when ``cross``) of every bucket in the block
    (the block holds whole buckets, sorted by key)."""
    import pyarrow as pa

    bucket = table.column("bucket").to_numpy()
    i = table.column("i").to_numpy()
    side = table.column("side").to_numpy()
    order = np.lexsort((i, bucket))
    bucket, i, side = bucket[order], i[order], side[order]
    a_parts, b_parts = [], []
    if len(bucket) > 1:
        starts = np.flatnonzero(np.r_[True, bucket[1:] != bucket[:-1]])
        sizes = np.diff(np.r_[starts, len(bucket)])
        for s, size in zip(starts[sizes > 1], sizes[sizes > 1]):
            members, sides = i[s:s + size], side[s:s + size]
            if cross:
                idx, qry = members[sides == 0], members[sides == 1]
                a_parts.append(np.repeat(idx, len(qry)))
                b_parts.append(np.tile(qry, len(idx)))
            else:
                x, y = np.triu_indices(size, k=1)
                a_parts.append(members[x])
                b_parts.append(members[y])
    a = np.concatenate(a_parts) if a_parts else np.empty(0, np.int64)
    b = np.concatenate(b_parts) if b_parts else np.empty(0, np.int64)
    return pa.table({"a": a.astype(np.int64), "b": b.astype(np.int64)})


def _confirm(table, sigs: list, bands: int, rows: int, threshold: float):
    """Pairs that share a whole band and have estimated Jaccard >= threshold, with it."""
    import pyarrow as pa

    sig = _cached(sigs[0])
    a = table.column("a").to_numpy()
    b = table.column("b").to_numpy()
    eq = sig[a] == sig[b]
    same_band = eq[:, : bands * rows].reshape(len(a), bands, rows).all(axis=2).any(axis=1)
    sim = np.count_nonzero(eq, axis=-1) / sig.shape[-1]  # as llmpipe.data.dedup.estimated_jaccard
    ok = same_band & (sim >= threshold)
    return pa.table({"a": a[ok], "b": b[ok], "sim": sim[ok]})


_CACHE: dict[str, np.ndarray] = {}


def _cached(ref) -> np.ndarray:
    """An array from the object store, fetched once per worker process (zero-copy)."""
    import ray

    key = ref.hex()
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = ray.get(ref)
    return _CACHE[key]


def similar_pairs(signed, sig: np.ndarray, skip: np.ndarray, bands: int, rows: int, threshold: float,
                  curation: CurationSection, cross: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Confirmed pairs among the rows of ``signed`` (columns i, side, bands): arrays (a, b, sim),
    unique, sorted by (a, b). ``sig`` holds every row's signature by ``i``; rows with ``skip[i]``
    take no part; ``cross``: only pairs of an index row (side 0) and a query row (side 1)."""
    import ray

    sig_ref, skip_ref = ray.put(sig), ray.put(skip)
    pairs = (
        group_blocks(signed.map_batches(_explode, batch_size=None, batch_format="pyarrow",
                                        fn_kwargs={"skip": [skip_ref], "bands": bands}), "bucket")
        
        .map_batches(_bucket_pairs, batch_size=None, batch_format="pyarrow", fn_kwargs={"cross": cross})
        .map_batches(_confirm, batch_size=curation.batch_size * 16, batch_format="pyarrow",
                     fn_kwargs={"sigs": [sig_ref], "bands": bands, "rows": rows, "threshold": float(threshold)})
    )
    a_all, b_all, s_all = [], [], []
    for t in iter_tables(pairs):
        a_all.append(t.column("a").to_numpy())
        b_all.append(t.column("b").to_numpy())
        s_all.append(t.column("sim").to_numpy())
    if not a_all:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float64)
    a, b, s = np.concatenate(a_all), np.concatenate(b_all), np.concatenate(s_all)
    _, first = np.unique(np.stack([a, b], axis=1), axis=0, return_index=True)  # a pair recurs per shared band
    return a[first], b[first], s[first]


# --------------------------------------------------------------------------- Ray core: hash partitions
#
# minhash-dedup's shuffle, without Ray Data: each signing task returns its batch's band keys
# split into P hash partitions (``bucket_partitions``, one task return value each), and P reduce
# tasks each take partition p of every batch, so that every LSH bucket lies whole in one task
# (``confirmed_pairs``). No sort shuffle, no executor or stats actors.


def bucket_partitions(first: int, keys: np.ndarray, parts: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The band keys ``keys`` (``int64[n, bands]``, records ``first``..``first + n - 1``) as
    ``parts`` hash partitions of (key, record, band) entries: equal keys land in the same
    partition."""
    n, bands = keys.shape
    flat = np.ascontiguousarray(keys).reshape(-1)
    ids = np.repeat(np.arange(first, first + n, dtype=np.int64), bands)
    band = np.tile(np.arange(bands, dtype=np.uint8), n)
    part = (flat.view(np.uint64) >> np.uint64(33)) % np.uint64(parts)  # keys are hashes already
    order = np.argsort(part, kind="stable")
    bounds = np.searchsorted(part[order], np.arange(parts + 1, dtype=np.uint64))
    return [(flat[order[s:e]], ids[order[s:e]], band[order[s:e]]) for s, e in zip(bounds[:-1], bounds[1:])]


def _gather(batches: list[np.ndarray], batch: int, ids: np.ndarray) -> np.ndarray:
    """Rows ``ids`` of per-batch arrays (batch j holds the rows ``j * batch`` ...)."""
    out = np.empty((len(ids), *batches[0].shape[1:]), dtype=batches[0].dtype)
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
    key = np.concatenate([e[0] for e in entries])
    rec = np.concatenate([e[1] for e in entries])
    band = np.concatenate([e[2] for e in entries])
    keep = ~skip[rec]
    key, rec, band = key[keep], rec[keep], band[keep]
    order = np.lexsort((rec, key))  # buckets, records ascending in each
    key, rec, band = key[order], rec[order], band[order]
    del order, keep
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
            take = (first_equal == k) & (band[later] == k)  # else: taken in an earlier band, or a key collision
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
