"""Curation engines beyond one process: validate, pii-scrub, minhash-dedup and split on Ray Data.

``curation.engine: ray`` (params.yaml) runs the curation stages here; every module reuses the
local engine's library code (llmpipe.data) per batch, so both engines write the same bytes.
"""
