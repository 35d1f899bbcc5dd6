"""Dataset loader for llmpipe's bundled lm-eval tasks (referenced from the task YAMLs).

lm-eval calls ``load_local(**metadata, **dataset_kwargs)``. The JSONL file is resolved next to
this module, so the tasks work from any working directory and never touch a hub (the ``json``
builder ships with ``datasets``).
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent


def load_local(data_file: str, **_ignored):
    import datasets

    path = HERE / data_file
    if not path.is_file():
        raise FileNotFoundError(f"{path}: bundled lm-eval data file not found")
    return datasets.load_dataset("json", data_files={"test": str(path)})
