"""validate on Ray: an actor pool of ``curation.workers`` validators (one tokenizer each, one
CPU each) over batches of ``curation.batch_size`` raw items.

The driver reads the input files lazily (``formats`` yields items and read problems in file
order, with file and line) and hands batches to the pool; each batch is judged by
``Validator``, the local engine's code, and its outcomes come back in input order, so the
driver counts and writes them exactly as the local engine does (``validate_files``), strict
mode included (the first reject in input order stops the run). At most 2 x workers batches are
in flight: the driver never holds the corpus.

The driver loads the tokenizer once, as the local engine does, and sends it to every actor
(pickled, ~1.5 MB for the embedded model): building it from a GGUF file costs ~18 CPU-seconds
(torch and the GGUF conversion), unpickling it ~2 without torch. So an actor needs neither the
model files nor torch, and every actor counts tokens with the driver's tokenizer.

Ray core actors (``ray_runtime.ordered_actor_map``), not Ray Data's ``map_batches``: on the
2-core box Ray Data's executor and its stats, autoscaling and location actors cost ~20-30% of
a core next to the work.
"""

from __future__ import annotations

import os
import pickle
import sys
from typing import Any, Iterator

from llmpipe.config.data import ValidateSection
from llmpipe.curation.ray_runtime import PICKLE, library_errors, ordered_actor_map
from llmpipe.data.validate import BatchMap, Item, Outcome, TokenCounter, Validator
from llmpipe.model.source import ModelSourceError

# deep-learning backends a tokenizer does not need; transformers imports them when it finds them
_UNUSED_BACKENDS = ("torch", "tensorflow", "jax", "flax")


class _ValidateActor:
    """A validator with its own copy of the driver's tokenizer, unpickled at the first batch
    and reused for every batch the actor gets.

    At the first batch, not in ``__init__``: Ray keeps the exception of a failed call
    (``library_errors`` re-raises the ``ModelSourceError`` in it), but of a failed constructor
    only its message (``ActorDiedError``).
    """

    def __init__(self, cfg: ValidateSection, max_seq_len: int, tokenizer: bytes):
        self.args = (cfg, max_seq_len, tokenizer)
        self.validator: Validator | None = None

    def __call__(self, batch: list[Item]) -> list[Outcome]:
        if self.validator is None:
            cfg, max_seq_len, tokenizer = self.args
            self.validator = Validator(cfg, max_seq_len, TokenCounter(_load(tokenizer)))
            self.args = None
        return self.validator(batch)


def _load(tokenizer: bytes) -> Any:
    """Unpickle the driver's tokenizer in an actor's process (it does nothing else), with the
    unused backends made unimportable first: transformers then skips them (~4 CPU-s)."""
    for name in _UNUSED_BACKENDS:
        if name not in sys.modules:
            sys.modules[name] = None  # type: ignore[assignment]  # import raises ImportError
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # "PyTorch was not found"
    try:
        return pickle.loads(tokenizer)
    except Exception as exc:  # e.g. another transformers version on this node than on the driver
        raise ModelSourceError(f"cannot load the driver's tokenizer in a Ray actor: "
                               f"{type(exc).__name__}: {exc}") from exc


def ray_batch_map(cfg: ValidateSection, max_seq_len: int, tokenizer: Any, workers: int) -> BatchMap:
    """The ``batch_map`` of ``validate_files`` that runs the batches on ``workers`` Ray actors
    (inside ``ray_runtime.ray_session``), each with a copy of ``tokenizer`` (the driver's,
    ``load_tokenizer(model.name_or_path)``). A library error raised in an actor is re-raised
    as itself."""
    payload = pickle.dumps(tokenizer, PICKLE)

    def run(batches: Iterator[list[Item]]) -> Iterator[list[Outcome]]:
        with library_errors(ModelSourceError):
            yield from ordered_actor_map(_ValidateActor, (cfg, max_seq_len, payload), batches, workers)
    return run
