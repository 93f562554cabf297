"""House rules a reviewer would otherwise check by hand: short functions and a README that stays a guide."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 80
MAX_README_BYTES = 8 * 1024


def test_no_function_in_the_library_or_the_stages_is_longer_than_80_lines():
    long = []
    for path in sorted([*(ROOT / "src").rglob("*.py"), *(ROOT / "stages").glob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


def test_the_readme_is_at_most_8_kb():
    assert len((ROOT / "README.md").read_bytes()) <= MAX_README_BYTES


def test_the_library_lives_in_src_not_in_stages():
    assert not (ROOT / "stages" / "cxr").exists()
    assert all(path.suffix == ".py" for path in (ROOT / "stages").iterdir() if path.is_file())
    subpackages = [p for p in (ROOT / "src" / "cxr").iterdir() if (p / "__init__.py").is_file()]
    assert len(subpackages) >= 3


def _imports_reporting(node: ast.AST) -> bool:
    if isinstance(node, ast.Import):
        return any(alias.name == "cxr.reporting" or alias.name.startswith("cxr.reporting.") for alias in node.names)
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        if node.module == "cxr":
            return any(alias.name == "reporting" for alias in node.names)
        return node.module == "cxr.reporting" or node.module.startswith("cxr.reporting.")
    return False


def test_evaluation_never_imports_reporting():
    """Evaluation computes, reporting writes words and figures about it: the dependency runs one way only."""
    offending = [
        f"{path.relative_to(ROOT)}:{node.lineno}"
        for path in sorted((ROOT / "src" / "cxr" / "evaluation").rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path)))
        if _imports_reporting(node)
    ]
    assert not offending, offending
