"""Bring the installed models in line with the accepted release document.

For each model the release names, the arm with the largest weight (ties: the older version)
is the primary: the version the model store activates. If it is not serving yet: switch to it
when it is a committed version kept on disk (no download); otherwise download (resumable),
check digest and length, unpack with the archive rules, verify the publisher signature,
smoke-test and activate it. The new version is then on probation until ``tick`` commits it or
rolls it back locally. The other arms of an experiment are installed the same way but kept
without activation; serving routes to every installed arm by the release's weights.

A failed install is recorded and not retried for the same release (a new serial retries it); a
transport failure keeps the partial download and is retried on the next sync.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_agent.install.download import fetch_bundle
from edge_agent.install.lifecycle import InstallState
from edge_agent.install.model_store import ModelStore
from edge_agent.install.probation import Probation, ProbationPolicy
from edge_agent.transport.base import Transport
from fleetcore.archive import safe_extract
from fleetcore.bundle_verify import verify_bundle_dir
from fleetcore.errors import EdgefleetError, TransportError
from fleetcore.release import Arm, ReleaseDocument

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
    ) -> None:
        self.store = store
        self.downloads = downloads
        self.policy = policy
        self.chunk_timeout = chunk_timeout
        self.clock = clock
        self.probation: dict[str, tuple[int, Probation]] = {}
        self._failed: set[tuple[str, int, str, int]] = set()  # (model, version, digest, serial)
        now = clock()
        for rec in store.status():  # versions still on probation after a restart
            if rec["serving"] and rec["state"] == InstallState.ACTIVE:
                self.probation[rec["name"]] = (rec["version"], Probation(policy, now))

    @staticmethod
    def verifier(publisher_pems: list[bytes]) -> Callable[[Path], dict[str, Any]]:
        return lambda path: verify_bundle_dir(path, publisher_pems)

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
            self.probation.pop(name, None)
            return True
        self.store.begin(name, arm.version, arm.digest, arm.length)
        part = self.downloads / f"{arm.digest.removeprefix('sha256:')}.part"
        await fetch_bundle(transport, arm.digest, arm.length, part,
                           chunk_timeout=self.chunk_timeout)
        staging = self.store.staging_dir(name, arm.version)
        shutil.rmtree(staging, ignore_errors=True)
        staging.parent.mkdir(parents=True, exist_ok=True)
        try:
            safe_extract(part, staging)
        finally:
            part.unlink(missing_ok=True)
        outcome = self.store.install_from_dir(name, arm.version, staging, activate=activate)
        if outcome.state is InstallState.COMMITTED and not activate:
            log.info("%s v%d installed as an experiment arm", name, arm.version)
        elif outcome.state is InstallState.ACTIVE:
            log.info("%s v%d active, on probation", name, arm.version)
            self.probation[name] = (arm.version, Probation(self.policy, self.clock()))
        else:
            log.error("%s v%d not installed: %s", name, arm.version, outcome.reason)
            return False
        return True

    def _kept(self, name: str, version: int) -> bool:
        return any(r["name"] == name and r["version"] == version
                   and r["state"] == InstallState.COMMITTED for r in self.store.status())

    def record(self, name: str, ok: bool, latency_s: float) -> None:
        """Serving reports each request of the version on probation here."""
        entry = self.probation.get(name)
        if entry is not None:
            entry[1].record(ok, latency_s)

    def tick(self) -> bool:
        """Commit or roll back versions whose probation has been decided; True if any was."""
        now = self.clock()
        decided = False
        for name, (version, probation) in list(self.probation.items()):
            baseline = self._baseline_p95(name, version)
            decision = probation.decide(now, baseline)
            decided = decided or decision in ("commit", "rollback")
            if decision == "commit":
                self.store.commit(name, version)
                del self.probation[name]
                log.info("%s v%d committed after probation", name, version)
            elif decision == "rollback":
                back = self.store.rollback(name, probation.reason)
                del self.probation[name]
                log.warning("%s v%d rolled back (%s); serving %s", name, version,
                            probation.reason, back)
        return decided

    def _baseline_p95(self, name: str, version: int) -> float | None:
        """The previous version's smoke latency stands in for its p95 (seconds)."""
        older = [r for r in self.store.status() if r["name"] == name and r["version"] != version
                 and r["state"] == InstallState.COMMITTED and r.get("smoke_latency_us")]
        if not older:
            return None
        newest = max(older, key=lambda r: r["version"])
        return float(newest["smoke_latency_us"]) / 1e6

    def report(self) -> list[dict[str, Any]]:
        return self.store.status()
