"""Deterministic, stratified train/val/test split + content hashes + contamination report.

Determinism
-----------
The split depends only on the *set* of records and the params, not on the input order:

* Records are grouped into strata by ``metadata[stratify_key]`` (records without the key, or
  without metadata, form the stratum ``"<missing>"``; non-string values are labelled by their
  JSON). With ``stratify_key: null`` there is one stratum ``"<all>"``.
* Within a stratum, records are ordered by ``sha256(f"{seed}:{id}")`` (ties, e.g. repeated ids,
  by the record's canonical JSON). The first ``n_train`` go to train, the next ``n_val`` to val,
  the rest to test.
* The per-stratum counts come from the ratios by largest remainder (ties: train, val, test);
  then, if the stratum has at least as many records as there are splits with a ratio > 0, every
  such split that got none takes one record from the largest split. So a stratum with >= 3
  records lands in all three splits when all ratios are > 0, and otherwise every count is within
  one record of ``n * ratio``.
* Each split file is ordered by the same hash (so strata are interleaved) and serialised exactly
  like :func:`llmpipe.io.write_jsonl` (key-sorted JSON, one record per line, UTF-8).

Pinned records: with ``pin_key`` set (params.yaml: ``"split"``), a record whose
``metadata[pin_key]`` names a split (``train``/``val``/``test``) goes to that split and takes no
part in the stratified allocation above, so pinning records never moves any other record. The
bundled safety examples use it to stay in train (the held-out task test set stays pure task
data). Any other value of the key is an error.

Hashes: ``sha256`` of each split file's bytes; the dataset version is the sha256 of the three
hex digests concatenated in the order train, val, test (ASCII, no separator).

Contamination: MinHash/LSH (same signatures as :mod:`llmpipe.data.dedup`) over the train
records; every val/test record is queried, and each (record, train record) pair with an
estimated Jaccard >= ``contamination_threshold`` is reported -- nothing is dropped.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable, Mapping, Sequence

from llmpipe.config.data import SplitSection
from llmpipe.data.dedup import (
    Progress,
    estimated_jaccard,
    gc_paused,
    lean_minhash,
    make_lsh,
    minhash_signatures,
    near_text,
    selected_contents,
)

SPLITS = ("train", "val", "test")
MISSING_STRATUM = "<missing>"
ALL_STRATUM = "<all>"
PINNED_STRATUM = "<pinned>"


@dataclass
class SplitResult:
    """Everything the split stage writes: file bytes, contamination pairs, metrics."""

    splits: dict[str, list[dict[str, Any]]]
    files: dict[str, bytes]
    contamination: list[dict[str, Any]]
    metrics: dict[str, Any]


# --------------------------------------------------------------------------- assignment


_ABSENT = object()


def _metadata_value(record: Mapping[str, Any], key: str) -> Any:
    """``record["metadata"][key]``, or ``_ABSENT`` when the record has no such metadata."""
    meta = record.get("metadata")
    return meta[key] if isinstance(meta, Mapping) and key in meta else _ABSENT


def stratum_of(record: Mapping[str, Any], key: str | None) -> str:
    if key is None:
        return ALL_STRATUM
    value = _metadata_value(record, key)
    if value is _ABSENT:
        return MISSING_STRATUM
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def canonical_json(record: Mapping[str, Any]) -> str:
    """The record's line in a JSONL file (same format as llmpipe.io.write_jsonl)."""
    return json.dumps(record, ensure_ascii=False, sort_keys=True)


def order_key(record: Mapping[str, Any], seed: int) -> tuple[str, str]:
    """Position of a record in the seeded pseudo-random order (input-order independent)."""
    digest = hashlib.sha256(f"{seed}:{record.get('id')}".encode("utf-8")).hexdigest()
    return digest, canonical_json(record)


def allocate(n: int, ratios: Mapping[str, float]) -> dict[str, int]:
    """Records per split for a stratum of ``n`` records (see the module docstring)."""
    # Exact rational arithmetic on the ratios as written (0.1 is 1/10), renormalised to sum to 1.
    fr = [Fraction(repr(float(ratios[s]))) for s in SPLITS]
    exact = [n * f / sum(fr) for f in fr]
    counts = [math.floor(x) for x in exact]
    rest = n - sum(counts)
    by_frac = sorted(range(len(SPLITS)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_frac[:rest]:
        counts[i] += 1
    positive = [i for i, s in enumerate(SPLITS) if float(ratios[s]) > 0]
    if n >= len(positive):
        for i in positive:
            if counts[i] == 0:
                donor = max(range(len(SPLITS)), key=lambda j: (counts[j], -j))
                counts[donor] -= 1
                counts[i] += 1
    return dict(zip(SPLITS, counts))


def pinned_split(record: Mapping[str, Any], pin_key: str | None) -> str | None:
    """The split ``record`` is pinned to by ``metadata[pin_key]`` (None: not pinned)."""
    value = _ABSENT if pin_key is None else _metadata_value(record, pin_key)
    if value is _ABSENT:
        return None
    if value not in SPLITS:
        raise ValueError(
            f"record {record.get('id')!r}: metadata.{pin_key} pins it to a split, so it must be "
            f"one of {list(SPLITS)}, got {value!r} (or set split.pin_key: null)"
        )
    return value


def assign(
    records: Sequence[Mapping[str, Any]], cfg: SplitSection
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, dict[str, int]]]:
    """Split ``records``: (records per split in file order, counts per stratum per split).

    Pinned records are counted under the stratum ``"<pinned>"``.
    """
    strata: dict[str, list[tuple[tuple[str, str], Mapping[str, Any]]]] = {}
    out: dict[str, list[tuple[tuple[str, str], Mapping[str, Any]]]] = {s: [] for s in SPLITS}
    pinned = {s: 0 for s in SPLITS}
    for rec in records:
        target = pinned_split(rec, cfg.pin_key)
        if target is not None:
            out[target].append((order_key(rec, cfg.seed), rec))
            pinned[target] += 1
            continue
        name = stratum_of(rec, cfg.stratify_key)
        strata.setdefault(name, []).append((order_key(rec, cfg.seed), rec))
    per_stratum: dict[str, dict[str, int]] = {}
    for name in sorted(strata):
        members = sorted(strata[name], key=lambda t: t[0])
        counts = allocate(len(members), cfg.ratios)
        per_stratum[name] = counts
        start = 0
        for s in SPLITS:
            out[s].extend(members[start : start + counts[s]])
            start += counts[s]
    if any(pinned.values()):
        per_stratum[PINNED_STRATUM] = pinned
    splits = {s: [dict(rec) for _, rec in sorted(out[s], key=lambda t: t[0])] for s in SPLITS}
    return splits, per_stratum


def serialize(records: Sequence[Mapping[str, Any]]) -> bytes:
    return "".join(canonical_json(r) + "\n" for r in records).encode("utf-8")


def dataset_version(file_hashes: Mapping[str, str]) -> str:
    """sha256 over the split files' hex digests, concatenated in the order train, val, test."""
    return hashlib.sha256("".join(file_hashes[s] for s in SPLITS).encode("ascii")).hexdigest()


# --------------------------------------------------------------------------- contamination


def find_contamination(
    splits: Mapping[str, Sequence[Mapping[str, Any]]],
    cfg: SplitSection,
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """Pairs (val/test record, train record) with estimated Jaccard >= the threshold."""
    roles = cfg.contamination_roles

    def texts_of(name: str) -> list[str]:
        return [near_text(selected_contents(r, roles, i)) for i, r in enumerate(splits[name])]

    train = splits["train"]
    train_texts = texts_of("train")
    num_perm, k = cfg.contamination_num_perm, cfg.contamination_shingle_size
    train_sig = minhash_signatures(train_texts, num_perm, k)
    lsh = make_lsh(cfg.contamination_threshold, cfg.contamination_num_perm)
    with lsh.insertion_session() as session:
        for i, text in enumerate(train_texts):
            if text:
                session.insert(i, lean_minhash(train_sig[i]), check_duplication=False)
    pairs: list[dict[str, Any]] = []
    for name in SPLITS[1:]:
        recs = splits[name]
        texts = texts_of(name)
        sig = minhash_signatures(texts, num_perm, k)
        for i, text in enumerate(texts):
            if not text or not train_texts:
                continue
            cands = sorted(lsh.query(lean_minhash(sig[i])))
            if not cands:
                continue
            sims = estimated_jaccard(sig[i], train_sig[cands])
            hits = [
                (float(sim), c)
                for sim, c in zip(sims, cands)
                if sim >= cfg.contamination_threshold
            ]
            for jac, c in sorted(hits, key=lambda t: (-t[0], t[1])):
                pairs.append(contamination_pair(name, recs[i], train[c], jac, cfg))
        if progress is not None:
            progress(f"contamination check {name}: {len(recs)} records vs {len(train)} train")
    return pairs


def contamination_pair(
    name: str, rec: Mapping[str, Any], train_rec: Mapping[str, Any], jac: float, cfg: SplitSection
) -> dict[str, Any]:
    """One line of the contamination report."""
    return {
        "split": name,
        "id": rec.get("id"),
        "source": rec.get("source"),
        "train_id": train_rec.get("id"),
        "train_source": train_rec.get("source"),
        "jaccard": jac,
        "reason": f"near duplicate of a train record (Jaccard {jac:.3f} >= "
        f"{cfg.contamination_threshold}); reported, not dropped",
    }


# --------------------------------------------------------------------------- all together


def split_records(
    records: Sequence[Mapping[str, Any]],
    cfg: SplitSection,
    progress: Progress | None = None,
    contamination_check: Callable[..., list[dict[str, Any]]] = find_contamination,
) -> SplitResult:
    """Split, hash and contamination-check ``records`` (nothing is written here).

    ``contamination_check(splits, cfg, progress=...)`` finds the contamination pairs
    (:func:`find_contamination`; the Ray engine passes its distributed version)."""
    say = progress or (lambda _msg: None)
    for i, rec in enumerate(records):
        if not isinstance(rec, Mapping) or not isinstance(rec.get("id"), str):
            raise ValueError(f"record #{i}: expected a JSON object with a string 'id'")
    splits, per_stratum = assign(records, cfg)
    sizes = ", ".join(f"{s}={len(splits[s])}" for s in SPLITS)
    say(f"assigned: {sizes} over {len(per_stratum)} strata")
    files = {s: serialize(splits[s]) for s in SPLITS}
    hashes = {s: hashlib.sha256(files[s]).hexdigest() for s in SPLITS}
    with gc_paused():
        contamination = contamination_check(splits, cfg, progress=say)
    metrics = {
        "dataset_version": dataset_version(hashes),
        "records": len(records),
        "counts": {s: len(splits[s]) for s in SPLITS},
        "sha256": hashes,
        "strata": per_stratum,
        "contamination_pairs": len(contamination),
        "contamination_by_split": {
            s: sum(1 for p in contamination if p["split"] == s) for s in SPLITS[1:]
        },
        "contaminated_records": len({(p["split"], p["id"]) for p in contamination}),
        "pinned": per_stratum.get(PINNED_STRATUM, {s: 0 for s in SPLITS}),
        "params": cfg.model_dump(mode="json"),
    }
    return SplitResult(splits=splits, files=files, contamination=contamination, metrics=metrics)


__all__ = [
    "SPLITS",
    "SplitResult",
    "allocate",
    "assign",
    "contamination_pair",
    "dataset_version",
    "find_contamination",
    "pinned_split",
    "split_records",
    "stratum_of",
]
