"""validate on Ray Data: an actor pool of ``curation.workers`` validators (one tokenizer each)
over batches of ``curation.batch_size`` raw items.

The driver reads the input files (``formats`` yields items and read problems in file order,
with file and line); each batch runs ``validate_items``, the local engine's code, with strict
mode off; the batches' records, rejects and repairs are concatenated in input order and their
metrics summed. With ``validate.strict`` the first reject in input order is raised, as locally.
"""

from __future__ import annotations

import pickle
from collections import Counter
from typing import Callable

from llmpipe.config.data import CurationSection, ValidateSection
from llmpipe.curation.ray_runtime import PICKLE, binary, iter_tables, library_errors, to_dataset
from llmpipe.data.validate import (
    StrictValidationError,
    TokenCounter,
    ValidationResult,
    iter_inputs,
    validation_metrics,
    validate_items,
)
from llmpipe.model.source import ModelSourceError, load_tokenizer


class _ValidateActor:
    def __init__(self, cfg: ValidateSection, max_seq_len: int, model: str):
        self.cfg = cfg.model_copy(update={"strict": False})  # the driver enforces strict, in order
        self.max_seq_len = max_seq_len
        self.counter = TokenCounter(load_tokenizer(model))

    def __call__(self, table):
        import pyarrow as pa

        items = [pickle.loads(b) for b in table.column("obj").to_pylist()]
        part = validate_items(items, self.cfg, self.max_seq_len, self.counter)
        return pa.table({"part": binary([pickle.dumps(part, PICKLE)])})


def merge(parts: list[ValidationResult]) -> ValidationResult:
    """Concatenate per-batch results (in input order) and sum their metrics."""
    records, rejects, repairs = [], [], []
    seen = 0
    by_reason: Counter[str] = Counter()
    per_format: Counter[str] = Counter()
    per_file: dict[str, Counter[str]] = {}
    for part in parts:
        records += part.records
        rejects += part.rejects
        repairs += part.repairs
        seen += part.metrics["items_read"]
        by_reason.update(part.metrics["rejected_by_reason"])
        per_format.update(part.metrics["valid_by_format"])
        for name, counts in part.metrics["by_file"].items():
            per_file.setdefault(name, Counter()).update(counts)
    return ValidationResult(records, rejects, repairs,
                            validation_metrics(seen, records, rejects, repairs, by_reason, per_format, per_file))


def validate_inputs_ray(
    cfg: ValidateSection,
    max_seq_len: int,
    model: str,
    curation: CurationSection,
    progress: Callable[[str], None] | None = None,
) -> ValidationResult:
    """``llmpipe.data.validate.validate_inputs`` on Ray; ``model`` is model.name_or_path (each
    actor loads its tokenizer)."""
    import ray

    items = list(iter_inputs(cfg))
    if progress:
        progress(f"{len(items)} items read; validating in batches of {curation.batch_size} "
                 f"on {curation.workers} actors")
    ds = to_dataset(items, curation.batch_size).map_batches(
        _ValidateActor, fn_constructor_args=(cfg, max_seq_len, model), batch_size=curation.batch_size,
        batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=curation.workers))
    with library_errors(ModelSourceError):
        parts = [pickle.loads(b) for t in iter_tables(ds) for b in t.column("part").to_pylist()]
    result = merge(parts)
    if cfg.strict and result.rejects:
        raise StrictValidationError(
            f"{result.rejects[0].describe()}\n(validate.strict is true: fix the input or set "
            "validate.strict=false to reject such records and continue)"
        )
    return result
