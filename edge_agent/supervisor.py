"""What the agent serves, and what serving feeds back: the glue between the install side
(release, model store, probation) and the serving side (ServingCore, HTTP, gRPC).

* ``configure`` maps the accepted release onto the versions installed here: every arm whose
  version is on disk (committed, or active on probation) serves with its weight; arms not
  installed yet are left out and the rest renormalized; with no release (or none of its arms
  installed) the version the model store activated serves alone.
* Serving's result hook feeds the probation of the version on probation, or the served-latency
  sample of the committed version (the next probation's baseline); its prediction hook
  (off the request path, batched) feeds one drift monitor per (model, version), whose closed
  windows go to the telemetry outbox. ``snapshot`` adds each arm's counters to the outbox.
* Samples: the release's ``sample_rate`` per model sets serving's sampling; a sampled request
  that gets its label becomes a ``sample`` record: its rows, labels and, of its parameters,
  ONLY the PII columns the bundle manifest declares: ``hmac`` ones as HMAC-SHA256 under this
  device's own key (``fleetcore.pseudonym``; ``sample.key``, made here, never sent), ``drop``
  ones not at all. No other parameter leaves the device.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.install.lifecycle import InstallState
from edge_agent.install.model_store import ModelStore
from edge_agent.install.updater import Updater
from edge_agent.reporting.drift import DriftConfig, DriftMonitor, parse_profile
from edge_agent.reporting.outbox import Outbox
from edge_agent.reporting.telemetry import encode
from edge_agent.serving.core import ServingCore
from fleetcore.bundle import MANIFEST, PROFILE, parse_manifest
from fleetcore.errors import EdgefleetError
from fleetcore.files import atomic_write
from fleetcore.pseudonym import pseudonymize
from fleetcore.release_doc import ReleaseDocument

__all__ = ["ServingSupervisor"]

log = logging.getLogger(__name__)

_SERVABLE = (InstallState.COMMITTED, InstallState.ACTIVE)
SAMPLE_RECORD_BYTES = 100_000  # a sample record stays well under the control plane's limit
SAMPLE_MAX_ROWS = 64


def load_sample_key(path: Path) -> bytes:
    """This device's pseudonymization key (32 random bytes, 0600), made on first use."""
    try:
        key = path.read_bytes()
        if len(key) == 32:
            return key
        log.warning("%s is not a 32-byte key; making a new one", path)
    except FileNotFoundError:
        pass
    key = secrets.token_bytes(32)
    atomic_write(path, key, mode=0o600)
    return key


class ServingSupervisor:
    def __init__(
        self,
        store: ModelStore,
        updater: Updater,
        outbox: Outbox,
        *,
        drift: DriftConfig | None = None,
        clock: Callable[[], float] = time.time,
        sample_key: Path | None = None,
    ) -> None:
        self.store = store
        self.updater = updater
        self.outbox = outbox
        self.drift_config = drift or DriftConfig()
        self.clock = clock
        self.monitors: dict[tuple[str, int], DriftMonitor | None] = {}
        self.last_drift: dict[str, dict[str, Any]] = {}
        self._last_counters: dict[tuple[str, str], tuple[int, int, int]] = {}
        self._sample_key_path = sample_key
        self._sample_key: bytes | None = None
        self._pii: dict[tuple[str, int], dict[str, str]] = {}
        self._rates: dict[str, float] = {}
        self.samples_sent = 0
        self.core = ServingCore(on_prediction=self._on_prediction, on_result=self._on_result,
                                on_sample=self._on_sample)

    # ------------------------------------------------------------------ what to serve
    def plan(self, doc: ReleaseDocument | None) -> dict[str, list[tuple[int, float, bool]]]:
        installed: dict[str, set[int]] = {}
        kept: dict[str, list[int]] = {}
        for rec in self.store.status():
            name, version = rec["name"], int(rec["version"])
            if rec["state"] not in _SERVABLE:
                continue
            if name not in kept:
                kept[name] = self.store.kept(name)
            if rec["state"] == InstallState.COMMITTED and version not in kept[name]:
                continue  # pruned from disk: it has to be downloaded again first
            installed.setdefault(name, set()).add(version)
        plans: dict[str, list[tuple[int, float, bool]]] = {}
        for model in doc.models if doc is not None else ():
            arms = [(a.version, a.weight, a.shadow) for a in model.arms
                    if a.version in installed.get(model.name, set())]
            total = sum(w for _, w, shadow in arms if not shadow)
            if total > 0:
                plans[model.name] = [(v, w / total if not s else 0.0, s) for v, w, s in arms]
        for name in installed:  # no release for it, or none of its arms is here yet
            active = self.store.active(name)
            if name not in plans and active is not None:
                plans[name] = [(active[0], 1.0, False)]
        return plans

    def configure(self, doc: ReleaseDocument | None) -> None:
        """Serve what the release asks for and is installed (call from a thread: loads models)."""
        rates = {m.name: m.sample_rate for m in doc.models} if doc is not None else {}
        for name, arms in self.plan(doc).items():
            bundles = {v: self.store.version_dir(name, v) for v, _, _ in arms}
            try:
                self.core.set_model(name, arms, bundles)
            except (EdgefleetError, OSError) as exc:
                log.error("cannot serve %s %s: %s", name, arms, exc)
            rate = rates.get(name, 0.0) if self._sample_key_path is not None else 0.0
            if rate != self._rates.get(name, 0.0):
                log.info("%s: contributing %g%% of labelled requests as training samples", name,
                         100 * rate)
            self._rates[name] = rate
            self.core.set_sampling(name, rate)

    # ------------------------------------------------------------------ hooks
    def _on_result(self, model: str, version: int, ok: bool, latency_s: float) -> None:
        self.updater.record(model, version, ok, latency_s)

    def _monitor(self, model: str, version: int) -> DriftMonitor | None:
        key = (model, version)
        if key not in self.monitors:
            monitor = None
            try:
                data = (self.store.version_dir(model, version) / PROFILE).read_bytes()
                monitor = DriftMonitor(model, version, parse_profile(data), self.drift_config)
            except (EdgefleetError, OSError) as exc:
                log.warning("no drift monitoring for %s v%d: %s", model, version, exc)
            self.monitors[key] = monitor
        return self.monitors[key]

    def _on_prediction(self, model: str, version: int, rows: np.ndarray,
                       predicted: np.ndarray) -> None:
        monitor = self._monitor(model, version)
        if monitor is None:
            return
        for window in monitor.observe(rows, predicted, self.clock()):
            doc = window.to_dict()
            self.last_drift[model] = doc
            self.outbox.append("drift", encode(doc), self.clock())
            if window.drifted:
                log.warning("drift on %s v%d: score %.3f, %d features", model, version,
                            window.score, len(window.drifted_features))

    def _pii_columns(self, model: str, version: int) -> dict[str, str]:
        """The manifest's PII columns of that version: name -> "hmac" | "drop"."""
        key = (model, version)
        if key not in self._pii:
            data = (self.store.version_dir(model, version) / MANIFEST).read_bytes()
            columns = parse_manifest(data)["input"].get("pii_columns", [])
            self._pii[key] = {str(c["name"]): str(c["action"]) for c in columns
                              if isinstance(c, dict) and "name" in c and "action" in c}
        return self._pii[key]

    def _on_sample(self, model: str, version: int, rows: np.ndarray,
                   labels: list[int] | list[float], params: Mapping[str, str]) -> None:
        if self._sample_key_path is None:
            return
        if self._sample_key is None:
            self._sample_key = load_sample_key(self._sample_key_path)
        try:
            columns = self._pii_columns(model, version)
        except (EdgefleetError, OSError, KeyError) as exc:
            log.warning("no samples from %s v%d: %s", model, version, exc)
            return
        pii = {name: pseudonymize(self._sample_key, params[name]) if name in params else ""
               for name, action in columns.items() if action == "hmac"}
        per = max(1, min(SAMPLE_MAX_ROWS, SAMPLE_RECORD_BYTES // (20 * rows.shape[1] + 80)))
        now = self.clock()
        items = []
        for start in range(0, len(rows), per):
            part = rows[start : start + per]
            items.append(("sample", encode({
                "model": model, "version": version, "features": part.tolist(),
                "labels": labels[start : start + per],
                "pii": {name: [value] * len(part) for name, value in pii.items()},
            })))
        self.outbox.append_many(items, now)
        self.samples_sent += len(rows)

    def snapshot(self) -> None:
        """Add each served arm's counters to the outbox when they changed since the last time
        (an idle agent cut off for days must not fill its outbox with identical records)."""
        now = self.clock()
        items = []
        for name, model in self.core.stats()["models"].items():
            for version, arm in model["arms"].items():
                counters = (arm["requests"], arm["errors"], arm["feedback_rows"])
                if self._last_counters.get((name, version)) == counters:
                    continue
                self._last_counters[(name, version)] = counters
                doc = {
                    "model": name, "version": int(version), "shadow": arm["shadow"],
                    "requests": arm["requests"], "errors": arm["errors"],
                    "p50_ms": 1000 * (arm["latency_p50_s"] or 0.0),
                    "p95_ms": 1000 * (arm["latency_p95_s"] or 0.0),
                    "labelled": arm["feedback_rows"], "correct": arm["feedback_correct"],
                }
                if model.get("task") == "regression":  # docs/design.md, "arm statistics"
                    doc["abs_error_sum"] = arm["feedback_abs_error_sum"]
                    doc["sq_error_sum"] = arm["feedback_sq_error_sum"]
                items.append(("arm_stats", encode(doc)))
        if items:
            self.outbox.append_many(items, now)

    def close(self) -> None:
        self.core.close()

