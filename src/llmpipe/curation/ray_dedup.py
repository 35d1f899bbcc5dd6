"""minhash-dedup on Ray, streaming, with the local engine's bytes.

The input (a records file or a shard directory) is read twice by the driver, as by the local
``llmpipe.data.dedup.dedup_file``, and never held whole: the driver keeps per record only its
32-byte exact-key digest, two flags and the signature with its low bytes (memory-mapped files);
for the near pass the signatures go to Ray's object store as one object each.

1. Signing, on the cluster (Ray core tasks, ``curation.workers`` batches in flight at most
   twice over): a batch of ``curation.batch_size`` input lines in, per record the exact-key
   digest, the MinHash signature, its low bytes, the LSH band keys and its id and source (for
   the cluster report, spooled to a file by the driver) out (``_sign_lines``, the local
   engine's ``_Signer``). The band keys come back split into P = ``curation.workers``
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
from llmpipe.data.dedup_report import source_line, source_spool
from llmpipe.data.lsh_index import BucketIndex, bucket_partitions, low_bit_codes, near_pass
from llmpipe.io import jsonl_line

_HINT = " (did the previous stage run?)"


def _sign_lines(first: int, lines: list[str], where: list[tuple[str, int]], cfg: DedupSection, parts: int):
    """Signing task: parse the lines (errors name file and line), then per record the exact-key
    digest, whether it has text, whether the line is in the pipeline's own spelling, the
    signature and its low bytes, and the band keys in ``parts`` hash partitions."""
    signer = _Signer(cfg, None, lambda _msg: None)
    signer.n = first  # record numbers in error messages are input positions
    canon = np.empty(len(lines), dtype=bool)
    sources = []
    for j, ((file, lineno), line) in enumerate(zip(where, lines)):
        rec = canonical.parse_record(file, lineno, line, DedupError, require_id=True)
        canon[j] = jsonl_line(rec) == line
        signer.add(rec)
        sources.append(source_line(rec))
    signer.flush()
    cols = signer.cols
    keys = np.stack([cols.get(f"band{k}") for k in range(signer.bands)], axis=1)
    meta = (cols.get("key"), cols.get("empty"), canon, b"".join(sources), np.array([len(s) for s in sources], np.int64))
    return (meta, cols.get("sig"), cols.get("sig8"), *bucket_partitions(first, keys, parts))


class PartitionIndex:
    """Ray actor: one hash partition of the LSH buckets. Its entries arrive batch by batch while
    the input is signed (:meth:`add`, in batch order), the index is built once the exact pass
    has named the records to skip (:meth:`build`), then it answers the near pass
    (:meth:`pairs`). Entries never accumulate in the object store: each batch's partition is
    freed once added."""

    def __init__(self) -> None:
        self.entries: list[tuple[np.ndarray, np.ndarray]] = []
        self.index: BucketIndex | None = None

    def add(self, entries: tuple[np.ndarray, np.ndarray]) -> None:
        key, rec = entries
        self.entries.append((key.copy(), rec.copy()))  # out of the object store: it frees the batch

    def build(self, skip: np.ndarray, sig8: np.ndarray, sig: np.ndarray, sig2: np.ndarray, bands: int, rows: int,
              threshold: float) -> int:
        entries, self.entries = self.entries, []
        self.index = BucketIndex(skip, sig8, sig, bands, rows, threshold, entries, sig2)
        return len(self.index.key)

    def pairs(self, lo: int, hi: int, removed: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        assert self.index is not None
        return self.index.pairs(lo, hi, removed)


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
    with source_spool(out_dir) as sources:  # every record's id and source, for the cluster report
        with library_errors(DedupError), tempfile.TemporaryDirectory(prefix=".dedup-", suffix=".tmp", dir=out_dir) as work:
            cols = _Columns(work)  # digests, flags and signatures, memory-mapped
            batches = 0
            cfg_ref = ray.put(cfg)
            in_flight: deque = deque()
            n = 0
            # no CPU reserved for the actors' lifetime (P may exceed the CPUs): spread over the nodes
            index = [ray.remote(num_cpus=0, scheduling_strategy="SPREAD")(PartitionIndex).remote()
                     for _ in range(parts)]

            def collect() -> None:
                refs = in_flight.popleft()
                (digest, empty, canon, source_lines, source_lengths), sig, sig8 = ray.get(refs[:3])
                sources.extend(source_lines, source_lengths)
                cols.add("key", digest)
                cols.add("empty", empty)
                cols.add("canon", canon)
                cols.add("sig", sig)
                cols.add("sig8", sig8)
                del sig, sig8  # the object store frees the batch's copies
                for ix, part in zip(index, refs[3:]):  # in batch order: records ascending in each index
                    ix.add.remote(part)

            def near(skip: np.ndarray) -> dict[int, tuple[int, float]]:
                skip_ref = ray.put(np.asarray(skip))
                # the signatures as one object each, put once the batches' objects are freed: the
                # object store's high-water mark stays near their size (signatures kept per batch
                # among the short-lived batch arguments took 2.5x their size in /dev/shm)
                sig8_ref = ray.put(np.asarray(cols.get("sig8")))
                sig_ref = ray.put(np.asarray(cols.get("sig")))  # held here until the near pass ends: the
                # actors read them zero-copy
                sig2_ref = ray.put(low_bit_codes(cols.get("sig8")))  # one copy per node, not per actor
                entries = ray.get([ix.build.remote(skip_ref, sig8_ref, sig_ref, sig2_ref, bands, rows,
                                                   float(cfg.threshold)) for ix in index])
                say(f"near pass: {sum(entries)} shared-bucket entries in {parts} partitions")
                near_of, confirmed = near_pass(
                    lambda lo, hi, removed: ray.get([ix.pairs.remote(lo, hi, removed) for ix in index]),
                    n, cfg.num_perm, say=say)
                say(f"near pass: {confirmed} confirmed pairs, {len(near_of)} near duplicates")
                return near_of

            try:
                for lines, where in _batches(path, curation.batch_size):
                    batches += 1
                    in_flight.append(sign.remote(n, lines, where, cfg_ref, parts))
                    n += len(lines)
                    while len(in_flight) >= 2 * parts:
                        collect()
                while in_flight:
                    collect()
                say(f"signatures: {n} records in {batches} batches, LSH {bands} bands x {rows} rows, {parts} partitions")
                if n == 0:
                    d = decisions(np.empty((0, 32), np.uint8), np.empty(0, bool), near, say)
                    canon = np.empty(0, bool)
                else:
                    d = decisions(cols.get("key"), cols.get("empty"), near, say)
                    canon = np.array(cols.get("canon"))
            finally:
                for ix in index:
                    ray.kill(ix)
        return write_kept(path, out_records, cfg, d, canon, sources, shards, say)
