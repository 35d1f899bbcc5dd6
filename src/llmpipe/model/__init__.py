"""Model sources, loading and materialisation of the base model."""
