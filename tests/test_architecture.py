"""docs/architecture.md's layers hold in the code: every backupkit module is placed in one, none
imports from a layer above its own, and no module imports back from a module that imports it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LIBRARY = REPO / "scripts" / "backupkit"
LABEL_WIDTH = 26  # the layer's name column in the drawing


def imports() -> dict[str, set[str]]:
    """Each module's imports of other backupkit modules (`from .x import …`, `from . import x`)."""
    found: dict[str, set[str]] = {}
    for path in LIBRARY.glob("*.py"):
        if path.stem == "__init__":
            continue
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
        found[path.stem] = deps
    modules = set(found)
    return {module: deps & modules - {module} for module, deps in found.items()}  # not the package's own names


def layers() -> dict[str, float]:
    """Each module's depth in the drawing: 0 for the scripts' row, growing downwards."""
    drawing = (REPO / "docs" / "architecture.md").read_text().split("```")[1]
    depth: dict[str, float] = {}
    level = 0
    for line in drawing.splitlines():
        if line.startswith("─"):
            level += 1
            continue
        label = line[:LABEL_WIDTH].strip()
        for name in re.sub(r"\([^)]*\)", "", line[LABEL_WIDTH:]).split():
            depth[name] = level + (0.5 if label == "foundation" else 0)  # below mechanics, in the same block
    return depth


def test_every_module_is_in_one_layer_and_imports_only_from_its_own_or_below():
    graph, depth = imports(), layers()
    assert set(graph) <= set(depth), f"modules the drawing does not place: {sorted(set(graph) - set(depth))}"
    upward = sorted((module, dep) for module, deps in graph.items() for dep in deps if depth[dep] < depth[module])
    assert upward == []


def test_no_import_cycle():
    graph = imports()

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        for dep in graph.get(start, ()):
            if dep == target or (dep not in seen and (seen.add(dep) or reaches(dep, target, seen))):
                return True
        return False

    assert sorted(m for m in graph if reaches(m, m, set())) == []
