"""The boundaries of docs/architecture.md, checked on the source: the agent ships alone, the
control plane does not carry the trainer, fleetcore depends on no component, the `fleet`
client needs only the wire contracts and fleetcore, the control plane's layers import one way
(domain <- storage <- services <- api/ops <- server/cli), and no product module takes part in
an import cycle."""

from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PRODUCT = ("fleetcore", "control_plane", "edge_agent", "trainer", "fleet")
FORBIDDEN = {
    "edge_agent": {"control_plane", "trainer", "fleet", "scripts", "tests", "starlette"},
    "control_plane": {"edge_agent", "trainer", "fleet", "scripts", "tests"},
    "fleetcore": {"edge_agent", "control_plane", "trainer", "fleet", "scripts", "tests"},
    "trainer": {"edge_agent", "control_plane", "fleet", "scripts", "tests"},
    "fleet": {"edge_agent", "control_plane", "trainer", "scripts", "tests"},
}
# Third-party packages the operator's client may import (anything else must come from the
# standard library): an operator's laptop installs only the `fleet` extra.
FLEET_ALLOWED = {"edgefleet", "fleetcore", "grpc", "google", "cryptography", "fleet"}
# What a layer of the control plane must not import: its own upper layers, and I/O.
_IO = {"grpc", "paho", "apscheduler", "sqlite3", "asyncio", "time", "os", "subprocess",
       "socket", "shutil", "tempfile", "pathlib", "threading", "logging", "edgefleet"}
_UPPER = {"control_plane.server", "control_plane.cli", "control_plane.api", "control_plane.ops"}
LAYERS: dict[str, set[str]] = {
    "control_plane/domain": _IO | _UPPER | {"control_plane.services", "control_plane.storage",
                                            "control_plane.config"},
    "control_plane/storage": _UPPER | {"control_plane.services", "grpc", "paho", "edgefleet"},
    "control_plane/services": _UPPER | {"grpc", "paho", "edgefleet"},
    "control_plane/api": {"control_plane.ops", "control_plane.server", "control_plane.cli"},
    "control_plane/ops": {"control_plane.api", "control_plane.server", "control_plane.cli"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every dotted name the file imports, wherever (``from a.b import c`` gives ``a.b`` and
    ``a.b.c``): a deferred import or one for type checking only is still a dependency."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
    return out


def _tops(names: set[str]) -> set[str]:
    return {n.split(".")[0] for n in names}


def _files(folder: str) -> list[Path]:
    files = sorted((REPO / folder).rglob("*.py"))
    assert files, f"{folder} has no Python files"
    return files


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_stay_inside_its_boundary(package: str) -> None:
    bad = {str(f.relative_to(REPO)): sorted(_tops(_imports(f)) & FORBIDDEN[package])
           for f in _files(package)}
    assert {f: m for f, m in bad.items() if m} == {}


def test_fleet_client_imports_only_protos_fleetcore_and_the_standard_library() -> None:
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    bad = {str(f.relative_to(REPO)): sorted(_tops(_imports(f)) - stdlib - FLEET_ALLOWED)
           for f in _files("fleet")}
    assert {f: m for f, m in bad.items() if m} == {}


def _hits(names: set[str], forbidden: set[str]) -> list[str]:
    return sorted(n for n in names for f in forbidden if n == f or n.startswith(f + "."))


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_control_plane_layers_import_one_way(layer: str) -> None:
    bad = {str(f.relative_to(REPO)): _hits(_imports(f), LAYERS[layer]) for f in _files(layer)}
    assert {f: m for f, m in bad.items() if m} == {}


def test_only_the_cluster_runner_talks_to_kubernetes() -> None:
    """The Kubernetes client is one module's business (control_plane/services/
    cluster_runner.py): nothing else in the product imports it."""
    runner = REPO / "control_plane" / "services" / "cluster_runner.py"
    users = sorted(str(f.relative_to(REPO)) for pkg in PRODUCT for f in _files(pkg)
                   if _hits(_imports(f), {"kubernetes"}))
    assert users == [str(runner.relative_to(REPO))]


# The trainer's sources sit below its pipeline: they know the store and the table rules, not
# the steps that train. Their pure rules (URLs, tables, watermarks) do no I/O at all.
_INGEST_IO = {"sqlalchemy", "httpx", "pyarrow", "paho", "nats", "os", "pathlib", "sqlite3",
              "socket", "psycopg", "pymysql", "trainer.store"}
INGEST: dict[str, set[str]] = {
    "trainer/ingest": {"trainer.pipeline", "trainer.kinds", "trainer.train", "trainer.cli",
                       "trainer.bundle", "trainer.models"},
    "trainer/ingest/urls.py": _INGEST_IO,
    "trainer/ingest/table.py": _INGEST_IO,
    "trainer/ingest/base.py": _INGEST_IO,
}


@pytest.mark.parametrize("part", sorted(INGEST))
def test_trainer_sources_stay_below_the_pipeline(part: str) -> None:
    files = [REPO / part] if part.endswith(".py") else _files(part)
    bad = {str(f.relative_to(REPO)): _hits(_imports(f), INGEST[part]) for f in files}
    assert {f: m for f, m in bad.items() if m} == {}


def test_no_import_cycle_among_product_modules() -> None:
    modules = {_module_name(f): f for pkg in PRODUCT for f in _files(pkg)}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        graph[name] = {m for m in _imports(path) if m in modules and m != name}
    try:
        order = list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        pytest.fail(f"import cycle: {' -> '.join(exc.args[1])}")
    assert set(order) == set(modules)


def test_the_cycle_check_sees_a_cycle_hidden_behind_type_checking(tmp_path: Path) -> None:
    """The shape the old handlers <-> rollouts cycle had: the back edge only for types."""
    (tmp_path / "a.py").write_text("from b import x\n")
    (tmp_path / "b.py").write_text("if TYPE_CHECKING:\n    from a import Handlers\n")
    graph = {n: {m for m in _imports(tmp_path / f"{n}.py") if m in ("a", "b")} for n in "ab"}
    with pytest.raises(graphlib.CycleError):
        list(graphlib.TopologicalSorter(graph).static_order())


def test_the_agent_entry_points_load_no_trainer_control_plane_fleet_or_bench_packages() -> None:
    """Starting the agent imports nothing that an agent-only install lacks (Starlette is only
    the serving benchmark's baseline, in scripts/) nor anything of the other components."""
    code = ("import edge_agent.cli, edge_agent.daemon, sys; print([m for m in sys.modules if "
            "m.split('.')[0] in "
            "{'starlette','torch','sklearn','control_plane','trainer','fleet'}])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO, timeout=60)
    assert out.stdout.strip() == "[]"


# The trust cores are pure: bytes, keys and a time in, typed objects or an error out. The
# agent's and the control plane's shells do the I/O (files, clock, network).
_PURE_IO = {"os", "pathlib", "socket", "sqlite3", "time", "grpc", "paho", "threading",
            "subprocess", "shutil", "tempfile", "io", "urllib", "http"}
PURE_TRUST = ("fleetcore/signing.py", "fleetcore/root.py", "fleetcore/release.py",
              "fleetcore/fields.py")


@pytest.mark.parametrize("module", PURE_TRUST)
def test_the_trust_cores_do_no_io(module: str) -> None:
    assert _hits(_imports(REPO / module), _PURE_IO) == []


# The agent's failover rules (which replica next, how long to wait) are pure too: the gRPC
# transport and the daemon do the connecting and the sleeping.
PURE_FAILOVER = ("edge_agent/failover.py", "edge_agent/backoff.py", "fleetcore/addresses.py")


@pytest.mark.parametrize("module", PURE_FAILOVER)
def test_the_failover_rules_do_no_io(module: str) -> None:
    assert _hits(_imports(REPO / module), _PURE_IO | {"asyncio"}) == []


# The agent's serving process holds its trust state as data (edge_agent/install/trust_keeper.py):
# only these files may reach cryptography (the trust child, the one-shot enroll and status
# commands, and the shells the child runs), and the rest of the agent imports none of them.
_CRYPTO = {"cryptography", "model_signing", "fleetcore.pki", "fleetcore.signing",
           "fleetcore.release", "fleetcore.root", "fleetcore.bundle_verify",
           "edge_agent.identity", "edge_agent.enroll", "edge_agent.install.release_trust",
           "edge_agent.install.root_trust", "edge_agent.install.trust_child"}
_CRYPTO_ALLOWED = {"edge_agent/identity.py", "edge_agent/enroll.py", "edge_agent/cli.py",
                   "edge_agent/__init__.py",  # lazy: `from edge_agent import enroll`
                   "edge_agent/install/release_trust.py", "edge_agent/install/root_trust.py",
                   "edge_agent/install/trust_child.py", "edge_agent/install/verify_child.py"}


def test_only_the_trust_child_and_one_shot_commands_reach_cryptography() -> None:
    bad = {}
    for f in _files("edge_agent"):
        name = str(f.relative_to(REPO))
        if name in _CRYPTO_ALLOWED:
            continue
        hits = {m for m in _imports(f)
                if any(m == c or m.startswith(c + ".") for c in _CRYPTO)}
        if hits:
            bad[name] = sorted(hits)
    assert bad == {}
