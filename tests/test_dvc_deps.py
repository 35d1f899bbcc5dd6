"""dvc.yaml cannot drift from the code: deps cover each stage's import closure, params its reads.

- Every file of ``src/llmpipe`` that a stage script imports, directly or through other library
  modules (imports inside functions included, and the packages' ``__init__`` files on the way),
  must be a dep of that stage in dvc.yaml (a directory dep covers the files under it). So a change
  to any code a stage runs re-runs that stage.
- Every ``scripts/...`` file named in that code must be a dep too.
- Each stage script's module-level ``PARAMS`` (what it passes to ``load_stage_params``, which
  refuses to read anything else) must equal its ``params:`` in dvc.yaml.
"""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


def _module_file(name: str) -> Path | None:
    base = SRC.joinpath(*name.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _package_inits(name: str) -> list[Path]:
    parts = name.split(".")
    out = []
    for i in range(1, len(parts)):
        init = SRC.joinpath(*parts[:i], "__init__.py")
        if init.is_file():
            out.append(init)
    return out


def _imported_modules(path: Path) -> set[str]:
    """Names of llmpipe modules imported anywhere in ``path`` (absolute and relative imports)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    pkg = None
    if path.is_relative_to(SRC):
        rel = path.relative_to(SRC).with_suffix("")
        parts = list(rel.parts)
        pkg = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.split(".")[0] == "llmpipe")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                assert pkg is not None, f"{path}: relative import outside the package"
                base = pkg[: len(pkg) - (node.level - 1)] if node.level > 1 else pkg
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "llmpipe":
                continue
            names.add(mod)
            for alias in node.names:  # `from llmpipe.a import b` may name the submodule a.b
                if _module_file(f"{mod}.{alias.name}"):
                    names.add(f"{mod}.{alias.name}")
    return names


def import_closure(script: Path) -> set[Path]:
    """Every src/llmpipe file executed by importing what ``script`` imports."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        path = todo.pop()
        for name in _imported_modules(path):
            for f in [*_package_inits(name), _module_file(name)]:
                if f is not None and f not in seen:
                    seen.add(f)
                    todo.append(f)
    return seen


def _stage_script(stage: dict) -> Path:
    cmd = shlex.split(stage["cmd"])
    scripts = [c for c in cmd if c.endswith(".py")]
    assert scripts, f"cannot find the stage script in cmd {stage['cmd']!r}"
    return ROOT / scripts[0]


def _covered(path: Path, deps: list[str]) -> bool:
    rel = path.relative_to(ROOT)
    for d in deps:
        dp = Path(d.rstrip("/"))
        if rel == dp or dp in rel.parents:
            return True
    return False


def _deps(stage: dict) -> list[str]:
    return [d if isinstance(d, str) else next(iter(d)) for d in stage.get("deps", [])]


STAGES = sorted(DVC)


@pytest.mark.parametrize("name", STAGES)
def test_deps_cover_the_import_closure(name):
    stage = DVC[name]
    script = _stage_script(stage)
    deps = _deps(stage)
    assert _covered(script, deps), f"{name}: the stage script {script.relative_to(ROOT)} is not a dep"
    closure = import_closure(script)
    missing = sorted(str(f.relative_to(ROOT)) for f in closure if not _covered(f, deps))
    assert not missing, f"dvc.yaml stage '{name}' imports these files but does not depend on them: {missing}"


@pytest.mark.parametrize("name", STAGES)
def test_deps_cover_the_scripts_a_stage_runs(name):
    stage = DVC[name]
    script = _stage_script(stage)
    deps = _deps(stage)
    named = set()
    for f in [script, *import_closure(script)]:
        named.update(re.findall(r"""["'/](scripts/[\w./-]+\.(?:sh|py))""", f.read_text(encoding="utf-8")))
    missing = sorted(s for s in named if (ROOT / s).is_file() and not _covered(ROOT / s, deps))
    assert not missing, f"dvc.yaml stage '{name}' runs {missing} but does not depend on them"


def _module_params(script: Path) -> list[str] | None:
    tree = ast.parse(script.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "PARAMS" for t in node.targets):
            return list(ast.literal_eval(node.value))
    return None


@pytest.mark.parametrize("name", STAGES)
def test_declared_params_equal_what_the_stage_may_read(name):
    stage = DVC[name]
    script = _stage_script(stage)
    declared = _module_params(script)
    assert declared is not None, (
        f"{script.relative_to(ROOT)} has no module-level PARAMS list (the keys it passes to load_stage_params)")
    src = script.read_text(encoding="utf-8")
    assert "load_stage_params(PARAMS" in src, f"{script.relative_to(ROOT)} must read params via load_stage_params(PARAMS, ...)"
    in_dvc = [p if isinstance(p, str) else next(iter(p)) for p in stage.get("params", [])]
    assert sorted(declared) == sorted(in_dvc), (
        f"stage '{name}': PARAMS in {script.relative_to(ROOT)} {sorted(declared)} != dvc.yaml params {sorted(in_dvc)}")


def test_the_closure_follows_imports_inside_functions(tmp_path):
    # the stage-side check itself must see lazy imports, or a deferred import would escape it
    script = tmp_path / "stage.py"
    script.write_text("def main():\n    from llmpipe.io import write_json\n    return write_json\n")
    closure = {f.relative_to(ROOT).as_posix() for f in import_closure(script)}
    assert {"src/llmpipe/__init__.py", "src/llmpipe/io.py"} <= closure
