"""Import a DVC stage script (``stages/<name>.py``) as a module, to call its ``main(argv)``."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

STAGES = Path(__file__).resolve().parents[1] / "stages"


def load_stage(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"stage_{name}", STAGES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
