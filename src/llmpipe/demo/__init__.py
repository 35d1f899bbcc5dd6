"""Generators of the bundled demo data (``data/raw``): not part of the pipeline.

No stage imports this package; it writes the committed demo inputs, byte for byte, from a fixed
seed: ``python -m llmpipe.demo --out data/raw``.
- ``support``: the support-triage task data (with planted PII, duplicates and invalid records);
- ``safety``: the safety mix (harmful requests refused, benign ones answered).
"""
