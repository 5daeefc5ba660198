"""The layering: every product module imports the package by its one installed name, and the index
(indexer/) never imports the read side (queries/, explorer/)."""

import ast
from pathlib import Path

import pytest

from conftest import ROOT

TOP = ("indexer", "queries", "explorer", "sql", "cli")
PRODUCT = ["cli.py", *(str(p.relative_to(ROOT)) for d in ("indexer", "queries", "explorer")
                       for p in sorted((ROOT / d).rglob("*.py")))]


def imports(path: Path) -> list[str]:
    """Every absolute module name the file imports (at any depth of the file)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return names


@pytest.mark.parametrize("rel", PRODUCT)
def test_product_code_imports_the_package_by_its_installed_name(rel):
    bare = [n for n in imports(ROOT / rel) if n.split(".")[0] in TOP]
    assert not bare, f"{rel} imports {bare}: write clip_density_index.<name>"


@pytest.mark.parametrize("rel", [p for p in PRODUCT if p.startswith("indexer/")])
def test_the_index_never_imports_the_read_side(rel):
    up = [n for n in imports(ROOT / rel)
          if n.startswith(("clip_density_index.queries", "clip_density_index.explorer", "clip_density_index.cli"))]
    assert not up, f"{rel} imports {up}: indexer/ is below queries/ and explorer/"


@pytest.mark.parametrize("rel", [p for p in PRODUCT if p.startswith("queries/")])
def test_the_read_side_never_imports_the_page_or_the_cli(rel):
    up = [n for n in imports(ROOT / rel)
          if n.startswith(("clip_density_index.explorer", "clip_density_index.cli"))]
    assert not up, f"{rel} imports {up}: queries/ is below explorer/ and cli.py"


def test_the_checks_see_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from clip_density_index.queries.scoring import score\n    import indexer.pool\n")
    assert imports(bad) == ["clip_density_index.queries.scoring", "clip_density_index.queries.scoring.score",
                            "indexer.pool"]
