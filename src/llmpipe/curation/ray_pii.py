"""pii-scrub on Ray: an actor pool of ``pii.workers`` scrubbers (one Presidio analyzer and
spaCy model each, one CPU each) over batches of ``pii.batch_size`` records.

Each batch is scrubbed by ``PiiScrubber.scrub_batch``, the local engine's code, and comes back
in input order with its counters (``ScrubStats``, which merge in any order), so records,
metrics and the review sample are the local engine's. The driver streams the input and the
output (``llmpipe.data.pii.scrub_file``); at most 2 x workers batches are in flight.

Ray core actors (``ray_runtime.ordered_actor_map``), not Ray Data's ``map_batches``: on the
2-core box Ray Data's executor and its stats, autoscaling and location actors took ~20 of
86 CPU-seconds of a 2,000-record run, next to ~30 for the same work on a Ray actor pool.
"""

from __future__ import annotations

from typing import Any, Iterator

from llmpipe.config.data import PiiSection
from llmpipe.curation.ray_runtime import library_errors, ordered_actor_map
from llmpipe.data.pii import BatchMap, PiiError, ScrubStats, _check_spacy_model, worker_scrubber


class _ScrubActor:
    """One analyzer per actor, built once and reused for every batch the actor gets."""

    def __init__(self, cfg: PiiSection):
        self.scrubber = worker_scrubber(cfg)

    def __call__(self, batch: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], ScrubStats]:
        return self.scrubber.scrub_batch(batch)


def ray_batch_map(cfg: PiiSection) -> BatchMap:
    """The ``batch_map`` of ``scrub_stream``/``scrub_file``/``scrub_records`` that runs the
    batches on a Ray actor pool (inside ``ray_runtime.ray_session``)."""
    _check_spacy_model(cfg.spacy_model)  # a clear error here rather than in every actor

    def run(batches: Iterator[list[dict[str, Any]]]) -> Iterator[tuple[list[dict[str, Any]], ScrubStats]]:
        with library_errors(PiiError):
            yield from ordered_actor_map(_ScrubActor, (cfg,), batches, cfg.workers)
    return run
