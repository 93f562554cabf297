"""``dvc.yaml`` cannot drift from the code: every stage depends on what its script imports, and on the approaches.

A stage whose script imports a library file that is not among its deps would not rerun when
that file changes, and its outputs would silently describe old code. The import closure is
computed from the source (AST), following ``cxr`` imports through the package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from cxr.approaches import APPROACHES, REGISTRY

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


def _module_file(name: str) -> Path | None:
    base = SRC / name.replace(".", "/")
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in names if name == "cxr" or name.startswith("cxr.")}


def import_closure(script: Path) -> set[Path]:
    """Every file of the ``cxr`` package that running ``script`` imports (package ``__init__`` files included)."""
    found: set[Path] = set()
    todo = [script]
    while todo:
        for name in _imported_modules(todo.pop()):
            parts = name.split(".")
            for depth in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ too
                path = _module_file(".".join(parts[:depth]))
                if path is not None and path not in found:
                    found.add(path)
                    todo.append(path)
    return found


def stages() -> dict[str, dict]:
    """Each stage of ``dvc.yaml`` (a ``foreach`` stage once per item, with ``${item}`` filled in)."""
    declared = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    expanded = {}
    for name, stage in declared.items():
        if "foreach" not in stage:
            expanded[name] = stage
            continue
        for item in stage["foreach"]:
            text = yaml.safe_dump(stage["do"]).replace("${item}", item)
            expanded[f"{name}@{item}"] = yaml.safe_load(text)
    return expanded


def dep_paths(stage: dict) -> list[Path]:
    return [ROOT / (dep if isinstance(dep, str) else next(iter(dep))) for dep in stage.get("deps", [])]


def covered(path: Path, deps: list[Path]) -> bool:
    return any(path == dep or dep in path.parents for dep in deps)


@pytest.mark.parametrize("name", list(stages()))
def test_each_stage_depends_on_every_file_its_script_imports(name):
    stage = stages()[name]
    script = ROOT / stage["cmd"].split()[1]
    deps = dep_paths(stage)
    assert covered(script, deps), f"{name}: its script {script.relative_to(ROOT)} is not a dep"
    missing = sorted(str(p.relative_to(ROOT)) for p in import_closure(script) if not covered(p, deps))
    assert not missing, f"{name} imports files that are not among its deps in dvc.yaml: {missing}"


def test_every_code_dep_exists():
    for name, stage in stages().items():
        for dep in dep_paths(stage):
            if dep.is_relative_to(SRC) or dep.is_relative_to(ROOT / "stages"):
                assert dep.exists(), f"{name}: dep {dep.relative_to(ROOT)} does not exist"


def test_the_closure_follows_imports_through_the_package():
    closure = {str(p.relative_to(SRC)) for p in import_closure(ROOT / "stages" / "train.py")}
    assert {"cxr/__init__.py", "cxr/training/__init__.py", "cxr/training/loop.py", "cxr/training/engine.py",
            "cxr/training/runtime.py", "cxr/data/preprocess.py", "cxr/approaches.py"} <= closure
    assert "cxr/reporting/tables.py" not in closure


def test_the_training_and_evaluate_stages_are_the_registered_approaches():
    declared = stages()
    trainers = {name for name, stage in declared.items() if stage["cmd"].startswith("python stages/train.py ")}
    assert trainers == {f"train@{name}" for name in REGISTRY}
    assert [name.split("@")[1] for name in declared if name.startswith("evaluate@")] == list(APPROACHES)
    for approach in APPROACHES:
        assert declared[f"train@{approach}"]["cmd"] == f"python stages/train.py {approach}"
        # its own recipe, and no other approach's: a recipe change retrains one model
        recipes = [key for key in declared[f"train@{approach}"]["params"] if key.startswith("train_")]
        assert recipes == [REGISTRY[approach].section]


def test_download_depends_on_the_fetching_code_only():
    """Editing the decoders or the params model must not refetch the data set (a Kaggle download)."""
    closure = {str(p.relative_to(SRC)) for p in import_closure(ROOT / "stages" / "download.py")}
    assert {"cxr/params_core.py", "cxr/data/candidates.py", "cxr/data/download.py"} <= closure
    assert closure.isdisjoint({"cxr/params.py", "cxr/approaches.py", "cxr/data/images.py", "cxr/data/preprocess.py"})
