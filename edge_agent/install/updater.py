"""Bring the installed models in line with the accepted release document.

For each model the release names, the arm with the largest weight (ties: the older version)
is the primary: the version the model store activates. If it is not serving yet: switch to it
when it is a committed version kept on disk (no download); otherwise download (resumable),
check digest and length, unpack with the archive rules, verify the publisher signature,
smoke-test and activate it. The new version is then on probation until ``tick`` commits it or
rolls it back locally. The other arms of an experiment are installed the same way but kept
without activation; serving routes to every installed arm by the release's weights.

Unpacking, verification and the smoke test run on a worker thread (and the smoke test in a
child process, when the store is given ``run_smoke_isolated``): the event loop that serves
inference never waits for them.

A failed install is recorded and not retried for the same release (a new serial retries it); a
transport failure keeps the partial download and is retried on the next sync. A version this
device rolled back is not installed again (same digest): the control plane sees the rollback
in the device's report and decides what comes next.

Probation survives restarts: its state is saved in the model store (``probation.json``) when
it starts, at every start of the agent (the restart counter, saved before any model is loaded)
and at every ``tick`` that changed it. ``acknowledge`` marks the versions a heartbeat reply
confirmed the control plane (or broker) received; only those commit. The committed version's
served latency is sampled and kept in its install record (``served_p95_s``): the baseline for
the next version's probation.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_agent.install.download import RetrievalPolicy, fetch_bundle
from edge_agent.install.lifecycle import InstallState
from edge_agent.install.model_store import InstallOutcome, ModelStore
from edge_agent.install.probation import LatencySample, Probation, ProbationPolicy
from edge_agent.install.verify_child import verify_isolated
from edge_agent.tracing import AgentTracing
from edge_agent.transport.base import Transport
from fleetcore.errors import EdgefleetError, TransportError
from fleetcore.release_doc import Arm, ReleaseDocument

__all__ = ["Updater", "serving_arm"]

log = logging.getLogger(__name__)


def serving_arm(arms: tuple[Arm, ...]) -> Arm:
    """The primary arm: the largest weight; on a tie the older version (the champion)."""
    return max((a for a in arms if not a.shadow), key=lambda a: (a.weight, -a.version))


class Updater:
    def __init__(
        self,
        store: ModelStore,
        downloads: Path,
        *,
        policy: ProbationPolicy,
        chunk_timeout: float = 30.0,
        clock: Callable[[], float] = time.time,
        retrieval: RetrievalPolicy | None = None,
    ) -> None:
        """Also counts this start against every version still on probation, and rolls back
        the ones whose restarts reached ``policy.max_restarts`` before anything serves them."""
        self._unwritable = False  # in a spell of failed probation-state writes
        self.store = store
        self.downloads = downloads
        self.policy = policy
        self.chunk_timeout = chunk_timeout
        self.retrieval = retrieval or RetrievalPolicy()
        self.clock = clock
        self.tracing = AgentTracing(None)  # the daemon sets its own (edge_agent/tracing.py)
        self.probation: dict[str, tuple[int, Probation]] = {}
        # The committed version each model serves, and a sample of its served latencies.
        self.served: dict[str, tuple[int, LatencySample]] = {}
        self._saved: dict[str, tuple[Any, ...]] = {}
        self._failed: set[tuple[str, int, str, int]] = set()  # (model, version, digest, serial)
        now = clock()
        for rec in store.status():
            if not rec["serving"]:
                continue
            name, version = rec["name"], int(rec["version"])
            if rec["state"] == InstallState.ACTIVE:  # still on probation after a restart
                probation = self._restore(name, version, now)
                probation.restarts += 1
                self._save(name, version, probation)  # before the model is loaded again
                self.probation[name] = (version, probation)
                log.warning("%s v%d: agent start %d while on probation", name, version,
                            probation.restarts)
            elif rec["state"] == InstallState.COMMITTED:
                self.served[name] = (version, LatencySample(policy.max_samples))
        self.tick()

    def _restore(self, name: str, version: int, now: float) -> Probation:
        doc = self.store.load_probation(name)
        if doc is not None and doc.get("version") == version:
            try:
                return Probation.from_doc(self.policy, doc)
            except (KeyError, TypeError, ValueError) as exc:
                log.error("%s v%d: probation state unreadable (%s); starting it over", name,
                          version, exc)
        return Probation(self.policy, now, baseline_p95_s=self._baseline_p95(name))

    def _save(self, name: str, version: int, probation: Probation) -> None:
        key = (version, probation.requests, probation.errors, probation.restarts,
               probation.acknowledged)
        if self._saved.get(name) != key and self._persisted(
                self.store.save_probation, name, probation.to_doc(version)):
            self._saved[name] = key

    def _persisted(self, write: Callable[..., object], *args: object) -> bool:
        """Run a write of probation state; a full or read-only disk is logged once a spell and
        does not stop serving or the heartbeat (the state is then only in memory)."""
        try:
            write(*args)
        except OSError as exc:
            if not self._unwritable:
                log.error("cannot persist probation state (%s); it is kept in memory until "
                          "the disk can be written", exc)
            self._unwritable = True
            return False
        self._unwritable = False
        return True

    def _end_probation(self, name: str) -> None:
        self.probation.pop(name, None)
        self._saved.pop(name, None)
        self.store.save_probation(name, None)

    @staticmethod
    def verifier(publisher_pems: list[bytes], threshold: int = 1
                 ) -> Callable[[Path], dict[str, Any]]:
        # In a child process: model_signing never stays in the agent (verify_child.py).
        # ``threshold``: distinct publisher keys required (the root's publisher role).
        return lambda path: verify_isolated(path, publisher_pems, threshold=threshold)

    async def apply(self, doc: ReleaseDocument, transport: Transport) -> None:
        for model in doc.models:
            primary = serving_arm(model.arms)
            others = [a for a in model.arms if a.version != primary.version]
            for arm, activate in ((primary, True), *((a, False) for a in others)):
                key = (model.name, arm.version, arm.digest, doc.serial)
                active = self.store.active(model.name)
                if key in self._failed or (active is not None and active[0] == arm.version):
                    continue
                if not activate and self._kept(model.name, arm.version):
                    continue  # an experiment arm already installed here
                if self._rolled_back_here(model.name, arm):
                    continue
                try:
                    installed = await self._install(model.name, arm, transport,
                                                    activate=activate)
                except TransportError:
                    raise  # keep the partial download; the next sync resumes it
                except EdgefleetError as exc:
                    log.error("install of %s v%d failed: %s", model.name, arm.version, exc)
                    self._failed.add(key)
                    self.store.fail(model.name, arm.version, str(exc)[:500])
                else:
                    if not installed:  # verification or smoke test failed (store recorded it)
                        self._failed.add(key)

    async def _install(self, name: str, arm: Arm, transport: Transport, *,
                       activate: bool = True) -> bool:
        """Install ``arm``; False when the bundle failed verification or its smoke test."""
        if activate and self._kept(name, arm.version):
            log.info("switching %s to kept version %d (no download)", name, arm.version)
            self.store.activate_kept(name, arm.version)
            self._end_probation(name)
            self.served[name] = (arm.version, LatencySample(self.policy.max_samples))
            return True
        self.store.begin(name, arm.version, arm.digest, arm.length)
        part = self.downloads / f"{arm.digest.removeprefix('sha256:')}.part"
        with self.tracing.current_step(name, arm.version):  # bundle requests carry it
            await fetch_bundle(transport, arm.digest, arm.length, part,
                               chunk_timeout=self.chunk_timeout, retrieval=self.retrieval)
        self._note_served()  # the baseline of the serving version, before it may lose the pointer
        outcome = await asyncio.to_thread(self._unpack_and_install, name, arm.version, part,
                                          activate)
        if outcome.state is InstallState.COMMITTED and not activate:
            log.info("%s v%d installed as an experiment arm", name, arm.version)
        elif outcome.state is InstallState.ACTIVE:
            probation = Probation(self.policy, self.clock(),
                                  baseline_p95_s=self._baseline_p95(name))
            self._saved.pop(name, None)
            self._save(name, arm.version, probation)
            self.probation[name] = (arm.version, probation)
            self.served.pop(name, None)
            log.info("%s v%d active, on probation (latency baseline %s)", name, arm.version,
                     "none" if probation.baseline_p95_s is None
                     else f"{probation.baseline_p95_s * 1e3:.3f} ms served p95")
        else:
            log.error("%s v%d not installed: %s", name, arm.version, outcome.reason)
            return False
        return True

    def _unpack_and_install(self, name: str, version: int, part: Path,
                            activate: bool) -> InstallOutcome:
        """Unpack, verify, smoke-test, activate: blocking work, run on a worker thread."""
        # tarfile with it only when a bundle is unpacked (an agent serving what it installed
        # before a restart never loads it).
        from fleetcore.archive import safe_extract  # noqa: PLC0415

        staging = self.store.staging_dir(name, version)
        shutil.rmtree(staging, ignore_errors=True)
        staging.parent.mkdir(parents=True, exist_ok=True)
        try:
            safe_extract(part, staging)
        finally:
            part.unlink(missing_ok=True)
        return self.store.install_from_dir(name, version, staging, activate=activate)

    def _kept(self, name: str, version: int) -> bool:
        """Committed and still on disk: a pruned version is downloaded again."""
        return version in self.store.kept(name)

    def _rolled_back_here(self, name: str, arm: Arm) -> bool:
        return any(r["name"] == name and r["version"] == arm.version
                   and r["state"] == InstallState.ROLLED_BACK
                   and r["bundle_digest"] == arm.digest for r in self.store.status())

    def record(self, name: str, version: int, ok: bool, latency_s: float) -> None:
        """Serving reports each request of the primary versions here (cheap: no I/O)."""
        entry = self.probation.get(name)
        if entry is not None:
            if entry[0] == version:
                entry[1].record(ok, latency_s)
            return
        served = self.served.get(name)
        if served is not None and served[0] == version and ok:
            served[1].add(latency_s)

    def acknowledge(self, reported: list[tuple[str, int]]) -> bool:
        """The control plane (or broker) acknowledged a report listing these (name, version)
        as serving on probation; True when that is news for any of them."""
        news = False
        for name, version in reported:
            entry = self.probation.get(name)
            if entry is not None and entry[0] == version and not entry[1].acknowledged:
                entry[1].acknowledged = True
                self._save(name, version, entry[1])
                news = True
        return news

    def tick(self) -> bool:
        """Commit or roll back versions whose probation has been decided; True if any was.
        Saves what changed (probation counters, the served latency baseline)."""
        now = self.clock()
        decided = False
        for name, (version, probation) in list(self.probation.items()):
            decision = probation.decide(now, probation.baseline_p95_s,
                                        acknowledged=probation.acknowledged)
            decided = decided or decision in ("commit", "rollback")
            if decision == "commit":
                self.store.commit(name, version)
                self._end_probation(name)
                # What it served on probation is the start of its served-latency sample.
                self.served[name] = (version, probation.latency_sample())
                log.info("%s v%d committed after probation: %s", name, version,
                         probation.reason)
            elif decision == "rollback":
                back = self.store.rollback(name, probation.reason)
                self._end_probation(name)
                if back is not None:
                    self.served[name] = (back, LatencySample(self.policy.max_samples))
                log.warning("%s v%d rolled back (%s); serving %s", name, version,
                            probation.reason, back)
            else:
                self._save(name, version, probation)
        self._note_served()
        return decided

    def save(self) -> None:
        """Persist what probation and serving measured, deciding nothing (at shutdown)."""
        for name, (version, probation) in list(self.probation.items()):
            self._save(name, version, probation)
        self._note_served()

    def _note_served(self) -> None:
        for name, (version, sample) in list(self.served.items()):
            p95 = sample.p95_s()
            if p95 is not None and sample.seen >= self.policy.min_requests:
                self._persisted(self.store.note_served, name, version, p95, sample.seen)

    def _baseline_p95(self, name: str) -> float | None:
        """The p95 latency that the version to roll back to served here (seconds), when it
        served at least ``min_requests`` requests; else None (no latency rule)."""
        previous = self.store.previous(name)
        if not previous:
            return None
        rec = next((r for r in self.store.status()
                    if r["name"] == name and r["version"] == previous[0]), None)
        if rec is None or rec.get("served_p95_s") is None or (
            int(rec.get("served_requests") or 0) < self.policy.min_requests
        ):
            return None
        return float(rec["served_p95_s"])

    def report(self) -> list[dict[str, Any]]:
        return self.store.status()
