"""The package boundaries of docs/architecture.md: the agent ships alone, the control plane
does not carry the trainer, and fleetcore depends on neither."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FORBIDDEN = {
    "edge_agent": {"control_plane", "trainer", "scripts", "tests", "starlette"},
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


def test_the_agent_entry_points_load_no_trainer_control_plane_or_bench_packages() -> None:
    """Starting the agent imports nothing that an agent-only install lacks (Starlette is only
    the serving benchmark's baseline, in scripts/) nor anything of the other components."""
    code = ("import edge_agent.cli, edge_agent.daemon, sys; print([m for m in sys.modules if "
            "m.split('.')[0] in {'starlette','torch','sklearn','control_plane','trainer'}])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO, timeout=60)
    assert out.stdout.strip() == "[]"
