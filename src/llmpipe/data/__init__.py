"""Data curation: readers, validation, PII scrubbing, deduplication, splitting, demo data."""
