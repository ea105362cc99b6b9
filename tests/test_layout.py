"""The shape of the source tree: small files, short functions (issue: one loop, one identity)."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "dessilbi"
FILES = sorted(SRC.rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_files_are_small_and_functions_short(path):
    text = path.read_text()
    assert len(text.splitlines()) <= 500, f"{path} is over 500 lines"
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for node in ast.walk(ast.parse(text))
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.end_lineno - node.lineno + 1 > 80]
    assert not long, f"{path}: functions over 80 lines: {long}"


def test_every_layer_is_a_subpackage():
    layers = {"core", "sparsity", "structure", "zoo", "training", "experiments", "paper", "cli",
              "integrations"}
    assert layers <= {p.name for p in SRC.iterdir() if (p / "__init__.py").exists()}
    # leaves import nothing of the package (import-linter)
    leaves = {"tables", "files", "catalog", "errors"}
    loose = {p.stem for p in SRC.glob("*.py")} - {"__init__", "__main__", *leaves}
    assert not loose, f"modules outside the layers: {loose}"
