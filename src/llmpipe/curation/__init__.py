"""Curation engines beyond one process: validate, pii-scrub, minhash-dedup and split on Ray (actors and tasks).

``curation.engine: ray`` (params.yaml) runs the curation stages here; every module reuses the
local engine's library code (llmpipe.data) per batch, so both engines write the same bytes.
"""
