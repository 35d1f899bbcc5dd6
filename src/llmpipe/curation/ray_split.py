"""split's contamination check on Ray Data (the split itself is the local engine's code).

Assignment and file bytes are ``llmpipe.data.split``'s (a sort by seeded hash, O(n log n) on
the driver); the contamination check, the part that grows with records x permutations, runs
as ``ray_lsh.similar_pairs`` with train records as the index side and val/test records as the
query side. Every confirmed (query, train) pair is reported in the local engine's order: by
split, query record, then Jaccard descending and train position.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Mapping, Sequence

import numpy as np

from llmpipe.config.data import CurationSection, SplitSection
from llmpipe.curation.ray_lsh import sign_batch, similar_pairs
from llmpipe.curation.ray_runtime import binary, iter_tables, loads, to_dataset
from llmpipe.data.dedup import Progress, lsh_params, near_text, selected_contents
from llmpipe.data.split import SPLITS, SplitResult, contamination_pair, split_records


def _sign_records(table, roles: list[str], num_perm: int, shingle_size: int, bands: int, rows: int,
                  n_train: int):
    import pyarrow as pa

    idx = table.column("i").to_numpy()
    texts = [near_text(selected_contents(r, roles)) for r in loads(table.column("obj"))]
    sig, band = sign_batch(texts, num_perm, shingle_size, bands, rows)
    return pa.table({
        "i": idx, "side": (idx >= n_train).astype(np.int8), "empty": pa.array([not t for t in texts]),
        "sig": binary(row.tobytes() for row in sig), "bands": binary(row.tobytes() for row in band),
    })


def find_contamination_ray(
    splits: Mapping[str, Sequence[Mapping[str, Any]]], cfg: SplitSection, curation: CurationSection,
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """``llmpipe.data.split.find_contamination`` on Ray (same pairs, same order)."""
    num_perm, k = cfg.contamination_num_perm, cfg.contamination_shingle_size
    bands, rows = lsh_params(cfg.contamination_threshold, num_perm)
    train = splits["train"]
    items = [r for s in SPLITS for r in splits[s]]  # train, then val, then test
    n = len(items)
    signed = to_dataset(items, curation.batch_size).map_batches(
        _sign_records, batch_size=curation.batch_size, batch_format="pyarrow", udf_modifying_row_count=False,
        concurrency=curation.workers,
        fn_kwargs={"roles": list(cfg.contamination_roles), "num_perm": num_perm, "shingle_size": k,
                   "bands": bands, "rows": rows, "n_train": len(train)}).materialize()
    sig = np.empty((n, num_perm), dtype=np.uint32)
    empty = np.zeros(n, dtype=bool)
    for t in iter_tables(signed.select_columns(["i", "sig", "empty"])):
        i = t.column("i").to_numpy()
        sig[i] = np.frombuffer(b"".join(t.column("sig").to_pylist()), dtype=np.uint32).reshape(len(i), -1)
        empty[i] = t.column("empty").to_numpy(zero_copy_only=False)
    a, b, sims = similar_pairs(signed, sig, empty, bands, rows, cfg.contamination_threshold, curation, cross=True)
    hits: dict[int, list[tuple[float, int]]] = defaultdict(list)
    for c, q, s in zip(a.tolist(), b.tolist(), sims.tolist()):
        hits[q].append((s, c))
    pairs: list[dict[str, Any]] = []
    start = len(train)
    for name in SPLITS[1:]:
        recs = splits[name]
        for j, rec in enumerate(recs):
            for jac, c in sorted(hits.get(start + j, ()), key=lambda t: (-t[0], t[1])):
                pairs.append(contamination_pair(name, rec, train[c], jac, cfg))
        start += len(recs)
        if progress is not None:
            progress(f"contamination check {name}: {len(recs)} records vs {len(train)} train (Ray)")
    return pairs


def split_records_ray(
    records: Sequence[Mapping[str, Any]], cfg: SplitSection, curation: CurationSection,
    progress: Progress | None = None,
) -> SplitResult:
    """``llmpipe.data.split.split_records`` with the contamination check on Ray."""
    def check(splits, cfg, progress=None):
        return find_contamination_ray(splits, cfg, curation, progress)

    return split_records(records, cfg, progress, contamination_check=check)
