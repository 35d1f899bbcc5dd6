"""validate on Ray: an actor pool of ``curation.workers`` validators (one tokenizer each, one
CPU each) over batches of ``curation.batch_size`` raw items.

The driver reads the input files lazily (``formats`` yields items and read problems in file
order, with file and line) and hands batches to the pool; each batch is judged by
``Validator``, the local engine's code, and its outcomes come back in input order, so the
driver counts and writes them exactly as the local engine does (``validate_files``), strict
mode included (the first reject in input order stops the run). At most 2 x workers batches are
in flight: the driver never holds the corpus.

Ray core actors (``ray_runtime.ordered_actor_map``), not Ray Data's ``map_batches``: on the
2-core box Ray Data's executor and its stats, autoscaling and location actors cost ~20-30% of
a core next to the work.
"""

from __future__ import annotations

from typing import Iterator

from llmpipe.config.data import ValidateSection
from llmpipe.curation.ray_runtime import library_errors, ordered_actor_map
from llmpipe.data.validate import BatchMap, Item, Outcome, TokenCounter, Validator
from llmpipe.model.source import ModelSourceError, load_tokenizer, resolve


class _ValidateActor:
    """One tokenizer per actor, loaded once and reused for every batch the actor gets.

    Loaded at the first batch, not in ``__init__``: Ray keeps the exception of a failed call
    (``library_errors`` re-raises the ``ModelSourceError`` in it), but of a failed constructor
    only the message (``ActorDiedError``).
    """

    def __init__(self, cfg: ValidateSection, max_seq_len: int, model: str):
        self.args = (cfg, max_seq_len, model)
        self.validator: Validator | None = None

    def __call__(self, batch: list[Item]) -> list[Outcome]:
        if self.validator is None:
            cfg, max_seq_len, model = self.args
            self.validator = Validator(cfg, max_seq_len, TokenCounter(load_tokenizer(model)))
        return self.validator(batch)


def ray_batch_map(cfg: ValidateSection, max_seq_len: int, model: str, workers: int) -> BatchMap:
    """The ``batch_map`` of ``validate_files`` that runs the batches on ``workers`` Ray actors
    (inside ``ray_runtime.ray_session``); ``model`` is model.name_or_path. A model that cannot
    be loaded raises ``ModelSourceError``, here or from the actors, as on the local engine."""
    resolve(model)  # a missing model: a clear error here rather than in every actor

    def run(batches: Iterator[list[Item]]) -> Iterator[list[Outcome]]:
        with library_errors(ModelSourceError):
            yield from ordered_actor_map(_ValidateActor, (cfg, max_seq_len, model), batches, workers)
    return run
