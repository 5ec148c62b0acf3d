"""What the fleet reported, as metric families: read from storage when asked (a Prometheus
scrape, an OpenTelemetry collection), never counted twice.

Each family is declared once in ``FAMILIES`` (name, kind, help, label names) so that the
exporters emit it even before any device reported, and the shipped Grafana dashboards can be
checked against it. Values are the devices' own numbers as last reported: the arm counters are
cumulative per agent run (they restart from 0 when an agent restarts, as a Prometheus counter
may), drift is each device's newest window, the outbox figures are from its last batch.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from control_plane.domain.records import DeviceStatus, RolloutState
from control_plane.domain.rollout_plan import device_progress
from control_plane.services.context import Context

__all__ = ["FAMILIES", "Family", "FamilySpec", "FleetMetrics"]


@dataclass(frozen=True)
class FamilySpec:
    name: str  # without a counter's ``_total`` suffix
    kind: str  # "gauge" | "counter"
    help: str
    labels: tuple[str, ...] = ()


@dataclass
class Family:
    spec: FamilySpec
    samples: list[tuple[tuple[str, ...], float]] = field(default_factory=list)

    def add(self, labels: tuple[str, ...], value: float) -> None:
        self.samples.append((labels, float(value)))


_ARM = ("device", "model", "version")
_SPECS = (
    FamilySpec("edgefleet_devices", "gauge", "Enrolled devices by status", ("status",)),
    FamilySpec("edgefleet_device_up", "gauge",
               "1 when the device was heard from within the offline threshold, else 0 "
               "(revoked devices are left out)", ("device",)),
    FamilySpec("edgefleet_device_last_seen_timestamp_seconds", "gauge",
               "When the device's last heartbeat arrived (Unix time)", ("device",)),
    FamilySpec("edgefleet_device_reports_refused", "counter",
               "Reports refused from the device (malformed, outside its release, over quota)",
               ("device",)),
    FamilySpec("edgefleet_device_outbox_depth", "gauge",
               "Records waiting in the device's telemetry outbox, as it last said", ("device",)),
    FamilySpec("edgefleet_device_outbox_dropped", "counter",
               "Records the device's outbox dropped (full), as it last said", ("device",)),
    FamilySpec("edgefleet_arm_requests", "counter", "Requests one arm served on one device",
               _ARM),
    FamilySpec("edgefleet_arm_errors", "counter", "Requests one arm failed on one device", _ARM),
    FamilySpec("edgefleet_arm_labelled", "counter",
               "Requests of one arm on one device that got a feedback label", _ARM),
    FamilySpec("edgefleet_arm_correct", "counter",
               "Labelled requests a classifier arm answered correctly", _ARM),
    FamilySpec("edgefleet_arm_abs_error_sum", "counter",
               "Sum of |error| over a regression arm's labelled requests", _ARM),
    FamilySpec("edgefleet_arm_latency_p50_ms", "gauge", "Median latency of one arm (ms)", _ARM),
    FamilySpec("edgefleet_arm_latency_p95_ms", "gauge",
               "95th percentile latency of one arm (ms)", _ARM),
    FamilySpec("edgefleet_drift_score", "gauge",
               "Drift score of the device's newest window: max(mean feature PSI, prediction PSI)",
               _ARM),
    FamilySpec("edgefleet_drift_prediction_psi", "gauge",
               "PSI of the predictions in the device's newest window", _ARM),
    FamilySpec("edgefleet_drift_drifted", "gauge",
               "1 when the device's newest window drifted", _ARM),
    FamilySpec("edgefleet_drift_window_end_timestamp_seconds", "gauge",
               "When the device's newest drift window closed (its clock)", _ARM),
    FamilySpec("edgefleet_rollout_info", "gauge",
               "1 for each model's newest rollout, labelled with its state",
               ("model", "version", "state")),
    FamilySpec("edgefleet_rollout_percent", "gauge",
               "Share of the rollout's devices its current step reaches (percent)",
               ("model", "version")),
    FamilySpec("edgefleet_rollout_devices", "gauge",
               "Devices of the rollout by install state of the new version "
               "(pending, downloading, ..., committed, failed)", ("model", "version", "state")),
    FamilySpec("edgefleet_experiment_info", "gauge",
               "1 for each model's experiment, labelled with its state and decision",
               ("model", "champion", "challenger", "state", "decision")),
    FamilySpec("edgefleet_experiment_arm_requests", "gauge",
               "Requests of an experiment's arm over its devices", ("model", "role")),
    FamilySpec("edgefleet_experiment_arm_labelled", "gauge",
               "Labelled requests of an experiment's arm over its devices", ("model", "role")),
    FamilySpec("edgefleet_experiment_p_value", "gauge",
               "p-value of the test that decided the experiment", ("model",)),
    FamilySpec("edgefleet_retrain_jobs", "gauge", "Retraining jobs by model and state",
               ("model", "state")),
    FamilySpec("edgefleet_telemetry_rows", "gauge",
               "Rows the control plane keeps, by table (raw telemetry, drift windows, ...)",
               ("table",)),
)
FAMILIES: dict[str, FamilySpec] = {s.name: s for s in _SPECS}


class FleetMetrics:
    """Builds every family from storage (no authorization: only the server's exporters call
    it, on their own address)."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.store = ctx.store

    def collect(self) -> list[Family]:
        out = {name: Family(spec) for name, spec in FAMILIES.items()}
        self._devices(out)
        self._arms(out)
        self._rollouts(out)
        self._jobs(out)
        for table, rows in sorted(self.store.telemetry_counts().items()):
            out["edgefleet_telemetry_rows"].add((table,), rows)
        return list(out.values())

    def _devices(self, out: dict[str, Family]) -> None:
        now = self.ctx.clock()
        statuses: Counter[str] = Counter({s.value: 0 for s in DeviceStatus})
        for record in self.store.list_devices():
            status = self.ctx.view(record, now).status
            statuses[status.value] += 1
            if status is DeviceStatus.REVOKED:
                continue
            out["edgefleet_device_up"].add((record.id,), status is DeviceStatus.ONLINE)
            if record.last_seen is not None:
                out["edgefleet_device_last_seen_timestamp_seconds"].add((record.id,),
                                                                        record.last_seen)
        for name, n in sorted(statuses.items()):
            out["edgefleet_devices"].add((name,), n)
        for device_id, n in sorted(self.store.refusal_totals().items()):
            out["edgefleet_device_reports_refused"].add((device_id,), n)
        for device_id, (dropped, depth) in sorted(self.store.outbox_status().items()):
            out["edgefleet_device_outbox_depth"].add((device_id,), depth)
            out["edgefleet_device_outbox_dropped"].add((device_id,), dropped)

    def _arms(self, out: dict[str, Family]) -> None:
        for s in self.store.all_arm_stats():
            key = (s.device_id, s.model, str(s.version))
            out["edgefleet_arm_requests"].add(key, s.requests)
            out["edgefleet_arm_errors"].add(key, s.errors)
            out["edgefleet_arm_labelled"].add(key, s.labelled)
            out["edgefleet_arm_correct"].add(key, s.correct)
            out["edgefleet_arm_abs_error_sum"].add(key, s.abs_error_sum)
            out["edgefleet_arm_latency_p50_ms"].add(key, s.p50_ms)
            out["edgefleet_arm_latency_p95_ms"].add(key, s.p95_ms)
        for w in self.store.latest_drift(None):
            key = (w.device_id, w.model, str(w.version))
            out["edgefleet_drift_score"].add(key, w.score)
            out["edgefleet_drift_prediction_psi"].add(key, w.prediction_psi)
            out["edgefleet_drift_drifted"].add(key, w.drifted)
            out["edgefleet_drift_window_end_timestamp_seconds"].add(key, w.end)

    def _rollouts(self, out: dict[str, Family]) -> None:
        for model in sorted({m.name for m in self.store.list_model_versions()}):
            r = self.store.get_rollout(model)
            if r is not None:
                version = str(r.version)
                out["edgefleet_rollout_info"].add((model, version, r.state.value), 1)
                if r.state in (RolloutState.RUNNING, RolloutState.PAUSED):
                    out["edgefleet_rollout_percent"].add((model, version), r.steps[r.step])
                else:
                    out["edgefleet_rollout_percent"].add(
                        (model, version), 100 if r.state is RolloutState.COMPLETED else 0)
                installs: Counter[str] = Counter()
                for device_id in r.device_ids:
                    device = self.store.get_device(device_id)
                    if device is not None:
                        installs[device_progress(device.models, model, r.version).state] += 1
                for install, n in sorted(installs.items()):
                    out["edgefleet_rollout_devices"].add((model, version, install), n)
            e = self.store.get_experiment(model)
            if e is not None:
                out["edgefleet_experiment_info"].add(
                    (model, str(e.champion), str(e.challenger), e.state.value,
                     e.decision or "none"), 1)
                if e.p_value is not None:
                    out["edgefleet_experiment_p_value"].add((model,), e.p_value)
                devices = set(e.device_ids)
                for role, arm in (("champion", e.champion), ("challenger", e.challenger)):
                    arms = [s for s in self.store.arm_stats(model)
                            if s.version == arm and s.device_id in devices]
                    out["edgefleet_experiment_arm_requests"].add(
                        (model, role), sum(s.requests for s in arms))
                    out["edgefleet_experiment_arm_labelled"].add(
                        (model, role), sum(s.labelled for s in arms))

    def _jobs(self, out: dict[str, Family]) -> None:
        counts: Counter[tuple[str, str]] = Counter()
        for job in self.store.jobs():
            counts[(job.model, job.state.value)] += 1
        for key, n in sorted(counts.items()):
            out["edgefleet_retrain_jobs"].add(key, n)
