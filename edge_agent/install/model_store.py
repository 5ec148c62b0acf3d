"""The agent's model store: the persisted shell around the install lifecycle (docs/design.md §5).

Layout under ``root`` (``STATE/models``)::

    <name>/versions/<version>/   bundle files, complete and verified only
    <name>/staging/<version>/    an install in progress (removed at start-up)
    <name>/installs.json         {"versions": {"<v>": record}}: state, reason, digest, ...
    <name>/active.json           {"version": v | null, "previous": [rollback targets]}
    <name>/probation.json        the probation of the version serving in state active:
                                 counters, restarts, acknowledgement (``edge_agent.install
                                 .probation``); the store only keeps it, atomically

Rules:

* ``active.json`` alone says what is served; activation and rollback are one atomic replace of
  it, so a crash leaves exactly the old or the new version serving, never a mix. It only ever
  points at a directory that is complete, verified and fsynced.
* Every state change goes through ``lifecycle.next_state`` and is written (atomically) before
  the next irreversible step; ``crash_hook(point)`` runs at every step boundary (``CRASH_POINTS``)
  so tests can stop the process there.
* ``previous`` holds committed versions on disk, most recently served first; a version still in
  probation is never a rollback target. The newest ``keep_committed`` committed versions stay on
  disk (and the served one, always).
* ``recover()`` at start-up finishes or undoes whatever a crash interrupted: the pointer decides;
  interrupted installs become failed ("interrupted"); what nothing needs is removed.

Not thread-safe across processes: one agent owns one root. Calls from several threads of that
agent are serialized by a lock.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.install.lifecycle import (
    TRANSIENT_STATES,
    IllegalTransitionError,
    InstallEvent,
    InstallState,
    next_state,
)
from edge_agent.install.smoke import SmokeResult, run_smoke_test
from fleetcore import strict_json
from fleetcore.errors import EdgefleetError, InvalidInputError, NotFoundError
from fleetcore.files import atomic_write, fsync_dir

__all__ = ["CRASH_POINTS", "InstallOutcome", "ModelStore"]

logger = logging.getLogger(__name__)

# Every point at which ModelStore calls crash_hook, in the order an install meets them.
CRASH_POINTS: tuple[str, ...] = (
    "begin:downloading",
    "install:verifying",
    "install:in-staging",
    "install:verify-failed",
    "install:moved",
    "install:staged",
    "install:smoke-testing",
    "install:smoke-failed",
    "install:pointer-swapped",
    "install:active",
    "install:superseded",
    "commit:committed",
    "commit:pruned",
    "rollback:recorded",
    "rollback:pointer-swapped",
    "activate:pointer-swapped",
    "activate:superseded",
    "fail:recorded",
)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_INSTALLS = "installs.json"
_ACTIVE = "active.json"
_PROBATION = "probation.json"
_MAX_FINISHED_RECORDS = 32  # failed/rolled-back/old records kept for status, newest first

_S = InstallState
_E = InstallEvent


@dataclass(frozen=True)
class InstallOutcome:
    version: int
    state: InstallState
    reason: str


class _RefusedError(EdgefleetError):
    """An install step failed and was recorded as such (internal: becomes an outcome)."""


@dataclass
class _Pointer:
    version: int | None
    previous: list[int]


class ModelStore:
    """Installs, activates, commits and rolls back model versions under ``root``."""

    def __init__(
        self,
        root: Path,
        *,
        keep_committed: int = 3,
        verify: Callable[[Path], dict[str, Any]] | None = None,
        smoke: Callable[[Path, dict[str, Any]], SmokeResult] = run_smoke_test,
        crash_hook: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.time,
        on_transition: Callable[[str, int, str, str], None] | None = None,
    ) -> None:
        """``verify(bundle_dir)`` checks the signature and returns the manifest, or raises.

        Without ``verify`` the store can serve, commit, roll back and recover, but refuses to
        install: there is deliberately no unverified default. ``smoke`` runs in this process
        by default; the agent passes ``smoke.run_smoke_isolated`` (a child with time limits).
        ``on_transition(name, version, state, reason)`` is told of every state change, from
        whichever thread made it.
        """
        if keep_committed < 1:
            raise ValueError(f"keep_committed must be >= 1; got {keep_committed}")
        self.root = Path(root)
        self.keep_committed = keep_committed
        self._verify = verify
        self._smoke = smoke
        self._crash_hook = crash_hook
        self._clock = clock
        self._on_transition = on_transition
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ install steps
    def begin(self, name: str, version: int, digest: str, length: int) -> None:
        """Record that ``version`` is being downloaded (a kept or serving version needs none)."""
        _check_version(version)
        with self._lock:
            records = self._load_records(name)
            rec = records.get(version)
            if self._load_pointer(name).version == version:
                logger.info("%s v%d is already serving; nothing to download", name, version)
                return
            if rec is not None and rec["state"] == _S.COMMITTED and self._vdir(
                name, version
            ).is_dir():
                logger.info("%s v%d is kept on disk; nothing to download", name, version)
                return
            records[version] = {
                "version": version, "digest": digest, "length": length,
                "state": str(_S.DOWNLOADING), "reason": "", "updated_at": self._clock(),
                "smoke_latency_us": None,
            }
            self._save_records(name, records)
            self._hook("begin:downloading")
            if self._on_transition is not None:
                self._on_transition(name, version, str(_S.DOWNLOADING), "")

    def staging_dir(self, name: str, version: int) -> Path:
        """Where a downloader should unpack ``version`` (same file system: no copy needed)."""
        return self._mdir(name) / "staging" / str(_check_version(version))

    def install_from_dir(self, name: str, version: int, extracted_dir: Path, *,
                         activate: bool = True) -> InstallOutcome:
        """Verify, stage, smoke-test and activate an unpacked bundle (the store owns the dir).

        With ``activate=False`` (a challenger or shadow arm of an experiment) the verified,
        smoke-tested version is kept as committed without taking the pointer: the experiment,
        not local probation, judges it, and serving routes to it by the release's weights.
        A failed verification or smoke test is an outcome (state failed), not an exception.

        Verification and the smoke test run without the store's lock (they can take minutes):
        status, commit and rollback of other versions go on meanwhile; one install at a time.
        """
        extracted_dir = Path(extracted_dir)
        with self._lock:
            pointer = self._load_pointer(name)
            records = self._load_records(name)
            if pointer.version == version:
                shutil.rmtree(extracted_dir, ignore_errors=True)
                state = _S(records[version]["state"]) if version in records else _S.ACTIVE
                return InstallOutcome(version, state, "already serving")
            rec = records.get(version)
            if rec is not None and rec["state"] == _S.COMMITTED and self._vdir(
                name, version
            ).is_dir():
                shutil.rmtree(extracted_dir, ignore_errors=True)
                self.activate_kept(name, version)
                return InstallOutcome(version, _S.COMMITTED, "kept version activated")
            verify = self._verify
            if verify is None:
                raise EdgefleetError("this ModelStore has no verify callable; it cannot install")
            if not extracted_dir.is_dir():
                raise NotFoundError(f"expected an unpacked bundle at {extracted_dir}; none there")
            self._transition(name, version, _E.DOWNLOAD_COMPLETE)
            self._hook("install:verifying")
        try:
            final, manifest = self._stage(name, version, extracted_dir, verify)
            latency_us = self._smoke_test(name, version, final, manifest)
        except _RefusedError as exc:
            logger.warning("%s v%d not served: %s", name, version, exc)
            return InstallOutcome(version, _S.FAILED, str(exc))
        with self._lock:
            if not activate:
                self._transition(name, version, _E.SMOKE_PASSED, "experiment arm",
                                 smoke_latency_us=latency_us)
                self._transition(name, version, _E.PROBATION_PASSED,
                                 "experiment arm (smoke test passed)")
                return InstallOutcome(version, _S.COMMITTED, "experiment arm")
            # The pointer may have moved while the lock was free (a rollback): read it again.
            self._activate_new(name, version, self._load_pointer(name),
                               self._load_records(name), latency_us)
            return InstallOutcome(version, _S.ACTIVE, "in probation")

    def _stage(self, name: str, version: int, extracted_dir: Path,
               verify: Callable[[Path], dict[str, Any]]) -> tuple[Path, dict[str, Any]]:
        """verifying -> staged: verify in staging, then move into versions/ (fsynced)."""
        staged = self.staging_dir(name, version)
        if extracted_dir.resolve() != staged.resolve():
            shutil.rmtree(staged, ignore_errors=True)
            staged.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(extracted_dir, staged)
        self._hook("install:in-staging")
        try:
            manifest = verify(staged)
            _check_manifest(name, version, manifest)
        except Exception as exc:
            reason = f"verification failed: {exc}"
            # Clean up before the failure is recorded (and reported): whoever sees the refusal
            # sees the models directory as it was before the bundle arrived.
            shutil.rmtree(staged, ignore_errors=True)
            with self._lock:
                self._transition(name, version, _E.FAIL, reason)
                self._hook("install:verify-failed")
            raise _RefusedError(reason) from None

        _fsync_tree(staged)  # the files are durable before any rename can publish them
        final = self._vdir(name, version)
        with self._lock:
            shutil.rmtree(final, ignore_errors=True)  # a leftover of an earlier failed try
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, final)
            fsync_dir(final)
            fsync_dir(final.parent)
            self._hook("install:moved")
            self._transition(name, version, _E.VERIFIED)
            self._hook("install:staged")
        return final, manifest

    def _smoke_test(self, name: str, version: int, final: Path, manifest: dict[str, Any]) -> float:
        """staged -> smoke-testing; a failure removes the version: it is never served."""
        with self._lock:
            self._transition(name, version, _E.SMOKE_START)
            self._hook("install:smoke-testing")
        try:
            result = self._smoke(final, manifest)
        except Exception as exc:
            result = SmokeResult(False, f"smoke test raised {type(exc).__name__}: {exc}", 0.0)
        if not result.ok:
            reason = f"smoke test failed: {result.reason}"
            with self._lock:  # removed before the failure is recorded, as in _stage
                shutil.rmtree(final, ignore_errors=True)
                self._transition(name, version, _E.FAIL, reason)
                self._hook("install:smoke-failed")
            raise _RefusedError(reason)
        return result.latency_us

    def _activate_new(self, name: str, version: int, pointer: _Pointer,
                      records: dict[int, dict[str, Any]], latency_us: float) -> None:
        """smoke-testing -> active: swap the pointer first; the record follows."""
        old = pointer.version
        old_state = records[old]["state"] if old is not None and old in records else None
        self._save_pointer(name, _Pointer(version, self._previous_after(name, pointer, version)))
        self._hook("install:pointer-swapped")
        self._transition(name, version, _E.SMOKE_PASSED, "in probation",
                         smoke_latency_us=latency_us)
        self._hook("install:active")
        logger.info("%s v%d active (probation); smoke batch %.0f us", name, version, latency_us)
        self._retire_if_on_probation(name, old, old_state, version, "install")

    def _retire_if_on_probation(self, name: str, old: int | None, old_state: str | None,
                                version: int, step: str) -> None:
        """The version that lost the pointer was still on probation: it is superseded (never
        committed, so nothing would roll back to it) and its files go."""
        if old is not None and old_state == _S.ACTIVE:
            self._supersede(name, old, version)
            self._hook(f"{step}:superseded")
            shutil.rmtree(self._vdir(name, old), ignore_errors=True)

    def commit(self, name: str, version: int) -> None:
        """Probation passed: keep ``version``, and only the newest ``keep_committed`` on disk."""
        with self._lock:
            if self._load_pointer(name).version != version:
                raise IllegalTransitionError(f"{name} v{version} is not the serving version")
            self._transition(name, version, _E.PROBATION_PASSED, "probation passed")
            self._hook("commit:committed")
            self._prune(name)
            self._hook("commit:pruned")
            logger.info("%s v%d committed", name, version)

    def rollback(self, name: str, reason: str) -> int | None:
        """Probation failed: serve the previous committed version again; return it (or None)."""
        with self._lock:
            pointer = self._load_pointer(name)
            if pointer.version is None:
                raise IllegalTransitionError(f"{name}: nothing is serving; nothing to roll back")
            bad = pointer.version
            self._transition(name, bad, _E.REGRESS, reason)
            self._hook("rollback:recorded")
            target = self._rollback_target(name, pointer)
            self._save_pointer(name, target)
            self._hook("rollback:pointer-swapped")
            shutil.rmtree(self._vdir(name, bad), ignore_errors=True)
            logger.warning("%s v%d rolled back to %s: %s", name, bad, target.version, reason)
            return target.version

    def activate_kept(self, name: str, version: int) -> None:
        """Serve an already committed version that is still on disk, without a download."""
        with self._lock:
            records = self._load_records(name)
            rec = records.get(version)
            if rec is None or rec["state"] != _S.COMMITTED or not self._vdir(
                name, version
            ).is_dir():
                raise NotFoundError(
                    f"{name} v{version} is not a committed version kept on disk; kept: "
                    f"{self._committed_on_disk(name, records)}"
                )
            pointer = self._load_pointer(name)
            old = pointer.version
            if old == version:
                return
            old_state = records[old]["state"] if old is not None and old in records else None
            self._save_pointer(name, _Pointer(version, self._previous_after(name, pointer,
                                                                            version)))
            self._hook("activate:pointer-swapped")
            logger.info("%s: kept v%d serving again (was v%s)", name, version, old)
            self._retire_if_on_probation(name, old, old_state, version, "activate")

    def fail(self, name: str, version: int, reason: str) -> None:
        """An install failed outside the store (download, digest): record it and clean up."""
        with self._lock:
            shutil.rmtree(self.staging_dir(name, version), ignore_errors=True)
            if self._load_pointer(name).version != version:
                shutil.rmtree(self._vdir(name, version), ignore_errors=True)
            self._transition(name, version, _E.FAIL, reason)
            self._hook("fail:recorded")
            logger.warning("%s v%d failed: %s", name, version, reason)

    # ------------------------------------------------------------------ probation, latency
    def load_probation(self, name: str) -> dict[str, Any] | None:
        """The persisted probation document of ``name`` (None when there is none)."""
        with self._lock:
            return _read_json(self._mdir(name) / _PROBATION)

    def save_probation(self, name: str, doc: dict[str, Any] | None) -> None:
        """Replace it atomically (``None`` removes it)."""
        with self._lock:
            path = self._mdir(name) / _PROBATION
            if doc is None:
                path.unlink(missing_ok=True)
            else:
                atomic_write(path, json.dumps(doc).encode())

    def note_served(self, name: str, version: int, p95_s: float, requests: int) -> None:
        """Keep what ``version`` served: its p95 latency over ``requests`` requests (the
        baseline the next version's probation is judged against)."""
        with self._lock:
            records = self._load_records(name)
            rec = records.get(version)
            if rec is None or (rec.get("served_p95_s"), rec.get("served_requests")) == (
                p95_s, requests
            ):
                return
            rec.update(served_p95_s=p95_s, served_requests=requests)
            self._save_records(name, records)

    def previous(self, name: str) -> list[int]:
        """The rollback targets of ``name``, the next one first."""
        with self._lock:
            return list(self._load_pointer(name).previous)

    # ------------------------------------------------------------------ queries
    def active(self, name: str) -> tuple[int, Path] | None:
        """The version served and its directory, or None."""
        with self._lock:
            v = self._load_pointer(name).version
            return None if v is None else (v, self._vdir(name, v))

    def kept(self, name: str) -> list[int]:
        """Committed versions of ``name`` still on disk, newest first (older ones are pruned:
        their records stay, their files do not)."""
        with self._lock:
            return self._committed_on_disk(name, self._load_records(name))

    def status(self) -> list[dict[str, Any]]:
        """Every model's install records, each with ``serving`` (the pointer's version or not)."""
        with self._lock:
            out = []
            for name in self._model_names():
                serving = self._load_pointer(name).version
                for v, rec in sorted(self._load_records(name).items()):
                    out.append({
                        "name": name, "version": v, "state": rec["state"],
                        "reason": rec.get("reason", ""), "updated_at": rec.get("updated_at"),
                        "smoke_latency_us": rec.get("smoke_latency_us"),
                        "served_p95_s": rec.get("served_p95_s"),
                        "served_requests": rec.get("served_requests", 0),
                        "bundle_digest": rec.get("digest", ""),
                        "serving": v == serving,
                    })
            return out

    # ------------------------------------------------------------------ start-up
    def recover(self) -> None:
        """Finish or undo what a crash interrupted, for every model under ``root``."""
        with self._lock:
            for name in self._model_names():
                self._recover_model(name)

    def _recover_model(self, name: str) -> None:
        mdir = self._mdir(name)
        shutil.rmtree(mdir / "staging", ignore_errors=True)
        for tmp in mdir.glob(".*.tmp"):  # atomic_write's temp files
            tmp.unlink(missing_ok=True)

        self._settle_pointer(name)
        serving = self._load_pointer(name).version
        probation = _read_json(mdir / _PROBATION)
        on_probation = serving is not None and self._load_records(name).get(
            serving, {}).get("state") == _S.ACTIVE
        if probation is not None and (probation.get("version") != serving or not on_probation):
            (mdir / _PROBATION).unlink(missing_ok=True)  # of a version no longer on probation
        for v, rec in sorted(self._load_records(name).items()):
            if v == serving:
                continue
            if rec["state"] in TRANSIENT_STATES:
                self._transition(name, v, _E.FAIL, "interrupted")
                logger.warning("%s v%d: install interrupted in state %s", name, v, rec["state"])
            elif rec["state"] == _S.ACTIVE:
                self._supersede(name, v, serving)

        records = self._load_records(name)
        needed = {str(v) for v in self._committed_on_disk(name, records)} | {str(serving)}
        vroot = mdir / "versions"
        if vroot.is_dir():
            for d in vroot.iterdir():
                if d.name in needed:
                    continue
                if d.is_dir():
                    shutil.rmtree(d, ignore_errors=True)
                else:
                    d.unlink()
        self._prune(name)

    # ------------------------------------------------------------------ internals
    def _settle_pointer(self, name: str) -> None:
        """Make the pointer name a servable version: finish an activation or a rollback."""
        records = self._load_records(name)
        pointer = self._load_pointer(name)
        cur = pointer.version
        if cur is not None:
            state = records[cur]["state"] if cur in records else None
            on_disk = self._vdir(name, cur).is_dir()
            if on_disk and state in (_S.STAGED, _S.SMOKE_TESTING):
                # The pointer moved but the record did not: the activation happened.
                if state == _S.STAGED:
                    self._transition(name, cur, _E.SMOKE_START)
                self._transition(name, cur, _E.SMOKE_PASSED, "in probation (activation "
                                 "finished at recovery)")
            elif not (on_disk and state in (_S.ACTIVE, _S.COMMITTED)):
                # A rollback was decided (or the version is unusable) but the pointer had not
                # moved yet: finish the rollback.
                target = self._rollback_target(name, pointer)
                self._save_pointer(name, target)
                logger.warning("%s: v%d (%s) is not servable; serving %s", name, cur, state,
                               target.version)

    def _hook(self, point: str) -> None:
        if self._crash_hook is not None:
            self._crash_hook(point)

    def _mdir(self, name: str) -> Path:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise InvalidInputError(
                f"model name must match {_NAME.pattern}; got {name!r}"
            )
        return self.root / name

    def version_dir(self, name: str, version: int) -> Path:
        """Where ``version`` of ``name`` lives once installed (committed or active)."""
        return self._vdir(name, version)

    def _vdir(self, name: str, version: int) -> Path:
        return self._mdir(name) / "versions" / str(_check_version(version))

    def _model_names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            d.name for d in self.root.iterdir()
            if d.is_dir() and _NAME.fullmatch(d.name)
            and ((d / _INSTALLS).exists() or (d / _ACTIVE).exists())
        )

    def _load_records(self, name: str) -> dict[int, dict[str, Any]]:
        doc = _read_json(self._mdir(name) / _INSTALLS)
        if doc is None:
            return {}
        versions = doc.get("versions")
        if not isinstance(versions, dict):
            raise InvalidInputError(f"{name}/{_INSTALLS}: 'versions' must be an object")
        return {int(k): v for k, v in versions.items()}

    def _save_records(self, name: str, records: dict[int, dict[str, Any]]) -> None:
        doc = {"versions": {str(v): records[v] for v in sorted(records)}}
        atomic_write(self._mdir(name) / _INSTALLS, json.dumps(doc, indent=1).encode())

    def _load_pointer(self, name: str) -> _Pointer:
        doc = _read_json(self._mdir(name) / _ACTIVE)
        if doc is None:
            return _Pointer(None, [])
        version = doc.get("version")
        previous = doc.get("previous", [])
        if not (version is None or isinstance(version, int)) or not isinstance(previous, list):
            raise InvalidInputError(f"{name}/{_ACTIVE}: expected {{version, previous}}; got {doc}")
        return _Pointer(version, [int(p) for p in previous])

    def _save_pointer(self, name: str, pointer: _Pointer) -> None:
        doc = {"version": pointer.version, "previous": pointer.previous}
        atomic_write(self._mdir(name) / _ACTIVE, json.dumps(doc).encode())

    def _transition(self, name: str, version: int, event: InstallEvent, reason: str = "",
                    **extra: Any) -> InstallState:
        records = self._load_records(name)
        rec = records.get(version)
        if rec is None:
            raise IllegalTransitionError(
                f"{name} v{version} has no install record (call begin first); got {event}"
            )
        new = next_state(_S(rec["state"]), event)
        rec.update(state=str(new), reason=reason, updated_at=self._clock(), **extra)
        self._save_records(name, records)
        if self._on_transition is not None:
            self._on_transition(name, version, str(new), reason)
        return new

    def _supersede(self, name: str, old: int, by: int | None) -> None:
        by_what = f"v{by}" if by is not None else "a rollback"
        self._transition(name, old, _E.SUPERSEDED,
                         f"superseded by {by_what} before its probation ended")

    def _committed_on_disk(self, name: str, records: dict[int, dict[str, Any]]) -> list[int]:
        """Committed versions whose directory exists, newest first."""
        return sorted(
            (v for v, r in records.items()
             if r["state"] == _S.COMMITTED and self._vdir(name, v).is_dir()),
            reverse=True,
        )

    def _previous_after(self, name: str, pointer: _Pointer, new: int) -> list[int]:
        """Rollback targets once ``new`` serves: the old version if committed, then the rest."""
        kept = set(self._committed_on_disk(name, self._load_records(name)))
        head = [pointer.version] if pointer.version is not None else []
        return [v for v in dict.fromkeys([*head, *pointer.previous]) if v in kept and v != new]

    def _rollback_target(self, name: str, pointer: _Pointer) -> _Pointer:
        kept = set(self._committed_on_disk(name, self._load_records(name)))
        for i, v in enumerate(pointer.previous):
            if v in kept:
                return _Pointer(v, [p for p in pointer.previous[i + 1:] if p in kept])
        return _Pointer(None, [])

    def _prune(self, name: str) -> None:
        """Keep the newest ``keep_committed`` committed versions (and the served one) on disk."""
        records = self._load_records(name)
        pointer = self._load_pointer(name)
        committed = self._committed_on_disk(name, records)
        keep = set(committed[: self.keep_committed])
        if pointer.version is not None:
            keep.add(pointer.version)
        previous = [v for v in pointer.previous if v in keep and v != pointer.version]
        if previous != pointer.previous:
            self._save_pointer(name, _Pointer(pointer.version, previous))  # before deleting
        for v in committed:
            if v not in keep:
                shutil.rmtree(self._vdir(name, v), ignore_errors=True)
                logger.info("%s v%d removed from disk (keeping %d committed)", name, v,
                            self.keep_committed)
        # Bound installs.json: keep live records plus the newest finished ones.
        live = keep | {v for v, r in records.items() if r["state"] not in (
            _S.COMMITTED, _S.FAILED, _S.ROLLED_BACK)}
        finished = sorted((v for v in records if v not in live), reverse=True)
        if len(finished) > _MAX_FINISHED_RECORDS:
            for v in finished[_MAX_FINISHED_RECORDS:]:
                del records[v]
            self._save_records(name, records)


def _check_version(version: int) -> int:
    if not isinstance(version, int) or isinstance(version, bool) or version <= 0:
        raise InvalidInputError(f"model version must be an integer > 0; got {version!r}")
    return version


def _check_manifest(name: str, version: int, manifest: Any) -> None:
    """The signed manifest must be for the name and version being installed (no swaps)."""
    if not isinstance(manifest, dict):
        raise InvalidInputError(f"verify returned {type(manifest).__name__}, not a manifest")
    if manifest.get("version") != version:
        raise InvalidInputError(
            f"bundle manifest says version {manifest.get('version')!r}; expected {version}"
        )
    if manifest.get("name", name) != name:
        raise InvalidInputError(
            f"bundle manifest says model {manifest.get('name')!r}; expected {name!r}"
        )


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    doc = strict_json.loads(data, what=str(path))
    if not isinstance(doc, dict):
        raise InvalidInputError(f"{path} must hold a JSON object")
    return doc


def _fsync_tree(root: Path) -> None:
    """Make a moved-in bundle durable before any pointer can name it."""
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        with contextlib.suppress(OSError):
            fsync_dir(Path(dirpath))
