"""The package boundaries of docs/architecture.md: the agent ships alone, the control plane
does not carry the trainer, and fleetcore depends on neither."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FORBIDDEN = {
    "edge_agent": {"control_plane", "trainer", "scripts", "tests"},
    "control_plane": {"edge_agent", "trainer", "scripts", "tests"},
    "fleetcore": {"edge_agent", "control_plane", "trainer", "scripts", "tests"},
    "trainer": {"edge_agent", "control_plane", "scripts", "tests"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_stay_inside_its_boundary(package: str) -> None:
    files = sorted((REPO / package).rglob("*.py"))
    assert files
    bad = {str(f.relative_to(REPO)): sorted(_imports(f) & FORBIDDEN[package]) for f in files}
    assert {f: m for f, m in bad.items() if m} == {}
