"""minhash-dedup on Ray, streaming, with the local engine's bytes.

The input (a records file or a shard directory) is read twice by the driver, as by the local
``llmpipe.data.dedup.dedup_file``, and never held whole: the driver keeps per record only its
32-byte exact-key digest (a memory-mapped file) and two flags; signatures and band keys live in
Ray's object store.

1. Signing, on the cluster (Ray core tasks, ``curation.workers`` batches in flight at most
   twice over): a batch of ``curation.batch_size`` input lines in, per record the exact-key
   digest, the MinHash signature, its low bytes and the LSH band keys out (``_sign_lines``, the
   local engine's ``_Signer``). The band keys come back split into P = ``curation.workers``
   hash partitions, one task return value each (``lsh_index.bucket_partitions``): the shuffle.
2. Exact duplicates on the driver: a sort of the digests (``dedup.decisions``).
3. P actors, one per partition, each holding the local engine's ``lsh_index.BucketIndex`` over
   its entries: every LSH bucket lies whole in one of them. The near pass
   (``lsh_index.near_pass``, as locally) runs in blocks of records in input order: each actor
   returns the block's confirmed pairs in its buckets -- a block record and an earlier record
   not removed -- prefiltered on the signatures' low bytes and confirmed on the full signatures
   (read zero-copy from the object store).
4. The driver runs the local rule over the block's confirmed pairs (``lsh_index.greedy``): a
   record joins the most similar earlier *kept* record it is paired with (earliest on ties),
   else it is kept; the block's removed records leave the actors' indexes before the next
   block. The index, the candidates and the rule are the local engine's, so the decisions,
   Jaccards and clusters are its.
   (The issue's design groups confirmed pairs into connected components instead; keeping one
   record per component differs from the local rule on chains -- A~B, B~C, A!~C keeps A and C
   locally -- and pairing every two records of a bucket grows with the square of a family's
   size: on the benchmark corpus 3.6k confirmed pairs at 10k records, 362k at 100k.)
5. Pass 2 (``dedup.write_kept``, as locally) streams the input again and writes the kept
   records, the clusters and the metrics.

Ray core tasks, not Ray Data: the earlier Ray Data version (records in a list on the driver,
``map_batches``, a sort shuffle of one row per record and band) took 274 s for 100k records on
the 2-core box where the local engine took 114 s; its executor, stats and autoscaling actors
alone cost ~20-30% of a core there.
"""

from __future__ import annotations

import os
import tempfile
from collections import deque
from typing import Any

import numpy as np

from llmpipe.config.data import CurationSection, DedupSection
from llmpipe.curation.ray_runtime import library_errors
from llmpipe.data import records as canonical
from llmpipe.data.dedup import DedupError, Progress, _Columns, _Signer, decisions, lsh_params, write_kept
from llmpipe.data.lsh_index import BucketIndex, bucket_partitions, near_pass
from llmpipe.io import jsonl_line

_HINT = " (did the previous stage run?)"


def _sign_lines(first: int, lines: list[str], where: list[tuple[str, int]], cfg: DedupSection, parts: int):
    """Signing task: parse the lines (errors name file and line), then per record the exact-key
    digest, whether it has text, whether the line is in the pipeline's own spelling, the
    signature and its low bytes, and the band keys in ``parts`` hash partitions."""
    signer = _Signer(cfg, None, lambda _msg: None)
    signer.n = first  # record numbers in error messages are input positions
    canon = np.empty(len(lines), dtype=bool)
    for j, ((file, lineno), line) in enumerate(zip(where, lines)):
        rec = canonical.parse_record(file, lineno, line, DedupError, require_id=True)
        canon[j] = jsonl_line(rec) == line
        signer.add(rec)
    signer.flush()
    cols = signer.cols
    keys = np.stack([cols.get(f"band{k}") for k in range(signer.bands)], axis=1)
    meta = (cols.get("key"), cols.get("empty"), canon)
    return (meta, cols.get("sig"), cols.get("sig8"), *bucket_partitions(first, keys, parts))


def _batches(path, size: int):
    lines: list[str] = []
    where: list[tuple[str, int]] = []
    for file, lineno, line in canonical.iter_record_lines(path, DedupError, missing_hint=_HINT):
        lines.append(line)
        where.append((file, lineno))
        if len(lines) >= size:
            yield lines, where
            lines, where = [], []
    if lines:
        yield lines, where


def dedup_file_ray(
    path: str | os.PathLike[str], out_records: str | os.PathLike[str], cfg: DedupSection,
    curation: CurationSection, shards: int = 1, progress: Progress | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``llmpipe.data.dedup.dedup_file`` on Ray (inside a Ray session): the same kept records
    (written to ``out_records``), clusters and metrics, in memory bounded by the batch on the
    driver. Returns ``(clusters, metrics)``."""
    import ray

    say = progress or (lambda _msg: None)
    parts = max(1, curation.workers)
    bands, rows = lsh_params(cfg.threshold, cfg.num_perm)
    sign = ray.remote(num_cpus=1)(_sign_lines).options(num_returns=3 + parts)
    out_dir = os.path.dirname(os.path.abspath(out_records))
    os.makedirs(out_dir, exist_ok=True)
    with library_errors(DedupError), tempfile.TemporaryDirectory(prefix=".dedup-", suffix=".tmp", dir=out_dir) as work:
        cols = _Columns(work)  # digests and flags, memory-mapped
        sig_refs: list[Any] = []  # per batch: signatures, their low bytes, band-key partitions
        sig8_refs: list[Any] = []
        part_refs: list[list[Any]] = []
        batches = 0
        cfg_ref = ray.put(cfg)
        in_flight: deque = deque()
        n = 0

        def collect() -> None:
            refs = in_flight.popleft()
            digest, empty, canon = ray.get(refs[0])
            cols.add("key", digest)
            cols.add("empty", empty)
            cols.add("canon", canon)
            sig_refs.append(refs[1])
            sig8_refs.append(refs[2])
            part_refs.append(refs[3:])

        for lines, where in _batches(path, curation.batch_size):
            batches += 1
            in_flight.append(sign.remote(n, lines, where, cfg_ref, parts))
            n += len(lines)
            while len(in_flight) >= 2 * parts:
                collect()
        while in_flight:
            collect()
        say(f"signatures: {n} records in {batches} batches, LSH {bands} bands x {rows} rows, {parts} partitions")

        def near(skip: np.ndarray) -> dict[int, tuple[int, float]]:
            skip_ref = ray.put(np.asarray(skip))
            # no CPU reserved for the actors' lifetime (P may exceed the CPUs): spread over the nodes
            actor = ray.remote(num_cpus=0, scheduling_strategy="SPREAD")(BucketIndex)
            index = [actor.remote(
                skip_ref, sig8_refs, sig_refs, curation.batch_size, bands, rows, float(cfg.threshold),
                *[p[k] for p in part_refs]) for k in range(parts)]
            try:
                ray.get([ix.pairs.remote(0, 0, np.empty(0, np.int64)) for ix in index])  # built:
                part_refs.clear()  # their partitions copied, the object store frees them
                near_of, confirmed = near_pass(
                    lambda lo, hi, removed: ray.get([ix.pairs.remote(lo, hi, removed) for ix in index]),
                    n, cfg.num_perm, say=say)
            finally:
                for ix in index:
                    ray.kill(ix)
            say(f"near pass: {confirmed} confirmed pairs, {len(near_of)} near duplicates")
            return near_of

        if n == 0:
            d = decisions(np.empty((0, 32), np.uint8), np.empty(0, bool), near, say)
            canon = np.empty(0, bool)
        else:
            d = decisions(cols.get("key"), cols.get("empty"), near, say)
            canon = np.array(cols.get("canon"))
        for refs in (sig_refs, sig8_refs, part_refs):  # the object store frees them
            refs.clear()
    return write_kept(path, out_records, cfg, d, canon, shards, say)
