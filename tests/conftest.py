"""Session-wide test settings.

Subprocesses the tests start (``dvc repro``, stage scripts) must see the environment a user's
shell and CI have. A developer shell with ``PYTHONDONTWRITEBYTECODE=1`` hides a whole class of
reproducibility bugs: ``__pycache__`` files appearing inside directory deps (``src/llmpipe/train``)
between two runs change their hash unless ``.dvcignore`` excludes them. CI failed on exactly that
while the same test passed on a developer box with the variable set, so it is removed here.
"""

from __future__ import annotations

import os

os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
