"""The agent's install lifecycle: state table, smoke test, probation, store and crash safety.

Bundles are real: a tiny MLP exported to ONNX, with the smoke test computed by ONNX Runtime
as the trainer does. Signatures are out of scope here (``fleetcore.bundle_verify``): ``verify``
callables stand in, and a bundle whose ``model.sig`` is not ``GOOD_SIG`` is "badly signed".
"""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from edge_agent.install import smoke as smoke_module
from edge_agent.install.lifecycle import (
    FINAL_STATES,
    TRANSITIONS,
    IllegalTransitionError,
    InstallEvent,
    InstallState,
    next_state,
)
from edge_agent.install.model_store import CRASH_POINTS, InstallOutcome, ModelStore
from edge_agent.install.probation import Probation, ProbationPolicy
from edge_agent.install.smoke import (
    SmokeLimits,
    effective_limits,
    run_smoke_isolated,
    run_smoke_test,
)
from edge_agent.install.updater import Updater
from fleetcore.archive import pack_bundle
from fleetcore.errors import EdgefleetError, InvalidInputError, NotFoundError
from fleetcore.release import Arm, ModelRelease, ReleaseDocument
from tests.onnx_delay import HANG, bloat_model, delayed_bundle
from tests.support import FakeBundleServer
from trainer.models import MLP
from trainer.onnx_tools import export_onnx, run_onnx

S = InstallState
E = InstallEvent
NAME = "demo"
GOOD_SIG = b"good-signature"


# ---------------------------------------------------------------------------- bundles
def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


def _write_bundle(out: Path, version: int, *, seed: int, tamper: str = "") -> Path:
    out.mkdir(parents=True)
    torch.manual_seed(seed)
    export_onnx(MLP(4, [8], 3), 4, out / "model.onnx")
    inputs = np.random.default_rng(seed).normal(size=(6, 4)).astype(np.float32)
    expected = run_onnx(out / "model.onnx", inputs)
    if tamper == "expected":
        expected = np.roll(expected, 1, axis=1)  # other classes predicted
    if tamper == "model":
        data = bytearray((out / "model.onnx").read_bytes())
        (out / "model.onnx").write_bytes(bytes(data[: len(data) // 2]) + b"\x00garbage")
    manifest = {
        "format": "edgefleet.bundle/v1", "name": NAME, "version": version,
        "input": {"name": "input", "dtype": "float32", "shape": [-1, 4],
                  "features": [{"name": f"f{i}"} for i in range(4)]},
        "output": {"name": "probabilities", "labels": ["a", "b", "c"]},
        "smoke_test": {"file": "model.onnx", "inputs": inputs.astype(float).tolist(),
                       "expected": expected.astype(float).tolist(), "atol": 0.02,
                       "require_same_argmax": True},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    (out / "profile.json").write_text("{}")
    (out / "model.sig").write_bytes(b"forged" if tamper == "signature" else GOOD_SIG)
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Pristine bundles: "1".."6", "9" and tampered variants of version 2."""
    root = tmp_path_factory.mktemp("bundles")
    out = {str(v): _write_bundle(root / str(v), v, seed=v) for v in (1, 2, 3, 4, 5, 6, 9)}
    for tamper in ("expected", "model", "signature"):
        out[f"2-{tamper}"] = _write_bundle(root / f"2-{tamper}", 2, seed=2, tamper=tamper)
    return out


def load_manifest(bundle: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((bundle / "manifest.json").read_bytes())
    return doc


def verify_sig(bundle: Path) -> dict[str, Any]:
    if (bundle / "model.sig").read_bytes() != GOOD_SIG:
        raise InvalidInputError("model.sig does not verify against the publisher key")
    return load_manifest(bundle)


def verify_rejects(bundle: Path) -> dict[str, Any]:
    raise InvalidInputError("bad signature")


@dataclass
class Kit:
    """Source bundles plus a scratch area standing in for the downloader's unpack dir."""

    sources: dict[str, Path]
    work: Path
    _n: itertools.count = field(default_factory=itertools.count)

    def unpacked(self, key: str) -> Path:
        dst = self.work / f"unpacked-{next(self._n)}"
        shutil.copytree(self.sources[key], dst)
        return dst

    def install(self, store: ModelStore, version: int, key: str | None = None) -> InstallOutcome:
        src = self.unpacked(key or str(version))
        store.begin(NAME, version, "sha256:" + "0" * 64, 1234)
        return store.install_from_dir(NAME, version, src)

    def install_committed(self, store: ModelStore, version: int) -> None:
        assert self.install(store, version).state == S.ACTIVE
        store.commit(NAME, version)


@pytest.fixture
def kit(sources: dict[str, Path], tmp_path: Path) -> Kit:
    work = tmp_path / "work"
    work.mkdir()
    return Kit(sources, work)


def _state(store: ModelStore, version: int) -> dict[str, Any]:
    return next(r for r in store.status() if r["name"] == NAME and r["version"] == version)


def _pointer(root: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((root / NAME / "active.json").read_bytes())
    return doc


def _on_disk(root: Path) -> set[int]:
    vroot = root / NAME / "versions"
    return {int(d.name) for d in vroot.iterdir()} if vroot.exists() else set()


# ---------------------------------------------------------------------------- state table
LEGAL = [
    (S.DOWNLOADING, E.DOWNLOAD_COMPLETE, S.VERIFYING),
    (S.VERIFYING, E.VERIFIED, S.STAGED),
    (S.STAGED, E.SMOKE_START, S.SMOKE_TESTING),
    (S.SMOKE_TESTING, E.SMOKE_PASSED, S.ACTIVE),
    (S.ACTIVE, E.PROBATION_PASSED, S.COMMITTED),
    (S.ACTIVE, E.REGRESS, S.ROLLED_BACK),
    (S.ACTIVE, E.SUPERSEDED, S.FAILED),
    (S.DOWNLOADING, E.FAIL, S.FAILED),
    (S.VERIFYING, E.FAIL, S.FAILED),
    (S.STAGED, E.FAIL, S.FAILED),
    (S.SMOKE_TESTING, E.FAIL, S.FAILED),
]
ILLEGAL = [(s, e) for s in S for e in E if (s, e) not in {(a, b) for a, b, _ in LEGAL}]


@pytest.mark.parametrize(("state", "event", "after"), LEGAL,
                         ids=[f"{s}-{e}" for s, e, _ in LEGAL])
def test_every_legal_move(state: InstallState, event: InstallEvent, after: InstallState) -> None:
    assert next_state(state, event) == after


def test_the_table_is_exactly_the_legal_moves() -> None:
    assert {(s, e): a for s, e, a in LEGAL} == TRANSITIONS
    assert len(ILLEGAL) == len(S) * len(E) - len(LEGAL)


@pytest.mark.parametrize(("state", "event"), ILLEGAL, ids=[f"{s}-{e}" for s, e in ILLEGAL])
def test_every_illegal_move_raises(state: InstallState, event: InstallEvent) -> None:
    with pytest.raises(IllegalTransitionError, match=str(state)):
        next_state(state, event)


def test_final_states_have_no_way_out_and_the_error_is_ours() -> None:
    assert {s for s, _ in TRANSITIONS}.isdisjoint(FINAL_STATES)
    assert {S.COMMITTED, S.FAILED, S.ROLLED_BACK} == FINAL_STATES
    assert issubclass(IllegalTransitionError, EdgefleetError)
    assert [s.value for s in S] == ["downloading", "verifying", "staged", "smoke-testing",
                                    "active", "committed", "failed", "rolled-back"]


# ---------------------------------------------------------------------------- smoke test
def test_smoke_passes_on_a_good_bundle(sources: dict[str, Path]) -> None:
    result = run_smoke_test(sources["1"], load_manifest(sources["1"]))
    assert result.ok, result.reason
    assert result.latency_us > 0


@pytest.mark.parametrize(("key", "change", "needle"), [
    ("2-expected", None, "outputs differ from expected"),
    ("2-expected", {"atol": 1.0}, "predicted class differs on"),
    ("2-model", None, "raised"),
    ("1", {"inputs": [[1.0, 2.0]]}, "raised"),  # wrong input width
    ("1", {"inputs": []}, "non-empty batch"),
    ("1", {"expected": [[0.0, 0.0]]}, "shape"),
    ("1", {"file": "../model.onnx"}, "file name"),
    ("1", {"file": "missing.onnx"}, "raised"),
], ids=["wrong-expected", "wrong-argmax", "corrupt-model", "wrong-width", "no-inputs",
        "wrong-shape", "path-escape", "missing-file"])
def test_smoke_failures_are_results_not_exceptions(
    sources: dict[str, Path], key: str, change: dict[str, Any] | None, needle: str
) -> None:
    manifest = load_manifest(sources[key])
    manifest["smoke_test"].update(change or {})
    result = run_smoke_test(sources[key], manifest)
    assert not result.ok
    assert needle in result.reason


def test_smoke_tolerance_is_absolute(sources: dict[str, Path]) -> None:
    manifest = load_manifest(sources["1"])
    expected = np.array(manifest["smoke_test"]["expected"])
    manifest["smoke_test"]["expected"] = (expected + 0.01).tolist()
    assert run_smoke_test(sources["1"], manifest).ok
    manifest["smoke_test"]["expected"] = (expected + 0.05).tolist()
    result = run_smoke_test(sources["1"], manifest)
    assert not result.ok
    assert "atol 0.02" in result.reason


# ---------------------------------------------------------------------------- probation
POLICY = ProbationPolicy(min_requests=50, max_error_rate=0.05, max_latency_ratio=2.0,
                         max_seconds=600.0)


def test_probation_waits_then_commits_when_healthy() -> None:
    p = Probation(POLICY, started_at=1000.0)
    for _ in range(49):
        p.record(True, 0.010)
    assert p.decide(1010.0, baseline_p95_s=0.010, acknowledged=True) == "wait"
    p.record(False, 0.010)  # 1 error in 50 is within 5 %
    assert p.decide(1010.0, baseline_p95_s=0.010, acknowledged=True) == "commit"
    assert "no regression" in p.reason


def test_probation_rolls_back_on_error_rate() -> None:
    p = Probation(POLICY, started_at=0.0)
    for i in range(100):
        p.record(i % 10 != 0, 0.010)  # 10 % errors
    assert p.decide(1.0, baseline_p95_s=None, acknowledged=True) == "rollback"
    assert "error rate 0.100" in p.reason


def test_probation_rolls_back_early_once_errors_decide_it() -> None:
    p = Probation(POLICY, started_at=0.0)
    for _ in range(3):  # 3 > 0.05 * 50: the rate at 50 requests is already over the limit
        p.record(False, 0.010)
    assert p.decide(1.0, baseline_p95_s=None, acknowledged=True) == "rollback"


def test_probation_rolls_back_on_latency_only_with_a_baseline() -> None:
    p = Probation(POLICY, started_at=0.0)
    for _ in range(60):
        p.record(True, 0.050)
    assert p.decide(1.0, baseline_p95_s=0.020, acknowledged=True) == "rollback"
    assert "p95 latency" in p.reason
    assert p.decide(1.0, baseline_p95_s=0.030, acknowledged=True) == "commit"
    assert p.decide(1.0, baseline_p95_s=None, acknowledged=True) == "commit"


def test_quiet_device_commits_after_max_seconds() -> None:
    p = Probation(POLICY, started_at=100.0)
    p.record(True, 0.5)
    assert p.decide(699.0, baseline_p95_s=0.001, acknowledged=True) == "wait"
    assert p.decide(700.0, baseline_p95_s=0.001, acknowledged=True) == "commit"
    assert "600 s" in p.reason


def test_probation_memory_is_bounded() -> None:
    p = Probation(ProbationPolicy(max_samples=500), started_at=0.0)
    for i in range(100_000):
        p.record(True, (i % 1000) / 1000)
    assert p.requests == 100_000
    assert p.sample_size == 500
    p95 = p.p95_s()
    assert p95 is not None
    assert abs(p95 - 0.95) < 0.05  # a uniform sample estimates the true p95 (0.949)


# ---------------------------------------------------------------------------- the store
def test_happy_path_commit_keep_three_and_reuse_a_kept_version(kit: Kit, tmp_path: Path) -> None:
    root = tmp_path / "models"
    store = ModelStore(root, verify=verify_sig)
    assert store.active(NAME) is None

    out = kit.install(store, 1)
    assert out == InstallOutcome(1, S.ACTIVE, "in probation")
    assert _state(store, 1)["state"] == "active"
    assert _state(store, 1)["smoke_latency_us"] > 0
    store.commit(NAME, 1)
    assert _state(store, 1)["state"] == "committed"

    assert kit.install(store, 2).state == S.ACTIVE
    assert _pointer(root) == {"version": 2, "previous": [1]}
    store.commit(NAME, 2)
    for v in (3, 4, 5):
        kit.install_committed(store, v)
    active = store.active(NAME)
    assert active is not None
    assert active[0] == 5
    assert _tree(active[1]) == _tree(kit.sources["5"])
    assert _pointer(root) == {"version": 5, "previous": [4, 3]}
    assert _on_disk(root) == {3, 4, 5}  # keep_committed=3
    assert not (root / NAME / "staging").exists() or not any((root / NAME / "staging").iterdir())

    # A release pointing back at v3: no download, no new record, just the pointer.
    records_before = (root / NAME / "installs.json").read_bytes()
    store.begin(NAME, 3, "sha256:" + "0" * 64, 1234)
    assert (root / NAME / "installs.json").read_bytes() == records_before
    store.activate_kept(NAME, 3)
    assert store.active(NAME) == (3, root / NAME / "versions" / "3")
    assert _pointer(root) == {"version": 3, "previous": [5, 4]}
    # Handing the store an unpacked copy of a kept version re-activates the kept one.
    assert kit.install(store, 4) == InstallOutcome(4, S.COMMITTED, "kept version activated")
    assert _pointer(root) == {"version": 4, "previous": [3, 5]}
    serving = [(r["version"], r["state"]) for r in store.status() if r["serving"]]
    assert serving == [(4, "committed")]
    with pytest.raises(NotFoundError):
        store.activate_kept(NAME, 1)  # pruned from disk


def test_smoke_test_failure_is_never_served(kit: Kit, tmp_path: Path) -> None:
    root = tmp_path / "models"
    store = ModelStore(root, verify=verify_sig)
    kit.install_committed(store, 1)
    pointer = (root / NAME / "active.json").read_bytes()

    out = kit.install(store, 2, "2-expected")
    assert out.state == S.FAILED
    assert out.reason.startswith("smoke test failed: outputs differ from expected")
    assert (root / NAME / "active.json").read_bytes() == pointer
    assert _on_disk(root) == {1}
    assert _state(store, 2)["state"] == "failed"
    assert _state(store, 2)["reason"] == out.reason
    assert not _state(store, 2)["serving"]


def test_corrupt_model_fails_smoke(kit: Kit, tmp_path: Path) -> None:
    root = tmp_path / "models"
    store = ModelStore(root, verify=verify_sig)
    kit.install_committed(store, 1)
    out = kit.install(store, 2, "2-model")
    assert out.state == S.FAILED
    assert "smoke test raised" in out.reason
    assert store.active(NAME) == (1, root / NAME / "versions" / "1")
    assert _on_disk(root) == {1}
    # The same version, correctly built, installs afterwards.
    assert kit.install(store, 2).state == S.ACTIVE


@pytest.mark.parametrize(("verify", "key", "needle"), [
    (verify_rejects, "2", "bad signature"),
    (verify_sig, "2-signature", "does not verify"),
    (verify_sig, "3", "manifest says version 3; expected 2"),  # v3's signed bundle as v2
], ids=["verifier-raises", "forged-signature", "bundle-swapped-for-other-version"])
def test_verification_failure_leaves_state_unchanged(
    kit: Kit, tmp_path: Path, verify: Callable[[Path], dict[str, Any]], key: str, needle: str
) -> None:
    root = tmp_path / "models"
    kit.install_committed(ModelStore(root, verify=verify_sig), 1)
    pointer = (root / NAME / "active.json").read_bytes()
    versions = _tree(root / NAME / "versions")

    store = ModelStore(root, verify=verify)
    src = kit.unpacked(key)
    store.begin(NAME, 2, "sha256:" + "0" * 64, 1234)
    out = store.install_from_dir(NAME, 2, src)
    assert out.state == S.FAILED
    assert out.reason.startswith("verification failed: ")
    assert needle in out.reason
    assert (root / NAME / "active.json").read_bytes() == pointer
    assert _tree(root / NAME / "versions") == versions
    assert not src.exists()
    assert not any((root / NAME / "staging").iterdir())
    assert _state(store, 2)["state"] == "failed"


def test_probation_regression_rolls_back_locally(kit: Kit, tmp_path: Path) -> None:
    root = tmp_path / "models"
    clock = [1000.0]
    store = ModelStore(root, verify=verify_sig, clock=lambda: clock[0])
    kit.install_committed(store, 1)
    assert kit.install(store, 2).state == S.ACTIVE

    probation = Probation(POLICY, started_at=clock[0])
    for i in range(60):
        probation.record(ok=i % 5 != 0, latency_s=0.002)
    assert probation.decide(clock[0] + 30, baseline_p95_s=0.002, acknowledged=True) == "rollback"
    assert store.rollback(NAME, probation.reason) == 1

    active = store.active(NAME)
    assert active is not None
    assert active[0] == 1
    assert _tree(active[1]) == _tree(kit.sources["1"])
    assert _pointer(root) == {"version": 1, "previous": []}
    assert _state(store, 2)["state"] == "rolled-back"
    assert _state(store, 2)["reason"] == probation.reason
    assert _on_disk(root) == {1}
    with pytest.raises(IllegalTransitionError):
        store.rollback(NAME, "v1 is committed, not in probation")


def test_rolling_back_the_first_version_serves_nothing(kit: Kit, tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models", verify=verify_sig)
    kit.install(store, 1)
    assert store.rollback(NAME, "errors") is None
    assert store.active(NAME) is None


def test_newer_install_supersedes_a_version_in_probation(kit: Kit, tmp_path: Path) -> None:
    root = tmp_path / "models"
    store = ModelStore(root, verify=verify_sig)
    kit.install_committed(store, 1)
    kit.install(store, 2)
    kit.install(store, 3)
    assert _pointer(root) == {"version": 3, "previous": [1]}  # v2 was never proven
    assert _state(store, 2)["state"] == "failed"
    assert "superseded by v3" in _state(store, 2)["reason"]
    assert _on_disk(root) == {1, 3}


def test_out_of_order_calls_raise_and_change_nothing(kit: Kit, tmp_path: Path) -> None:
    root = tmp_path / "models"
    store = ModelStore(root, verify=verify_sig)
    kit.install_committed(store, 1)
    before = _tree(root)
    src = kit.unpacked("2")
    with pytest.raises(IllegalTransitionError, match="begin"):
        store.install_from_dir(NAME, 2, src)  # no begin()
    with pytest.raises(IllegalTransitionError):
        store.commit(NAME, 2)
    with pytest.raises(IllegalTransitionError):
        store.commit(NAME, 1)  # already committed
    with pytest.raises(InvalidInputError):
        store.begin("../escape", 1, "sha256:", 1)
    with pytest.raises(EdgefleetError, match="no verify"):
        ModelStore(root).install_from_dir(NAME, 2, src)
    assert _tree(root) == before


def test_download_failure_is_recorded(kit: Kit, tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models", verify=verify_sig)
    kit.install_committed(store, 1)
    store.begin(NAME, 2, "sha256:" + "0" * 64, 1234)
    store.fail(NAME, 2, "digest mismatch")
    assert _state(store, 2)["state"] == "failed"
    assert _state(store, 2)["reason"] == "digest mismatch"
    assert kit.install(store, 2).state == S.ACTIVE  # a later try starts over


# ---------------------------------------------------------------------------- crashes
class Crash(BaseException):
    """Stands in for a kill: BaseException, so no ``except Exception`` can swallow it."""


def _crash_at(point: str) -> Callable[[str], None]:
    def hook(name: str) -> None:
        if name == point:
            raise Crash(point)
    return hook


@dataclass(frozen=True)
class Scenario:
    id: str
    committed: tuple[int, ...]  # installed and committed first, in order
    probation: int | None  # then installed and left in probation
    op: Callable[[ModelStore, Kit], object]
    before: int | None  # serving before op
    after: int | None  # serving once op finished
    retry: int  # installed (and committed) after recovery: it must finish
    points: tuple[str, ...]  # the crash points op passes, in order
    # From this crash point on, recovery must serve ``after`` (the decision was durable).
    decided_at: str | None = None

    def serving_after_crash_at(self, point: str) -> int | None:
        if self.decided_at is None:
            return self.before
        decided = self.points.index(point) >= self.points.index(self.decided_at)
        return self.after if decided else self.before


def _download_fails(store: ModelStore) -> None:
    store.begin(NAME, 2, "sha256:" + "0" * 64, 1234)
    store.fail(NAME, 2, "digest mismatch")


INSTALL = ("begin:downloading", "install:verifying", "install:in-staging", "install:moved",
           "install:staged", "install:smoke-testing", "install:pointer-swapped",
           "install:active")
SCENARIOS = [
    Scenario("first-install", (), None, lambda s, k: k.install(s, 1), None, 1, 1, INSTALL,
             "install:pointer-swapped"),
    Scenario("install", (1,), None, lambda s, k: k.install(s, 2), 1, 2, 2, INSTALL,
             "install:pointer-swapped"),
    Scenario("install-over-probation", (1,), 2, lambda s, k: k.install(s, 3), 2, 3, 3,
             (*INSTALL, "install:superseded"), "install:pointer-swapped"),
    Scenario("smoke-fails", (1,), None, lambda s, k: k.install(s, 2, "2-expected"), 1, 1, 2,
             (*INSTALL[:6], "install:smoke-failed")),
    Scenario("verify-fails", (1,), None, lambda s, k: k.install(s, 2, "2-signature"), 1, 1, 2,
             (*INSTALL[:3], "install:verify-failed")),
    Scenario("download-fails", (1,), None, lambda s, k: _download_fails(s), 1, 1, 2,
             ("begin:downloading", "fail:recorded")),
    Scenario("commit-and-prune", (1, 2, 3), 4, lambda s, k: s.commit(NAME, 4), 4, 4, 6,
             ("commit:committed", "commit:pruned")),
    Scenario("rollback", (1,), 2, lambda s, k: s.rollback(NAME, "errors"), 2, 1, 6,
             ("rollback:recorded", "rollback:pointer-swapped"), "rollback:recorded"),
    Scenario("activate-kept", (1, 2), None, lambda s, k: s.activate_kept(NAME, 1), 2, 1, 6,
             ("activate:pointer-swapped",), "activate:pointer-swapped"),
    Scenario("activate-kept-over-probation", (1,), 2, lambda s, k: s.activate_kept(NAME, 1),
             2, 1, 6, ("activate:pointer-swapped", "activate:superseded"),
             "activate:pointer-swapped"),
]
CASES = [(sc, point) for sc in SCENARIOS for point in sc.points]


def _prepare(root: Path, kit: Kit, sc: Scenario) -> None:
    store = ModelStore(root, verify=verify_sig)
    for v in sc.committed:
        kit.install_committed(store, v)
    if sc.probation is not None:
        assert kit.install(store, sc.probation).state == S.ACTIVE
    current = store.active(NAME)
    assert (current[0] if current else None) == sc.before


def _assert_consistent(root: Path, kit: Kit, allowed: set[int | None]) -> int | None:
    """Exactly one whole version (or none) serves, nothing half-done is left behind."""
    store = ModelStore(root, verify=verify_sig)
    active = store.active(NAME)
    serving = active[0] if active else None
    assert serving in allowed
    for v in _on_disk(root):  # every kept directory is a whole bundle, never a mix
        assert _tree(root / NAME / "versions" / str(v)) == _tree(kit.sources[str(v)])
    staging = root / NAME / "staging"
    assert not staging.exists() or not any(staging.iterdir())
    assert not list(root.rglob("*.tmp"))
    states = {r["version"]: r["state"] for r in store.status()}
    assert not {v for v, s in states.items() if s in
                {"downloading", "verifying", "staged", "smoke-testing"}}
    assert {v for v, s in states.items() if s == "active"} <= {serving}
    if serving is not None:
        assert states[serving] in {"active", "committed"}
    pointer = _pointer(root) if (root / NAME / "active.json").exists() else {"previous": []}
    assert all(states[v] == "committed" for v in pointer["previous"])
    assert _on_disk(root) <= {serving} | {v for v, s in states.items() if s == "committed"}
    assert set(pointer["previous"]) <= _on_disk(root)
    return serving


def test_crash_points_are_all_covered() -> None:
    assert {p for sc in SCENARIOS for p in sc.points} == set(CRASH_POINTS)


@pytest.mark.parametrize("sc", SCENARIOS, ids=[sc.id for sc in SCENARIOS])
def test_scenarios_pass_exactly_their_declared_crash_points(
    kit: Kit, tmp_path: Path, sc: Scenario
) -> None:
    root = tmp_path / "models"
    _prepare(root, kit, sc)
    seen: list[str] = []
    sc.op(ModelStore(root, verify=verify_sig, crash_hook=seen.append), kit)
    assert tuple(seen) == sc.points
    assert _assert_consistent(root, kit, {sc.after}) == sc.after


@pytest.mark.parametrize(("sc", "point"), CASES, ids=[f"{sc.id}@{p}" for sc, p in CASES])
def test_crash_at_every_step_leaves_old_or_new_and_recovers(
    kit: Kit, tmp_path: Path, sc: Scenario, point: str
) -> None:
    root = tmp_path / "models"
    _prepare(root, kit, sc)
    with pytest.raises(Crash):
        sc.op(ModelStore(root, verify=verify_sig, crash_hook=_crash_at(point)), kit)

    store = ModelStore(root, verify=verify_sig)  # the restarted agent
    store.recover()
    expected = sc.serving_after_crash_at(point)
    assert _assert_consistent(root, kit, {sc.before, sc.after}) == expected
    store.recover()  # idempotent
    assert _assert_consistent(root, kit, {expected}) == expected

    out = kit.install(store, sc.retry)
    assert out.state in {S.ACTIVE, S.COMMITTED}
    if _state(store, sc.retry)["state"] == "active":
        store.commit(NAME, sc.retry)
    assert _assert_consistent(root, kit, {sc.retry}) == sc.retry
    assert _state(store, sc.retry)["state"] == "committed"


# ---------------------------------------------------------------------------- updater
def _release(serial: int, arm: Arm) -> ReleaseDocument:
    return ReleaseDocument(device_id="dev-1", serial=serial, issued_at=0.0, expires_at=1e12,
                           models=(ModelRelease(NAME, (arm,)),), digest="sha256:" + "1" * 64)


@pytest.mark.parametrize("key", ["2-expected", "2-signature"], ids=["smoke", "signature"])
def test_failed_install_is_not_retried_for_the_same_release(
    sources: dict[str, Path], tmp_path: Path, key: str
) -> None:
    """A bundle that fails its smoke test (or verification) is downloaded and tested once per
    release serial, not again on every resync of the same release document."""
    digest, length = pack_bundle(sources[key], tmp_path / "bundle.tar")
    server = FakeBundleServer((tmp_path / "bundle.tar").read_bytes())
    smoke_runs: list[int] = []

    def smoke(bundle: Path, manifest: dict[str, Any]) -> Any:
        smoke_runs.append(manifest["version"])
        return run_smoke_test(bundle, manifest)

    store = ModelStore(tmp_path / "models", verify=verify_sig, smoke=smoke)
    updater = Updater(store, tmp_path / "downloads", policy=POLICY)
    arm = Arm(version=2, digest=digest, length=length, weight=1.0)

    for _ in range(3):  # the first sync and two resyncs of the same document
        asyncio.run(updater.apply(_release(7, arm), server))
    assert len(server.requests) == 1
    assert len(smoke_runs) == (1 if key == "2-expected" else 0)
    assert _state(store, 2)["state"] == "failed"
    assert store.active(NAME) is None

    asyncio.run(updater.apply(_release(8, arm), server))  # a new serial retries it
    assert len(server.requests) == 2


# ---------------------------------------------------------------------------- smoke limits
def test_manifest_can_only_lower_the_agents_smoke_limits() -> None:
    agent = SmokeLimits(call_timeout_s=10.0, load_timeout_s=60.0, latency_budget_s=1.0)
    lower = {"smoke_test": {"timeout_seconds": 2, "latency_budget_ms": 50}}
    assert effective_limits(lower, agent) == SmokeLimits(2.0, 60.0, 0.05)
    higher = {"smoke_test": {"timeout_seconds": 3600, "latency_budget_ms": 10_000}}
    assert effective_limits(higher, agent) == agent
    for bad in (0, -1, True, "5", None):
        odd = {"smoke_test": {"timeout_seconds": bad, "latency_budget_ms": bad}}
        assert effective_limits(odd, agent) == agent
    assert effective_limits({}, agent) == agent


def test_isolated_smoke_passes_a_good_bundle(sources: dict[str, Path]) -> None:
    result = run_smoke_isolated(sources["1"], load_manifest(sources["1"]))
    assert result.ok, result.reason
    assert result.latency_us > 0


def test_isolated_smoke_stops_a_model_that_never_finishes(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    bundle = delayed_bundle(sources["1"], tmp_path / "hang", 1, HANG)
    result = run_smoke_isolated(bundle, load_manifest(bundle),
                                SmokeLimits(call_timeout_s=1.0))
    assert not result.ok
    assert result.reason == ("smoke test overran its time limit of 1 s in smoke call 1 "
                             "(the model was stopped)")


def test_isolated_smoke_over_its_latency_budget_fails(sources: dict[str, Path]) -> None:
    manifest = load_manifest(sources["1"])
    manifest["smoke_test"]["latency_budget_ms"] = 1e-6  # a nanosecond: no runtime call fits
    result = run_smoke_isolated(sources["1"], manifest)
    assert not result.ok
    assert "the latency budget is 1e-06 ms" in result.reason


def test_a_crashed_smoke_process_is_a_result_with_its_signal(tmp_path: Path) -> None:
    """What the agent reports when the runtime dies under the smoke test: a real process
    killed by SIGSEGV after writing to stderr (no model to hand crashes ONNX Runtime on
    purpose; the parent's path from the exit status on is the same)."""
    with (tmp_path / "err").open("w+b") as err:
        proc = subprocess.run([sys.executable, "-c", "import os, signal, sys; "
                               "sys.stderr.write('onnxruntime: fatal\\n'); sys.stderr.flush(); "
                               "os.kill(os.getpid(), signal.SIGSEGV)"], stderr=err, check=False)
        result = smoke_module._crashed(proc.returncode, err)
    assert not result.ok
    assert result.reason == ("the runtime crashed during the smoke test (signal SIGSEGV): "
                             "onnxruntime: fatal")


# ---------------------------------------------------------------------------- restarts, ack
def test_probation_needs_an_acknowledged_report_to_commit() -> None:
    p = Probation(POLICY, started_at=0.0)
    assert p.decide(700.0, None, acknowledged=False) == "wait"  # quiet and unreported
    assert "waiting for the control plane" in p.reason
    for _ in range(60):
        p.record(True, 0.010)
    assert p.decide(1.0, 0.010, acknowledged=False) == "wait"
    assert p.decide(1.0, 0.010, acknowledged=True) == "commit"
    for _ in range(10):
        p.record(False, 0.010)  # unacknowledged does not shield it from a regression
    assert p.decide(1.0, 0.010, acknowledged=False) == "rollback"


def test_probation_rolls_back_after_max_restarts_whatever_else() -> None:
    p = Probation(POLICY, started_at=0.0)
    for _ in range(60):
        p.record(True, 0.010)
    p.restarts = POLICY.max_restarts - 1
    assert p.decide(1.0, None, acknowledged=True) == "commit"
    p.restarts = POLICY.max_restarts
    assert p.decide(1.0, None, acknowledged=True) == "rollback"
    assert "restarted 3 times" in p.reason


def test_probation_round_trips_through_its_document() -> None:
    p = Probation(POLICY, started_at=123.0, baseline_p95_s=0.004)
    for i in range(40):
        p.record(i % 20 != 0, i / 1000)
    p.restarts, p.acknowledged = 2, True
    q = Probation.from_doc(POLICY, json.loads(json.dumps(p.to_doc(7))))
    assert (q.started_at, q.baseline_p95_s, q.requests, q.errors, q.restarts,
            q.acknowledged, q.p95_s()) == (123.0, 0.004, 40, 2, 2, True, p.p95_s())
    for bad in ({**p.to_doc(7), "errors": 41}, {**p.to_doc(7), "restarts": -1},
                {k: v for k, v in p.to_doc(7).items() if k != "requests"}):
        with pytest.raises((KeyError, ValueError)):
            Probation.from_doc(POLICY, bad)


def test_updater_counts_restarts_on_probation_and_rolls_back_a_crash_loop(
    kit: Kit, tmp_path: Path
) -> None:
    store = ModelStore(tmp_path / "models", verify=verify_sig)
    kit.install_committed(store, 1)
    policy = ProbationPolicy(max_seconds=3600.0, max_restarts=3)
    updater = Updater(store, tmp_path / "downloads", policy=policy)
    assert kit.install(store, 2).state == S.ACTIVE
    # What the updater does after an activation, by hand (no download here).
    updater.probation[NAME] = (2, Probation(policy, 0.0))
    for _ in range(4):
        updater.record(NAME, 2, True, 0.001)
    updater.save()
    for restart in (1, 2):
        again = Updater(store, tmp_path / "downloads", policy=policy)
        assert again.probation[NAME][1].restarts == restart
        assert again.probation[NAME][1].requests == 4
        assert store.active(NAME)[0] == 2  # type: ignore[index]
    Updater(store, tmp_path / "downloads", policy=policy)
    assert store.active(NAME)[0] == 1  # type: ignore[index]
    assert _state(store, 2)["state"] == "rolled-back"
    assert "crash loop" in _state(store, 2)["reason"]
    assert not (tmp_path / "models" / NAME / "probation.json").exists()


def test_served_latency_of_the_committed_version_is_the_next_baseline(
    kit: Kit, tmp_path: Path
) -> None:
    store = ModelStore(tmp_path / "models", verify=verify_sig)
    kit.install_committed(store, 1)
    updater = Updater(store, tmp_path / "downloads", policy=POLICY)
    assert updater.served[NAME][0] == 1
    for i in range(POLICY.min_requests - 1):
        updater.record(NAME, 1, True, 0.001 * (1 + i % 2))
    updater.tick()
    assert _state(store, 1)["served_p95_s"] is None  # too few requests to be a baseline
    updater.record(NAME, 1, True, 0.002)
    updater.record(NAME, 1, False, 9.0)  # a failed request is no latency sample
    updater.tick()
    assert _state(store, 1)["served_p95_s"] == 0.002
    assert _state(store, 1)["served_requests"] == POLICY.min_requests
    assert kit.install(store, 2).state == S.ACTIVE
    assert updater._baseline_p95(NAME) == 0.002


def test_isolated_smoke_of_a_model_that_allocates_too_much_fails_within_its_memory_limit(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    """1 GB of zeros in front of the real model: the same answers, so only the child's
    address-space limit can fail it (the smoke child of this model peaks at ~250 MB)."""
    bundle = delayed_bundle(sources["1"], tmp_path / "bloated", 1, 1)
    bloat_model(sources["1"] / "model.onnx", bundle / "model.onnx", 256 * 1024**2)
    small = run_smoke_isolated(bundle, load_manifest(bundle),
                               SmokeLimits(memory_bytes=768 * 1024**2))
    assert not small.ok and "differ" not in small.reason, small.reason
    roomy = run_smoke_isolated(bundle, load_manifest(bundle),
                               SmokeLimits(memory_bytes=4 * 1024**3))
    assert roomy.ok, roomy.reason  # the same model within a larger limit
