"""`fleet`: the operator CLI against the control-plane AdminService (mTLS)."""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from edgefleet.v1 import admin_pb2, admin_pb2_grpc
from google.protobuf import json_format

from control_plane.config import parse_hostport
from control_plane.home import write_operator_config
from fleetcore import pki, tomlfile
from fleetcore.archive import pack_bundle
from fleetcore.cli import print_json, print_table, run_main
from fleetcore.errors import InvalidInputError
from fleetcore.files import atomic_write
from fleetcore.labels import parse_label_args

__all__ = ["FleetConfig", "main"]

RPC_TIMEOUT_SECONDS = 30.0
PUBLISH_CHUNK_BYTES = 1024 * 1024
PUBLISH_TIMEOUT_SECONDS = 3600.0


@dataclass(frozen=True)
class FleetConfig:
    api: str
    cert: Path
    key: Path
    ca: Path

    @classmethod
    def load(cls, path: Path) -> FleetConfig:
        if not path.exists():
            raise InvalidInputError(f"fleet config {path} does not exist")
        doc = tomlfile.load(path)
        base = path.parent
        try:
            return cls(
                api=str(doc["api"]),
                cert=base / str(doc["cert"]),
                key=base / str(doc["key"]),
                ca=base / str(doc["ca"]),
            )
        except KeyError as exc:
            raise InvalidInputError(f"{path}: missing key {exc.args[0]!r}") from None

    def channel(self) -> grpc.Channel:
        creds = grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes(),
            private_key=self.key.read_bytes(),
            certificate_chain=self.cert.read_bytes(),
        )
        return grpc.secure_channel(self.api, creds)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fleet", description="Operate an Edgefleet fleet")
    p.add_argument("--config", type=Path, help="client config (default: $FLEET_CONFIG)")
    p.add_argument("--api", metavar="HOST:PORT", help="override the API address of the config")
    sub = p.add_subparsers(dest="group", required=True)

    tokens = sub.add_parser("tokens", help="enrollment tokens").add_subparsers(
        dest="command", required=True
    )
    t = tokens.add_parser("create", help="create a one-time enrollment token (prints only it)")
    t.add_argument("--ttl", type=int, default=0, metavar="SECONDS")
    t.add_argument("--label", action="append", default=[], metavar="K=V")
    t.add_argument("--json", action="store_true")

    devices = sub.add_parser("devices", help="enrolled devices").add_subparsers(
        dest="command", required=True
    )
    dl = devices.add_parser("list")
    dl.add_argument("--selector", action="append", default=[], metavar="K=V")
    dl.add_argument("--json", action="store_true")
    ds = devices.add_parser("show")
    ds.add_argument("id")
    ds.add_argument("--json", action="store_true")
    dr = devices.add_parser("revoke")
    dr.add_argument("id")
    dr.add_argument("--reason", default="")
    dr.add_argument("--json", action="store_true")

    ops = sub.add_parser("operators", help="operator identities").add_subparsers(
        dest="command", required=True
    )
    oc = ops.add_parser("create", help="create an operator; its key never leaves this host")
    oc.add_argument("name")
    oc.add_argument("--role", required=True, choices=["viewer", "operator", "admin"])
    oc.add_argument("--out", required=True, type=Path)

    _add_model_commands(sub)

    audit = sub.add_parser("audit", help="the audit log").add_subparsers(
        dest="command", required=True
    )
    al = audit.add_parser("list")
    al.add_argument("--limit", type=int, default=100)
    al.add_argument("--json", action="store_true")
    av = audit.add_parser("verify", help="check the hash chain (and an earlier checkpoint)")
    av.add_argument("--checkpoint", type=Path, help="a file written by `fleet audit checkpoint`")
    av.add_argument("--json", action="store_true")
    ac = audit.add_parser("checkpoint", help="export the signed head of the audit chain")
    ac.add_argument("--out", type=Path, help="write it here (default: stdout)")
    return p


def _add_model_commands(sub: Any) -> None:
    """models, rollouts, experiments and drift."""
    models = sub.add_parser("models", help="the model registry").add_subparsers(
        dest="command", required=True
    )
    mp = models.add_parser("publish", help="upload a signed bundle directory")
    mp.add_argument("bundle", type=Path)
    mp.add_argument("--json", action="store_true")
    ml = models.add_parser("list")
    ml.add_argument("--json", action="store_true")
    ms = models.add_parser("show")
    ms.add_argument("name")
    ms.add_argument("--json", action="store_true")

    rollouts = sub.add_parser("rollouts", help="assign model versions to devices").add_subparsers(
        dest="command", required=True
    )
    rs = rollouts.add_parser("start")
    rs.add_argument("--model", required=True)
    rs.add_argument("--version", required=True, type=int)
    rs.add_argument("--selector", action="append", default=[], metavar="K=V")
    rs.add_argument("--steps", default="100", help="cumulative percentages, e.g. 5,25,100")
    rs.add_argument("--bake", type=float, default=0.0, metavar="SECONDS",
                    help="how long each step runs before its gates are judged")
    rs.add_argument("--gate", action="append", default=[], metavar="EXPR",
                    help="e.g. error_rate<0.05, p95_ms<50, drift_score<0.3, "
                         "accuracy_delta>=-0.01, install_failures<=0 (repeatable)")
    rs.add_argument("--on-failure", choices=["pause", "rollback"], default="pause")
    rs.add_argument("--json", action="store_true")
    for action in ("pause", "resume", "abort", "rollback"):
        ra = rollouts.add_parser(action)
        ra.add_argument("--model", required=True)
        ra.add_argument("--json", action="store_true")
    rst = rollouts.add_parser("status")
    rst.add_argument("--model", required=True)
    rst.add_argument("--json", action="store_true")

    experiments = sub.add_parser(
        "experiments", help="champion and challenger side by side on devices"
    ).add_subparsers(dest="command", required=True)
    es = experiments.add_parser("start")
    es.add_argument("--model", required=True)
    es.add_argument("--challenger", required=True, type=int)
    es.add_argument("--weight", type=float, default=0.1)
    es.add_argument("--selector", action="append", default=[], metavar="K=V")
    es.add_argument("--json", action="store_true")
    for name in ("status", "stop"):
        e = experiments.add_parser(name)
        e.add_argument("--model", required=True)
        e.add_argument("--json", action="store_true")

    drift = sub.add_parser("drift", help="drift per device and fleet-wide (latest windows)")
    drift.set_defaults(command="show")
    drift.add_argument("--model", default="")
    drift.add_argument("--json", action="store_true")


def _ts(value: float) -> str:
    if not value:
        return "-"
    return dt.datetime.fromtimestamp(value, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


_STATUS_NAMES = {
    admin_pb2.DEVICE_STATUS_ONLINE: "online",
    admin_pb2.DEVICE_STATUS_OFFLINE: "offline",
    admin_pb2.DEVICE_STATUS_REVOKED: "revoked",
}


def device_json(d: admin_pb2.Device) -> dict[str, Any]:
    return {
        "id": d.id,
        "labels": dict(d.labels),
        "status": _STATUS_NAMES.get(d.status, "unknown"),
        "last_seen": d.last_seen or None,
        "enrolled_at": d.enrolled_at,
        "agent_version": d.agent_version,
        "host": {f.name: getattr(d.host, f.name) for f in d.host.DESCRIPTOR.fields},
        "models": [
            json_format.MessageToDict(m, preserving_proto_field_name=True) for m in d.models
        ],
        "certificate_serial": d.certificate_serial,
        "certificate_expires_at": d.certificate_expires_at,
        "revoked_at": d.revoked_at or None,
    }


def _labels_text(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "-"


def _show_device(d: admin_pb2.Device, as_json: bool) -> None:
    doc = device_json(d)
    if as_json:
        print_json(doc)
        return
    rows = [
        ("id", doc["id"]),
        ("status", doc["status"]),
        ("labels", _labels_text(doc["labels"])),
        ("last_seen", _ts(d.last_seen)),
        ("enrolled_at", _ts(d.enrolled_at)),
        ("agent_version", doc["agent_version"] or "-"),
        ("hostname", d.host.hostname or "-"),
        ("platform", f"{d.host.os} {d.host.arch}".strip() or "-"),
        ("certificate", f"{d.certificate_serial} (expires {_ts(d.certificate_expires_at)})"),
    ]
    if d.revoked_at:
        rows.append(("revoked_at", _ts(d.revoked_at)))
    print_table(("field", "value"), rows)
    if d.models:
        print()
        print_table(("MODEL", "VERSION", "STATE", "SERVING", "REASON"), [
            (m.name, m.version, m.state, "yes" if m.serving else "", m.reason or "-")
            for m in d.models
        ])


Stub = admin_pb2_grpc.AdminServiceStub
T = RPC_TIMEOUT_SECONDS


def _tokens_create(stub: Stub, args: argparse.Namespace, cfg: FleetConfig) -> None:
    r = stub.CreateEnrollmentToken(
        admin_pb2.CreateEnrollmentTokenRequest(
            ttl_seconds=args.ttl, labels=parse_label_args(args.label)
        ),
        timeout=T,
    )
    if args.json:
        print_json({"token": r.token, "expires_at": r.expires_at})
    else:
        print(r.token)


def _devices_list(stub: Stub, args: argparse.Namespace, cfg: FleetConfig) -> None:
    r = stub.ListDevices(
        admin_pb2.ListDevicesRequest(selector=parse_label_args(args.selector)), timeout=T
    )
    if args.json:
        print_json([device_json(d) for d in r.devices])
        return
    print_table(
        ("ID", "STATUS", "LABELS", "LAST SEEN", "HOST", "AGENT"),
        [
            (
                d.id,
                _STATUS_NAMES.get(d.status, "unknown"),
                _labels_text(dict(d.labels)),
                _ts(d.last_seen),
                d.host.hostname or "-",
                d.agent_version or "-",
            )
            for d in r.devices
        ],
    )


def _devices_show(stub: Stub, args: argparse.Namespace, cfg: FleetConfig) -> None:
    _show_device(stub.GetDevice(admin_pb2.GetDeviceRequest(id=args.id), timeout=T), args.json)


def _devices_revoke(stub: Stub, args: argparse.Namespace, cfg: FleetConfig) -> None:
    d = stub.RevokeDevice(admin_pb2.RevokeDeviceRequest(id=args.id, reason=args.reason), timeout=T)
    _show_device(d, args.json)


def _operators_create(stub: Stub, args: argparse.Namespace, cfg: FleetConfig) -> None:
    pki.validate_name(args.name, "operator name")
    op_key = pki.generate_key()  # generated here; only the CSR goes to the control plane
    r = stub.CreateOperator(
        admin_pb2.CreateOperatorRequest(
            name=args.name, role=args.role, csr_pem=pki.make_csr(op_key, args.name)
        ),
        timeout=T,
    )
    path = write_operator_config(
        args.out, cfg.api, pki.private_key_pem(op_key), r.certificate_pem, r.ca_pem
    )
    print(f"operator {args.name} ({args.role}): {path}")


def _audit_list(stub: Stub, args: argparse.Namespace, cfg: FleetConfig) -> None:
    r = stub.ListAuditEvents(admin_pb2.ListAuditEventsRequest(limit=args.limit), timeout=T)
    events = [
        {
            "seq": e.seq,
            "time": e.time,
            "actor": e.actor,
            "action": e.action,
            "target": e.target,
            "outcome": e.outcome,
            "detail": json.loads(e.detail or "{}"),
        }
        for e in r.events
    ]
    if args.json:
        print_json(events)
        return
    print_table(
        ("SEQ", "TIME", "ACTOR", "ACTION", "TARGET", "OUTCOME"),
        [
            (e["seq"], _ts(e["time"]), e["actor"], e["action"], e["target"] or "-", e["outcome"])
            for e in events
        ],
    )


def model_json(m: admin_pb2.ModelVersion) -> dict[str, Any]:
    return {
        "name": m.name, "version": m.version, "digest": m.digest, "length": m.length,
        "created_at": m.created_at, "published_by": m.published_by,
        "publisher_key": m.publisher_key, "manifest": json.loads(m.manifest_json or "{}"),
    }


def _print_models(models: list[admin_pb2.ModelVersion], as_json: bool) -> None:
    if as_json:
        print_json([model_json(m) for m in models])
        return
    rows = []
    for m in models:
        metrics = json.loads(m.manifest_json or "{}").get("metrics", {})
        acc = metrics.get("compressed", {}).get("accuracy")
        rows.append((m.name, m.version, m.digest[:19], f"{m.length:,}",
                     f"{acc:.4f}" if isinstance(acc, float) else "-", _ts(m.created_at)))
    print_table(("NAME", "VERSION", "DIGEST", "BYTES", "ACCURACY", "PUBLISHED"), rows)


def _models_publish(stub: Stub, args: argparse.Namespace, cfg: FleetConfig) -> None:
    if not args.bundle.is_dir():
        raise InvalidInputError(f"{args.bundle} is not a bundle directory")
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "bundle.tar"
        pack_bundle(args.bundle, archive)

        def chunks() -> Iterator[admin_pb2.PublishModelChunk]:
            with archive.open("rb") as fh:
                while data := fh.read(PUBLISH_CHUNK_BYTES):
                    yield admin_pb2.PublishModelChunk(data=data)

        m = stub.PublishModel(chunks(), timeout=PUBLISH_TIMEOUT_SECONDS)
    if args.json:
        print_json(model_json(m))
    else:
        print(f"published {m.name} version {m.version} ({m.digest}, {m.length:,} bytes)")


def _models_list(stub: Stub, args: argparse.Namespace, cfg: FleetConfig) -> None:
    _print_models(list(stub.ListModels(admin_pb2.ListModelsRequest(), timeout=T).models),
                  args.json)


def _models_show(stub: Stub, args: argparse.Namespace, cfg: FleetConfig) -> None:
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
        "reason": r.reason, "history": list(r.history),
        "devices": [
            {"id": d.device_id, "step": d.step, "desired_version": d.desired_version,
             "serving_version": d.reported_version or None, "state": d.reported_state,
             "reason": d.reason, "release_serial": d.release_serial}
            for d in r.devices
        ],
    }


def _print_rollout(r: admin_pb2.Rollout, as_json: bool) -> None:
    if as_json:
        print_json(rollout_json(r))
        return
    print(f"rollout {r.model} -> version {r.version} ({r.state}), selector "
          f"{_labels_text(dict(r.selector))}, {len(r.devices)} devices, step {r.step} of "
          f"{len(r.steps)} ({','.join(str(s) for s in r.steps)}%), bake {r.bake_seconds:g}s, "
          f"gates {', '.join(r.gates) or '-'}, on failure {r.on_failure}"
          + (f"; {r.reason}" if r.reason else ""))
    print_table(("DEVICE", "STEP", "DESIRED", "SERVING", "STATE", "RELEASE", "REASON"), [
        (d.device_id, d.step, d.desired_version, d.reported_version or "-", d.reported_state,
         d.release_serial or "-", d.reason or "-") for d in r.devices
    ])
    for line in r.history:
        print(f"  - {line}")


def _rollouts_start(stub: Stub, args: argparse.Namespace, cfg: FleetConfig) -> None:
    steps = [int(s) for s in args.steps.split(",") if s.strip()]
    r = stub.StartRollout(admin_pb2.StartRolloutRequest(
        model=args.model, version=args.version, selector=parse_label_args(args.selector),
        steps=steps, bake_seconds=args.bake, gates=args.gate, on_failure=args.on_failure),
        timeout=T)
    _print_rollout(r, args.json)


def _rollouts_act(stub: Stub, args: argparse.Namespace, cfg: FleetConfig) -> None:
    r = stub.ActOnRollout(admin_pb2.RolloutActionRequest(model=args.model,
                                                         action=args.command), timeout=T)
    _print_rollout(r, args.json)


def _rollouts_status(stub: Stub, args: argparse.Namespace, cfg: FleetConfig) -> None:
    _print_rollout(stub.GetRollout(admin_pb2.GetRolloutRequest(model=args.model), timeout=T),
                   args.json)


def experiment_json(e: admin_pb2.Experiment) -> dict[str, Any]:
    return {
        "model": e.model, "champion": e.champion, "challenger": e.challenger,
        "weight": e.weight, "state": e.state, "selector": dict(e.selector),
        "devices": list(e.device_ids), "created_at": e.created_at,
        "arms": [
            {"version": a.version, "role": a.role, "weight": a.weight, "requests": a.requests,
             "errors": a.errors, "p50_ms": a.p50_ms, "p95_ms": a.p95_ms,
             "labelled": a.labelled, "correct": a.correct,
             "accuracy": a.correct / a.labelled if a.labelled else None,
             "accuracy_ci95": [a.accuracy_low, a.accuracy_high], "devices": a.devices}
            for a in e.arms
        ],
        "decision": e.decision, "p_value": e.p_value or None, "test": e.test,
        "decision_reason": e.decision_reason, "min_samples": e.min_samples,
    }


def _print_experiment(e: admin_pb2.Experiment, as_json: bool) -> None:
    doc = experiment_json(e)
    if as_json:
        print_json(doc)
        return
    print(f"experiment {e.model}: champion v{e.champion} vs challenger v{e.challenger} "
          f"({e.weight:.0%} of traffic), {e.state}, {len(e.device_ids)} devices")
    print_table(("ARM", "VERSION", "WEIGHT", "REQUESTS", "ERRORS", "P50 MS", "P95 MS",
                 "LABELLED", "ACCURACY", "95% CI"), [
        (a["role"], a["version"], f"{a['weight']:.2f}", a["requests"], a["errors"],
         f"{a['p50_ms']:.2f}", f"{a['p95_ms']:.2f}", a["labelled"],
         f"{a['accuracy']:.4f}" if a["accuracy"] is not None else "-",
         f"{a['accuracy_ci95'][0]:.3f}-{a['accuracy_ci95'][1]:.3f}")
        for a in doc["arms"]
    ])
    print(f"decision: {doc['decision']} — {doc['decision_reason']} ({doc['test']}, "
          f"{doc['min_samples']} labelled per arm)")


def _experiments_start(stub: Stub, args: argparse.Namespace, cfg: FleetConfig) -> None:
    e = stub.StartExperiment(admin_pb2.StartExperimentRequest(
        model=args.model, challenger=args.challenger, weight=args.weight,
        selector=parse_label_args(args.selector)), timeout=T)
    _print_experiment(e, args.json)


def _experiments_status(stub: Stub, args: argparse.Namespace, cfg: FleetConfig) -> None:
    _print_experiment(stub.GetExperiment(admin_pb2.GetExperimentRequest(model=args.model),
                                         timeout=T), args.json)


def _experiments_stop(stub: Stub, args: argparse.Namespace, cfg: FleetConfig) -> None:
    _print_experiment(stub.StopExperiment(admin_pb2.GetExperimentRequest(model=args.model),
                                          timeout=T), args.json)


def _drift_show(stub: Stub, args: argparse.Namespace, cfg: FleetConfig) -> None:
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
    print_table(("DEVICE", "MODEL", "VERSION", "WINDOW END", "ROWS", "SCORE", "DRIFTED",
                 "FEATURES"), [
        (w["device_id"], w["model"], w["version"], _ts(w["end"]), w["rows"],
         f"{w['score']:.3f}", "yes" if w["drifted"] else "no",
         len(w["drifted_features"])) for w in doc["devices"]
    ])


def _audit_checkpoint(stub: Stub, args: argparse.Namespace, cfg: FleetConfig) -> None:
    c = stub.CheckpointAudit(admin_pb2.CheckpointAuditRequest(), timeout=T)
    text = json.dumps({"document": c.document.decode(),
                       "signature": base64.b64encode(c.signature).decode()}, indent=2) + "\n"
    if args.out:
        atomic_write(args.out, text.encode())
        head = json.loads(c.document)
        print(f"checkpoint of {head['size']} entries (head {head['hash'][:16]}) -> {args.out}")
    else:
        sys.stdout.write(text)


def _audit_verify(stub: Stub, args: argparse.Namespace, cfg: FleetConfig) -> None:
    request = admin_pb2.VerifyAuditRequest()
    if args.checkpoint:
        try:
            doc = json.loads(args.checkpoint.read_bytes())
            request.checkpoint.document = str(doc["document"]).encode()
            request.checkpoint.signature = base64.b64decode(doc["signature"], validate=True)
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidInputError(f"{args.checkpoint}: not an audit checkpoint ({exc})") from None
    v = stub.VerifyAudit(request, timeout=T)
    doc = {"ok": v.ok, "entries": v.entries, "first_bad_seq": v.first_bad_seq or None,
           "reason": v.reason}
    if v.checkpoint_checked:
        doc.update(checkpoint_ok=v.checkpoint_ok, checkpoint_reason=v.checkpoint_reason)
    if args.json:
        print_json(doc)
    else:
        print(f"{'intact' if v.ok else 'BROKEN'}: {v.entries} entries; {v.reason}"
              + (f"; checkpoint: {v.checkpoint_reason}" if v.checkpoint_checked else ""))
    if v.first_bad_seq:
        raise AuditBrokenError(f"audit chain broken at entry {v.first_bad_seq}: {v.reason}")
    if not v.ok:
        raise AuditBrokenError(f"audit checkpoint: {v.checkpoint_reason}")


class AuditBrokenError(InvalidInputError):
    """``fleet audit verify`` found a changed, deleted, reordered or truncated log."""


COMMANDS: dict[tuple[str, str], Callable[[Stub, argparse.Namespace, FleetConfig], None]] = {
    ("audit", "verify"): _audit_verify,
    ("audit", "checkpoint"): _audit_checkpoint,
    ("experiments", "start"): _experiments_start,
    ("experiments", "status"): _experiments_status,
    ("experiments", "stop"): _experiments_stop,
    ("drift", "show"): _drift_show,
    ("models", "publish"): _models_publish,
    ("models", "list"): _models_list,
    ("models", "show"): _models_show,
    ("rollouts", "start"): _rollouts_start,
    ("rollouts", "status"): _rollouts_status,
    ("rollouts", "pause"): _rollouts_act,
    ("rollouts", "resume"): _rollouts_act,
    ("rollouts", "abort"): _rollouts_act,
    ("rollouts", "rollback"): _rollouts_act,
    ("tokens", "create"): _tokens_create,
    ("devices", "list"): _devices_list,
    ("devices", "show"): _devices_show,
    ("devices", "revoke"): _devices_revoke,
    ("operators", "create"): _operators_create,
    ("audit", "list"): _audit_list,
}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    def body() -> int:
        path = args.config or (Path(os.environ["FLEET_CONFIG"]) if "FLEET_CONFIG" in os.environ
                               else None)
        if path is None:
            raise InvalidInputError("no client config: pass --config FILE or set $FLEET_CONFIG")
        cfg = FleetConfig.load(path)
        if args.api:
            parse_hostport(args.api)
            cfg = FleetConfig(api=args.api, cert=cfg.cert, key=cfg.key, ca=cfg.ca)
        try:
            with cfg.channel() as channel:
                COMMANDS[(args.group, args.command)](Stub(channel), args, cfg)
            return 0
        except grpc.RpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.UNAVAILABLE:
                print(f"error: cannot reach the control plane at {cfg.api}: {exc.details()}",
                      file=sys.stderr)
            else:
                print(f"error: {code.name}: {exc.details()}", file=sys.stderr)
            return 1

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
