"""pii-scrub on Ray Data: an actor pool of ``pii.workers`` scrubbers (one Presidio analyzer and
spaCy model each) over batches of ``pii.batch_size`` records.

Each batch is scrubbed by ``PiiScrubber.scrub_batch``, the local engine's code, and its counters
(``ScrubStats``, which merge in any order) ride along with the batch's first record; so records,
metrics and the review sample are the local engine's.
"""

from __future__ import annotations

import pickle
from typing import Any, Sequence

from llmpipe.config.data import PiiSection
from llmpipe.curation.ray_runtime import PICKLE, binary, iter_tables, library_errors, loads, to_dataset
from llmpipe.data.pii import PiiError, ScrubStats, _check_spacy_model, worker_scrubber


class _ScrubActor:
    """One analyzer per actor, built once and reused for every batch the actor gets."""

    def __init__(self, cfg: PiiSection):
        self.scrubber = worker_scrubber(cfg)

    def __call__(self, table):
        import pyarrow as pa

        out, stats = self.scrubber.scrub_batch(loads(table.column("obj")))
        extra = [pickle.dumps(stats, PICKLE)] + [b""] * (len(out) - 1)
        return pa.table({"i": table.column("i"), "obj": binary(pickle.dumps(r, PICKLE) for r in out),
                         "stats": binary(extra)})


def scrub_records_ray(
    records: Sequence[dict[str, Any]], cfg: PiiSection
) -> tuple[list[dict[str, Any]], dict[str, Any], list[dict[str, Any]]]:
    """``llmpipe.data.pii.scrub_records`` on Ray: (scrubbed records, metrics, review sample)."""
    import ray

    _check_spacy_model(cfg.spacy_model)  # a clear error here rather than in every actor
    ds = to_dataset(records, cfg.batch_size).map_batches(
        _ScrubActor, fn_constructor_args=(cfg,), batch_size=cfg.batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=cfg.workers), udf_modifying_row_count=False)
    out: list[dict[str, Any]] = []
    stats = ScrubStats(review_limit=cfg.review_per_entity)
    with library_errors(PiiError):
        for table in iter_tables(ds):
            out.extend(loads(table.column("obj")))
            for blob in table.column("stats").to_pylist():
                if blob:
                    stats += pickle.loads(blob)
    if stats.records_out != len(records) or len(out) != len(records):
        raise RuntimeError(f"pii-scrub lost records: {len(records)} in, {len(out)} out")
    return out, stats.to_metrics(cfg), stats.review_items()
