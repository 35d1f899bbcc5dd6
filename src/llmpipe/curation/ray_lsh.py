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
from llmpipe.data.dedup import band_keys, minhash_signatures

__all__ = ["band_keys", "sign_batch", "similar_pairs"]


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
