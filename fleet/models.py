"""`fleet models|rollouts|experiments|drift`: the model-lifecycle commands."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
from edgefleet.v1 import admin_pb2

from fleet.common import RPC_TIMEOUT_SECONDS as T
from fleet.common import Progress, Stub, labels_text, ts
from fleet.history import (
    add_arm_history_args,
    add_drift_history_args,
    arm_history,
    drift_history,
    print_arm_history,
)
from fleetcore.archive import pack_bundle
from fleetcore.cli import print_json, print_table, terminal_safe
from fleetcore.errors import EdgefleetError, InvalidInputError
from fleetcore.labels import parse_label_args
from fleetcore.otel import check_carrier, new_traceparent, trace_id_of

__all__ = ["MODEL_COMMANDS", "add_model_commands", "experiment_json", "model_json",
           "rollout_json"]

PUBLISH_CHUNK_BYTES = 1024 * 1024


class RolloutNotCompleted(EdgefleetError):
    """``--wait`` saw the rollout end paused, rolled back or aborted (exit 1)."""

PUBLISH_TIMEOUT_SECONDS = 3600.0


def add_model_commands(sub: Any) -> None:
    """models, rollouts, experiments and drift."""
    models = sub.add_parser("models", help="the model registry").add_subparsers(
        dest="command", required=True
    )
    mp = models.add_parser("publish", help="upload a signed bundle directory")
    mp.add_argument("bundle", type=Path)
    mp.add_argument("--json", action="store_true")
    ml = models.add_parser("list", help="every published version, newest first")
    ml.add_argument("--json", action="store_true")
    ms = models.add_parser("show", help="one model's versions; with VERSION, its manifest")
    ms.add_argument("name")
    ms.add_argument("version", nargs="?", type=int, default=0)
    ms.add_argument("--json", action="store_true")

    rollouts = sub.add_parser("rollouts", help="assign model versions to devices").add_subparsers(
        dest="command", required=True
    )
    rs = rollouts.add_parser(
        "start", help="roll a version out in steps, gated on measured behaviour",
        description="Roll VERSION of MODEL out to the devices matching --selector, step by "
                    "step. Each step bakes, then its gates are judged on the step's devices; "
                    "a gate with too few samples does not pass. A newer rollout of the model "
                    "supersedes this one.")
    rs.add_argument("--model", required=True)
    rs.add_argument("--version", required=True, type=int)
    rs.add_argument("--selector", action="append", default=[], metavar="K=V")
    rs.add_argument("--steps", default="100", help="cumulative percentages, e.g. 5,25,100")
    rs.add_argument("--bake", type=float, default=0.0, metavar="SECONDS",
                    help="how long each step runs before its gates are judged")
    rs.add_argument("--gate", action="append", default=[], metavar="EXPR",
                    help="e.g. error_rate<0.05, p95_ms<50, drift_score<0.3, "
                         "accuracy_delta>=-0.01, install_failures<=0 (repeatable); a regression "
                         "model's error gate: mae_delta<=0 (new MAE minus previous)")
    rs.add_argument("--on-failure", choices=["pause", "rollback"], default="pause")
    rs.add_argument("--json", action="store_true")
    rs.add_argument("--wait", action="store_true",
                    help="wait until the rollout completes (exit 0), or pauses, rolls back or "
                         "is aborted (exit 1), showing its progress")
    rs.add_argument("--wait-timeout", type=float, default=3600.0, metavar="SECONDS")
    for action in ("pause", "resume", "abort", "rollback"):
        ra = rollouts.add_parser(action, help={
            "pause": "stop advancing (devices keep what they have)",
            "resume": "continue a paused rollout",
            "abort": "stop and put every device back on the previous version",
            "rollback": "put every device back on the previous version",
        }[action])
        ra.add_argument("--model", required=True)
        ra.add_argument("--json", action="store_true")
    rst = rollouts.add_parser("status", help="per step and device: what happened and why")
    rst.add_argument("--model", required=True)
    rst.add_argument("--json", action="store_true")
    rst.add_argument("--wait", action="store_true",
                     help="wait until the rollout is no longer running (as for start --wait)")
    rst.add_argument("--wait-timeout", type=float, default=3600.0, metavar="SECONDS")

    experiments = sub.add_parser(
        "experiments", help="champion and challenger side by side on devices"
    ).add_subparsers(dest="command", required=True)
    es = experiments.add_parser(
        "start", help="serve a challenger beside the champion on each selected device",
        description="The challenger gets --weight of each device's traffic. Once both arms "
                    "have enough labelled requests, a one-sided two-proportion z-test decides: "
                    "promote the challenger through a rollout, or stop it.")
    es.add_argument("--model", required=True)
    es.add_argument("--challenger", required=True, type=int)
    es.add_argument("--weight", type=float, default=0.1)
    es.add_argument("--selector", action="append", default=[], metavar="K=V")
    es.add_argument("--json", action="store_true")
    for name in ("status", "stop"):
        e = experiments.add_parser(name, help={
            "status": "per-arm requests, errors, latency, accuracy (regression: MAE) with a "
                      "95% CI, decision",
            "stop": "end the experiment; devices go back to the champion alone"}[name])
        e.add_argument("--model", required=True)
        e.add_argument("--json", action="store_true")
        if name == "status":
            add_arm_history_args(e)

    _add_retrain_commands(sub)
    drift = sub.add_parser("drift", help="drift per device and fleet-wide (latest windows; "
                                         "--since: every window since then)")
    drift.set_defaults(command="show")
    drift.add_argument("--model", default="")
    drift.add_argument("--json", action="store_true")
    add_drift_history_args(drift)



def _add_retrain_commands(sub: Any) -> None:
    retrain = sub.add_parser("retrain", help="drift-triggered retraining").add_subparsers(
        dest="command", required=True
    )
    rp = retrain.add_parser("policy", help="when drift retrains a model, and with what")
    rp.add_argument("--model", required=True)
    rp.add_argument("--pipeline", required=True, help="PIPELINE.toml on the control-plane host")
    rp.add_argument("--threshold", type=float, default=0.2)
    rp.add_argument("--fraction", type=float, default=0.5, help="share of devices drifted")
    rp.add_argument("--windows", type=int, default=2, help="consecutive drifted windows")
    rp.add_argument("--canary-weight", type=float, default=0.1)
    rp.add_argument("--approval", action="store_true",
                    help="publish the retrained version but wait for an operator")
    rp.add_argument("--sample-rate", type=float, default=0.0,
                    help="share of labelled requests devices contribute as training samples "
                         "(PII pseudonymized or dropped on the device); 0 turns sampling off")
    rp.add_argument("--margin", type=float, default=0.0,
                    help="accuracy (0..1) the retrained model must gain over the current one "
                         "on the devices' recent (drifted) samples to be published; for a "
                         "regression model the MAE reduction, in the target's units")
    rj = retrain.add_parser("jobs", help="retraining jobs and the samples devices contributed")
    rj.add_argument("--model", default="")
    rj.add_argument("--json", action="store_true")


def model_json(m: admin_pb2.ModelVersion, key: str = "summary") -> dict[str, Any]:
    """``key``: "summary" (a listing's manifest summary) or "manifest" (the whole one)."""
    return {
        "name": m.name, "version": m.version, "digest": m.digest, "length": m.length,
        "created_at": m.created_at, "published_by": m.published_by,
        "publisher_key": m.publisher_key, "manifest_bytes": m.manifest_bytes,
        key: json.loads(m.manifest_json or "{}"),
    }


def _print_models(models: list[admin_pb2.ModelVersion], as_json: bool) -> None:
    if as_json:
        print_json([model_json(m) for m in models])
        return
    rows = []
    for m in models:
        manifest = json.loads(m.manifest_json or "{}")
        compressed = manifest.get("metrics", {}).get("compressed", {})
        if manifest.get("task") == "regression":
            mae = compressed.get("mae") if isinstance(compressed, dict) else None
            quality = f"MAE {mae:.4g}" if isinstance(mae, float) else "-"
        else:
            acc = compressed.get("accuracy") if isinstance(compressed, dict) else None
            quality = f"{acc:.4f}" if isinstance(acc, float) else "-"
        rows.append((m.name, m.version, manifest.get("task", "classification"),
                     m.digest[:19], f"{m.length:,}", quality, ts(m.created_at)))
    print_table(("NAME", "VERSION", "TASK", "DIGEST", "BYTES", "ACCURACY/MAE", "PUBLISHED"),
                rows)


def _models_publish(stub: Stub, args: argparse.Namespace, cfg: Any) -> None:
    if not args.bundle.is_dir():
        raise InvalidInputError(f"{args.bundle} is not a bundle directory")
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "bundle.tar"
        pack_bundle(args.bundle, archive)

        total = archive.stat().st_size
        progress = Progress()

        def chunks() -> Iterator[admin_pb2.PublishModelChunk]:
            sent = 0
            with archive.open("rb") as fh:
                while data := fh.read(PUBLISH_CHUNK_BYTES):
                    yield admin_pb2.PublishModelChunk(data=data)
                    sent += len(data)
                    progress.bar(f"uploading {args.bundle.name}", sent, total)
            progress.show("uploaded; the control plane verifies the signature ...")

        try:
            m = stub.PublishModel(chunks(), timeout=PUBLISH_TIMEOUT_SECONDS)
        finally:
            progress.done()
    if args.json:
        print_json(model_json(m))
    else:
        print(f"published {m.name} version {m.version} ({m.digest}, {m.length:,} bytes)")


def _models_list(stub: Stub, args: argparse.Namespace, cfg: Any) -> None:
    _print_models(list(stub.ListModels(admin_pb2.ListModelsRequest(), timeout=T).models),
                  args.json)


def _models_show(stub: Stub, args: argparse.Namespace, cfg: Any) -> None:
    if args.version:
        m = stub.GetModel(admin_pb2.GetModelRequest(name=args.name, version=args.version),
                          timeout=T)
        if args.json:
            print_json(model_json(m, "manifest"))
        else:
            _print_models([m], False)
            print(json.dumps(json.loads(m.manifest_json or "{}"), indent=2, sort_keys=True))
        return
    models = list(stub.ListModels(admin_pb2.ListModelsRequest(name=args.name), timeout=T).models)
    if not models:
        raise InvalidInputError(f"no model named {args.name!r}")
    _print_models(models, args.json)


def rollout_json(r: admin_pb2.Rollout) -> dict[str, Any]:
    return {
        "model": r.model, "version": r.version, "selector": dict(r.selector), "state": r.state,
        "created_at": r.created_at, "created_by": r.created_by, "steps": list(r.steps),
        "step": r.step, "bake_seconds": r.bake_seconds, "gates": list(r.gates),
        "on_failure": r.on_failure, "previous_version": r.previous_version or None,
        "reason": r.reason, "history": list(r.history), "task": r.task or "classification",
        "quality": [_version_quality(q, r.task == "regression") for q in r.quality],
        "devices": [
            {"id": d.device_id, "step": d.step, "desired_version": d.desired_version,
             "serving_version": d.reported_version or None, "state": d.reported_state,
             "reason": d.reason, "release_serial": d.release_serial}
            for d in r.devices
        ],
    }


def _version_quality(q: admin_pb2.VersionQuality, regression: bool) -> dict[str, Any]:
    """A version's feedback on the rollout's devices: accuracy or MAE, with a 95% CI."""
    if regression:
        return {"version": q.version, "labelled": q.labelled,
                "mae": q.mae if q.HasField("mae") else None,
                "mae_ci95": [q.mae_low, q.mae_high if math.isfinite(q.mae_high) else None]}
    return {"version": q.version, "labelled": q.labelled,
            "accuracy": q.accuracy if q.HasField("accuracy") else None,
            "accuracy_ci95": [q.accuracy_low, q.accuracy_high]}


def _print_rollout(r: admin_pb2.Rollout, as_json: bool) -> None:
    if as_json:
        print_json(rollout_json(r))
        return
    print(f"rollout {r.model} -> version {r.version} ({r.state}), selector "
          f"{labels_text(dict(r.selector))}, {len(r.devices)} devices, step {r.step} of "
          f"{len(r.steps)} ({','.join(str(s) for s in r.steps)}%), bake {r.bake_seconds:g}s, "
          f"gates {', '.join(r.gates) or '-'}, on failure {r.on_failure}"
          + (f"; {r.reason}" if r.reason else ""))
    print_table(("DEVICE", "STEP", "DESIRED", "SERVING", "STATE", "RELEASE", "REASON"), [
        (d.device_id, d.step, d.desired_version, d.reported_version or "-", d.reported_state,
         d.release_serial or "-", d.reason or "-") for d in r.devices
    ])
    for line in r.history:
        print(f"  - {terminal_safe(line)}")
    doc = rollout_json(r)
    for q in doc["quality"]:
        if q["labelled"]:
            value, ci = _quality_cells(q)
            kind = "MAE" if "mae" in q else "accuracy"
            print(f"  v{q['version']}: {kind} {value} (95% CI {ci}) on {q['labelled']} "
                  "labelled requests")


def _rollouts_start(stub: Stub, args: argparse.Namespace, cfg: Any) -> None:
    steps = [int(s) for s in args.steps.split(",") if s.strip()]
    # W3C trace context: the rollout's trace starts here (or continues $TRACEPARENT) and runs
    # through the control plane to each device's install, where OpenTelemetry is on.
    traceparent = check_carrier({"traceparent": os.environ.get("TRACEPARENT", "")}).get(
        "traceparent") or new_traceparent()
    r = stub.StartRollout(admin_pb2.StartRolloutRequest(
        model=args.model, version=args.version, selector=parse_label_args(args.selector),
        steps=steps, bake_seconds=args.bake, gates=args.gate, on_failure=args.on_failure),
        timeout=T, metadata=(("traceparent", traceparent),))
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("TRACEPARENT"):
        print(f"trace id: {trace_id_of(traceparent)}", file=sys.stderr)
    if args.wait:
        r = _wait_rollout(stub, r, args.wait_timeout)
    _print_rollout(r, args.json)
    _exit_for(r, args.wait)


WAIT_POLL_SECONDS = 1.0


def _wait_rollout(stub: Stub, r: admin_pb2.Rollout, timeout: float) -> admin_pb2.Rollout:
    """Poll until the rollout leaves "running"; show step and device counts meanwhile."""
    progress = Progress()
    deadline = time.monotonic() + timeout
    try:
        while r.state == "running":
            committed = sum(d.reported_state == "committed" and d.reported_version == r.version
                            for d in r.devices)
            progress.bar(f"rollout {r.model} v{r.version}: step {r.step}/{len(r.steps)}, "
                         "committed", committed, len(r.devices), unit=1, suffix="devices")
            if time.monotonic() > deadline:
                raise InvalidInputError(
                    f"rollout of {r.model} still running after {timeout:g}s; see `fleet "
                    f"rollouts status --model {r.model}` (it carries on without you)")
            time.sleep(WAIT_POLL_SECONDS)
            r = stub.GetRollout(admin_pb2.GetRolloutRequest(model=r.model), timeout=T)
    finally:
        progress.done()
    return r


def _exit_for(r: admin_pb2.Rollout, waited: bool) -> None:
    if waited and r.state != "completed":
        hint = ("`fleet rollouts resume` once fixed, or `fleet rollouts rollback`"
                if r.state == "paused" else "`fleet rollouts status` for why")
        raise RolloutNotCompleted(f"rollout of {r.model} v{r.version} ended {r.state}: "
                                  f"{r.reason or 'see its history'}; next: {hint}")


def _rollouts_act(stub: Stub, args: argparse.Namespace, cfg: Any) -> None:
    r = stub.ActOnRollout(admin_pb2.RolloutActionRequest(model=args.model,
                                                         action=args.command), timeout=T)
    _print_rollout(r, args.json)


def _rollouts_status(stub: Stub, args: argparse.Namespace, cfg: Any) -> None:
    r = stub.GetRollout(admin_pb2.GetRolloutRequest(model=args.model), timeout=T)
    if args.wait:
        r = _wait_rollout(stub, r, args.wait_timeout)
    _print_rollout(r, args.json)
    _exit_for(r, args.wait)


def experiment_json(e: admin_pb2.Experiment) -> dict[str, Any]:
    return {
        "model": e.model, "champion": e.champion, "challenger": e.challenger,
        "weight": e.weight, "state": e.state, "selector": dict(e.selector),
        "devices": list(e.device_ids), "created_at": e.created_at,
        "arms": [
            {"version": a.version, "role": a.role, "weight": a.weight, "requests": a.requests,
             "errors": a.errors, "p50_ms": a.p50_ms, "p95_ms": a.p95_ms,
             "labelled": a.labelled, "correct": a.correct,
             **_arm_quality(a), "devices": a.devices}
            for a in e.arms
        ],
        "task": e.task or "classification",
        "decision": e.decision, "p_value": e.p_value or None, "test": e.test,
        "decision_reason": e.decision_reason, "min_samples": e.min_samples,
    }


def _arm_quality(a: admin_pb2.ArmResult) -> dict[str, Any]:
    """A classifier arm's accuracy with its Wilson interval, or a regression arm's MAE with
    its t interval (None before any feedback)."""
    if a.task == "regression":
        return {"mae": a.mae if a.HasField("mae") else None,
                "mae_ci95": [a.mae_low, a.mae_high if math.isfinite(a.mae_high) else None]}
    return {"accuracy": a.correct / a.labelled if a.labelled else None,
            "accuracy_ci95": [a.accuracy_low, a.accuracy_high]}


def _quality_cells(a: dict[str, Any]) -> tuple[str, str]:
    if "mae" in a:
        low, high = a["mae_ci95"]
        return (f"{a['mae']:.4g}" if a["mae"] is not None else "-",
                f"{low:.4g}-{high:.4g}" if high is not None else "-")
    return (f"{a['accuracy']:.4f}" if a["accuracy"] is not None else "-",
            f"{a['accuracy_ci95'][0]:.3f}-{a['accuracy_ci95'][1]:.3f}")


def _print_experiment(e: admin_pb2.Experiment, as_json: bool) -> None:
    doc = experiment_json(e)
    if as_json:
        print_json(doc)
        return
    print(f"experiment {e.model}: champion v{e.champion} vs challenger v{e.challenger} "
          f"({e.weight:.0%} of traffic), {e.state}, {len(e.device_ids)} devices")
    regression = doc["task"] == "regression"
    print_table(("ARM", "VERSION", "WEIGHT", "REQUESTS", "ERRORS", "P50 MS", "P95 MS",
                 "LABELLED", "MAE" if regression else "ACCURACY", "95% CI"), [
        (a["role"], a["version"], f"{a['weight']:.2f}", a["requests"], a["errors"],
         f"{a['p50_ms']:.2f}", f"{a['p95_ms']:.2f}", a["labelled"], *_quality_cells(a))
        for a in doc["arms"]
    ])
    print(f"decision: {doc['decision']} — {doc['decision_reason']} ({doc['test']}, "
          f"{doc['min_samples']} labelled per arm)")


def _experiments_start(stub: Stub, args: argparse.Namespace, cfg: Any) -> None:
    e = stub.StartExperiment(admin_pb2.StartExperimentRequest(
        model=args.model, challenger=args.challenger, weight=args.weight,
        selector=parse_label_args(args.selector)), timeout=T)
    _print_experiment(e, args.json)


def _experiments_status(stub: Stub, args: argparse.Namespace, cfg: Any) -> None:
    if not args.history:
        _print_experiment(stub.GetExperiment(admin_pb2.GetExperimentRequest(model=args.model),
                                             timeout=T), args.json)
        return
    try:  # the arms' history is the model's, with or without an experiment
        e: admin_pb2.Experiment | None = stub.GetExperiment(
            admin_pb2.GetExperimentRequest(model=args.model), timeout=T)
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.NOT_FOUND:
            raise
        e = None
    history = arm_history(stub, args)
    if args.json:
        print_json({**(experiment_json(e) if e else {"model": args.model}),
                    "history": history})
        return
    if e is not None:
        _print_experiment(e, False)
    else:
        print(f"no experiment for {args.model}; its arms' history:")
    print_arm_history(history)


def _experiments_stop(stub: Stub, args: argparse.Namespace, cfg: Any) -> None:
    _print_experiment(stub.StopExperiment(admin_pb2.GetExperimentRequest(model=args.model),
                                          timeout=T), args.json)


def _drift_show(stub: Stub, args: argparse.Namespace, cfg: Any) -> None:
    if args.since:
        drift_history(stub, args)
        return
    if args.device or args.limit:
        raise InvalidInputError("--device and --limit go with --since (e.g. --since 24h)")
    r = stub.GetDrift(admin_pb2.GetDriftRequest(model=args.model), timeout=T)
    doc = {
        "fleet": [{"model": f.model, "devices": f.devices, "drifted_devices": f.drifted_devices,
                   "mean_score": f.mean_score} for f in r.fleet],
        "devices": [{"device_id": w.device_id, "model": w.model, "version": w.version,
                     "start": w.start, "end": w.end, "rows": w.rows, "score": w.score,
                     "drifted": w.drifted, "prediction_psi": w.prediction_psi,
                     "drifted_features": list(w.drifted_features)} for w in r.latest],
    }
    if args.json:
        print_json(doc)
        return
    print_table(("MODEL", "DEVICES", "DRIFTED", "MEAN SCORE"), [
        (f["model"], f["devices"], f["drifted_devices"], f"{f['mean_score']:.3f}")
        for f in doc["fleet"]
    ])
    print()
    # PREDICTION PSI: the predicted class (or, for a regression model, value) distribution.
    print_table(("DEVICE", "MODEL", "VERSION", "WINDOW END", "ROWS", "SCORE", "PREDICTION PSI",
                 "DRIFTED", "FEATURES"), [
        (w["device_id"], w["model"], w["version"], ts(w["end"]), w["rows"],
         f"{w['score']:.3f}", f"{w['prediction_psi']:.3f}", "yes" if w["drifted"] else "no",
         len(w["drifted_features"])) for w in doc["devices"]
    ])




def _retrain_policy(stub: Stub, args: argparse.Namespace, cfg: Any) -> None:
    p = stub.SetDriftPolicy(admin_pb2.DriftPolicy(
        model=args.model, pipeline=str(Path(args.pipeline).resolve()), threshold=args.threshold,
        device_fraction=args.fraction, windows=args.windows, canary_weight=args.canary_weight,
        approval=args.approval, sample_rate=args.sample_rate, margin=args.margin), timeout=T)
    print(f"drift policy for {p.model}: retrain with {p.pipeline} when {p.device_fraction:.0%} "
          f"of devices show {p.windows} consecutive windows with drift score > "
          f"{p.threshold:g}; then " + ("wait for approval" if p.approval else
                                       f"canary at {p.canary_weight:.0%}"))
    if p.sample_rate:
        print(f"devices contribute {p.sample_rate:.0%} of their labelled requests as samples; "
              f"a retrained model must gain {p.margin:.1%} on them to be published")


def _retrain_jobs(stub: Stub, args: argparse.Namespace, cfg: Any) -> None:
    r = stub.ListRetrainJobs(admin_pb2.ListRetrainJobsRequest(model=args.model), timeout=T)
    jobs = [{"id": j.id, "model": j.model, "state": j.state, "version": j.version,
             "reason": j.reason, "created_at": j.created_at,
             "finished_at": j.finished_at or None, "detail": j.detail} for j in r.jobs]
    samples = [{"model": s.model, "region": s.region, "stored": s.stored, "unused": s.unused,
                "devices": s.devices, "refused": dict(s.refused)} for s in r.samples]
    if args.json:
        print_json({"jobs": jobs, "samples": samples})
        return
    print_table(("JOB", "MODEL", "VERSION", "STATE", "CREATED", "REASON", "DETAIL"), [
        (j["id"], j["model"], j["version"], j["state"], ts(j["created_at"]), j["reason"],
         j["detail"] or "-") for j in jobs])
    if samples:
        print("\nlabelled samples from devices:")
        print_table(("MODEL", "REGION", "ROWS", "UNUSED", "DEVICES", "REFUSED"), [
            (s["model"], s["region"], s["stored"], s["unused"], s["devices"],
             ", ".join(f"{n} ({why})" for why, n in s["refused"].items()) or "-")
            for s in samples])


MODEL_COMMANDS: dict[tuple[str, str], Callable[[Stub, argparse.Namespace, Any], None]] = {
    ("retrain", "policy"): _retrain_policy,
    ("retrain", "jobs"): _retrain_jobs,
    ("models", "publish"): _models_publish,
    ("models", "list"): _models_list,
    ("models", "show"): _models_show,
    ("rollouts", "start"): _rollouts_start,
    ("rollouts", "status"): _rollouts_status,
    ("rollouts", "pause"): _rollouts_act,
    ("rollouts", "resume"): _rollouts_act,
    ("rollouts", "abort"): _rollouts_act,
    ("rollouts", "rollback"): _rollouts_act,
    ("experiments", "start"): _experiments_start,
    ("experiments", "status"): _experiments_status,
    ("experiments", "stop"): _experiments_stop,
    ("drift", "show"): _drift_show,
}
