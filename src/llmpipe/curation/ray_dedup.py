"""minhash-dedup on Ray Data, with the local engine's clusters.

1. ``map_batches``: each record's exact key (normalised content), near-duplicate text, MinHash
   signature and LSH band keys (``ray_lsh.sign_batch``).
2. Exact duplicates: a hash shuffle on the exact key; in each group the first record (input
   order) is the representative, the others its exact copies.
3. Near duplicates among the representatives: ``ray_lsh.similar_pairs`` (band keys grouped
   across the cluster, candidate pairs confirmed by signature similarity).
4. Connected components over the confirmed pairs; in each component the local engine's rule,
   in input order: a record joins the most similar earlier *kept* record it is paired with
   (earliest on ties), else it is kept. A record's candidates in the local engine are exactly
   the earlier kept records sharing an LSH bucket, and only a confirmed pair can win, so the
   decisions, Jaccards and clusters are the local engine's. Only records with a confirmed pair
   reach this step, so it runs on the driver.
5. ``llmpipe.data.dedup.assemble`` writes the clusters and metrics, as locally.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Mapping, Sequence

import numpy as np

from llmpipe.config.data import CurationSection, DedupSection
from llmpipe.curation.ray_lsh import sign_batch, similar_pairs
from llmpipe.curation.ray_runtime import binary, group_blocks, iter_tables, library_errors, loads, to_dataset
from llmpipe.data.dedup import DedupError, Progress, assemble, exact_key, lsh_params, near_text, selected_contents


def _sign_records(table, cfg: DedupSection, bands: int, rows: int):
    import pyarrow as pa

    idx = table.column("i").to_pylist()
    keys, texts = [], []
    for i, rec in zip(idx, loads(table.column("obj"))):
        contents = selected_contents(rec, cfg.roles, i)
        keys.append(exact_key(contents))
        texts.append(near_text(contents))
    sig, band = sign_batch(texts, cfg.num_perm, cfg.shingle_size, bands, rows)
    return pa.table({
        "i": table.column("i"), "key": pa.array(keys, pa.string()),
        "empty": pa.array([not t for t in texts], pa.bool_()), "side": np.zeros(len(idx), np.int8),
        "sig": binary(row.tobytes() for row in sig), "bands": binary(row.tobytes() for row in band),
    })


def _exact_groups(table):
    """(rep, copy) rows for every exact group with copies; the block holds whole groups."""
    import pyarrow as pa

    key = np.array(table.column("key").to_pylist(), dtype=object)
    i = table.column("i").to_numpy()
    reps, copies = [], []
    if len(i):
        order = sorted(range(len(i)), key=lambda j: (key[j], i[j]))
        prev, rep = None, -1
        for j in order:
            if key[j] != prev:
                prev, rep = key[j], int(i[j])
            else:
                reps.append(rep)
                copies.append(int(i[j]))
    return pa.table({"rep": pa.array(reps, pa.int64()), "copy": pa.array(copies, pa.int64())})


def _greedy(components: Mapping[int, list[int]], edges: Mapping[int, list[tuple[int, float]]]
            ) -> dict[int, tuple[int, float]]:
    """Per component, in input order: join the most similar earlier kept record (earliest on
    ties) or stay kept. Returns removed record -> (kept record, Jaccard)."""
    near_of: dict[int, tuple[int, float]] = {}
    for members in components.values():
        for b in sorted(members):
            best = None
            for a, sim in sorted(edges.get(b, ())):
                if a not in near_of and (best is None or sim > best[1]):
                    best = (a, sim)
            if best is not None:
                near_of[b] = best
    return near_of


def dedup_records_ray(
    records: Sequence[Mapping[str, Any]], cfg: DedupSection, curation: CurationSection,
    progress: Progress | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """``llmpipe.data.dedup.dedup_records`` on Ray: (kept records, clusters, metrics)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    say = progress or (lambda _msg: None)
    n = len(records)
    bands, rows = lsh_params(cfg.threshold, cfg.num_perm)
    with library_errors(DedupError):
        signed = to_dataset(records, curation.batch_size).map_batches(
            _sign_records, batch_size=curation.batch_size, batch_format="pyarrow", udf_modifying_row_count=False,
        concurrency=curation.workers,
            fn_kwargs={"cfg": cfg, "bands": bands, "rows": rows}).materialize()
    say(f"signatures: {n} records, {cfg.num_perm} permutations, LSH {bands} bands x {rows} rows")

    exact_copies: dict[int, list[int]] = defaultdict(list)
    grouped = group_blocks(signed.select_columns(["i", "key"]), "key")
    for t in iter_tables(grouped.map_batches(_exact_groups, batch_size=None, batch_format="pyarrow")):
        for rep, copy in zip(t.column("rep").to_pylist(), t.column("copy").to_pylist()):
            exact_copies[rep].append(copy)
    for copies in exact_copies.values():
        copies.sort()
    is_copy = np.zeros(n, dtype=bool)
    for copies in exact_copies.values():
        is_copy[copies] = True
    say(f"exact pass: {int(is_copy.sum())} exact duplicates")

    sig = np.empty((n, cfg.num_perm), dtype=np.uint32)
    empty = np.zeros(n, dtype=bool)
    for t in iter_tables(signed.select_columns(["i", "sig", "empty"])):
        i = t.column("i").to_numpy()
        sig[i] = np.frombuffer(b"".join(t.column("sig").to_pylist()), dtype=np.uint32).reshape(len(i), -1)
        empty[i] = t.column("empty").to_numpy(zero_copy_only=False)
    a, b, sims = similar_pairs(signed, sig, is_copy | empty, bands, rows, cfg.threshold, curation)

    nodes = np.unique(np.concatenate([a, b]))
    edges: dict[int, list[tuple[int, float]]] = defaultdict(list)
    for x, y, s in zip(a.tolist(), b.tolist(), sims.tolist()):
        edges[y].append((x, s))  # x < y: y may join x
    components: dict[int, list[int]] = defaultdict(list)
    if len(nodes):
        pos = {int(v): k for k, v in enumerate(nodes)}
        graph = coo_matrix((np.ones(len(a)), ([pos[int(x)] for x in a], [pos[int(y)] for y in b])),
                           shape=(len(nodes), len(nodes)))
        _, label = connected_components(graph, directed=False)
        for node, comp in zip(nodes.tolist(), label.tolist()):
            components[comp].append(node)
    near_of = _greedy(components, edges)
    say(f"near pass: {len(a)} confirmed pairs in {len(components)} connected components, "
        f"{len(near_of)} near duplicates")

    rep_index = np.flatnonzero(~is_copy).tolist()
    kept_rep_pos = [p for p, i in enumerate(rep_index) if i not in near_of]
    n_empty = int((empty & ~is_copy).sum())
    return assemble(records, cfg, rep_index, exact_copies, near_of, kept_rep_pos, n_empty, say)
