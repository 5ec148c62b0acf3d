"""`fleet`: the operator CLI against the control-plane AdminService (mTLS): tokens, devices,
operators and the audit log here; models, rollouts, experiments, drift and retraining in
`fleet.models`."""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from edgefleet.v1 import admin_pb2
from google.protobuf import json_format

from fleet.channel import open_channel
from fleet.common import RPC_TIMEOUT_SECONDS as T
from fleet.common import Stub, labels_text, ts
from fleet.console import add_console_command, run_console
from fleet.models import MODEL_COMMANDS, add_model_commands
from fleet.publishers import PUBLISHER_COMMANDS, add_publisher_commands
from fleetcore import operator_config, pki
from fleetcore.addresses import parse_hostport
from fleetcore.cli import print_json, print_table, run_main
from fleetcore.errors import InvalidInputError
from fleetcore.files import atomic_write
from fleetcore.labels import parse_label_args
from fleetcore.operator_config import OperatorConfig

__all__ = ["main"]


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
    dl = devices.add_parser("list", help="every device: status, labels, last seen")
    dl.add_argument("--selector", action="append", default=[], metavar="K=V")
    dl.add_argument("--json", action="store_true")
    ds = devices.add_parser("show", help="one device: certificates, models, telemetry")
    ds.add_argument("id")
    ds.add_argument("--json", action="store_true")
    dr = devices.add_parser("revoke", help="revoke a device: its certificate stops working at once")
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
    ol = ops.add_parser("list", help="every operator: role, certificates, revoked or not")
    ol.add_argument("--json", action="store_true")
    orv = ops.add_parser("revoke", help="revoke an operator: its certificates are refused from "
                                        "its next call")
    orv.add_argument("name")
    orv.add_argument("--reason", default="")
    orv.add_argument("--json", action="store_true")

    add_model_commands(sub)
    add_publisher_commands(sub)
    add_console_command(sub)

    audit = sub.add_parser("audit", help="the audit log").add_subparsers(
        dest="command", required=True
    )
    al = audit.add_parser("list", help="the newest audit entries")
    al.add_argument("--limit", type=int, default=100)
    al.add_argument("--json", action="store_true")
    av = audit.add_parser("verify", help="check the hash chain (and an earlier checkpoint)")
    av.add_argument("--checkpoint", type=Path, help="a file written by `fleet audit checkpoint`")
    av.add_argument("--json", action="store_true")
    ac = audit.add_parser("checkpoint", help="export the signed head of the audit chain")
    ac.add_argument("--out", type=Path, help="write it here (default: stdout)")
    return p




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
        "transport": d.transport or None,
        "refused_reports": dict(sorted(d.refused_reports.items())),
        "alerts": [{"kind": a.kind, "detail": json.loads(a.detail or "{}"),
                    "since": a.since, "updated_at": a.updated_at} for a in d.alerts],
        "root_version": d.root_version,
    }


def _alerts_text(d: admin_pb2.Device) -> str:
    """The LIST column: what detection flagged (clone-suspected, freeze, slow-retrieval)."""
    return ",".join(a.kind for a in d.alerts) or "-"


def _show_device(d: admin_pb2.Device, as_json: bool) -> None:
    doc = device_json(d)
    if as_json:
        print_json(doc)
        return
    rows = [
        ("id", doc["id"]),
        ("status", doc["status"]),
        ("labels", labels_text(doc["labels"])),
        ("last_seen", ts(d.last_seen)),
        ("enrolled_at", ts(d.enrolled_at)),
        ("agent_version", doc["agent_version"] or "-"),
        ("transport", doc["transport"] or "-"),
        ("hostname", d.host.hostname or "-"),
        ("platform", f"{d.host.os} {d.host.arch}".strip() or "-"),
        ("certificate", f"{d.certificate_serial} (expires {ts(d.certificate_expires_at)})"),
        ("root_version", d.root_version or "-"),
    ]
    if d.revoked_at:
        rows.append(("revoked_at", ts(d.revoked_at)))
    refused = sum(d.refused_reports.values())
    rows.append(("refused_reports", ", ".join(
        f"{k} {n}" for k, n in sorted(d.refused_reports.items())) if refused else "0"))
    for a in d.alerts:
        rows.append((f"alert {a.kind}", f"since {ts(a.since)}: {_alert_detail(a.detail)}"))
    print_table(("field", "value"), rows)
    if d.models:
        print()
        print_table(("MODEL", "VERSION", "STATE", "SERVING", "REASON"), [
            (m.name, m.version, m.state, "yes" if m.serving else "", m.reason or "-")
            for m in d.models
        ])


def _alert_detail(detail: str) -> str:
    try:
        doc = json.loads(detail or "{}")
    except ValueError:
        return detail
    if "peers" in doc:
        return f"{doc.get('how', '')} from {' and '.join(map(str, doc['peers']))}"
    return str(doc.get("detail", detail))


def _tokens_create(stub: Stub, args: argparse.Namespace, cfg: OperatorConfig) -> None:
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


def _devices_list(stub: Stub, args: argparse.Namespace, cfg: OperatorConfig) -> None:
    r = stub.ListDevices(
        admin_pb2.ListDevicesRequest(selector=parse_label_args(args.selector)), timeout=T
    )
    if args.json:
        print_json([device_json(d) for d in r.devices])
        return
    print_table(
        ("ID", "STATUS", "TRANSPORT", "LABELS", "LAST SEEN", "HOST", "AGENT", "ALERTS"),
        [
            (
                d.id,
                _STATUS_NAMES.get(d.status, "unknown"),
                d.transport or "-",
                labels_text(dict(d.labels)),
                ts(d.last_seen),
                d.host.hostname or "-",
                d.agent_version or "-",
                _alerts_text(d),
            )
            for d in r.devices
        ],
    )


def _devices_show(stub: Stub, args: argparse.Namespace, cfg: OperatorConfig) -> None:
    _show_device(stub.GetDevice(admin_pb2.GetDeviceRequest(id=args.id), timeout=T), args.json)


def _devices_revoke(stub: Stub, args: argparse.Namespace, cfg: OperatorConfig) -> None:
    d = stub.RevokeDevice(admin_pb2.RevokeDeviceRequest(id=args.id, reason=args.reason), timeout=T)
    _show_device(d, args.json)


def _operators_create(stub: Stub, args: argparse.Namespace, cfg: OperatorConfig) -> None:
    pki.validate_name(args.name, "operator name")
    op_key = pki.generate_key()  # generated here; only the CSR goes to the control plane
    r = stub.CreateOperator(
        admin_pb2.CreateOperatorRequest(
            name=args.name, role=args.role, csr_pem=pki.make_csr(op_key, args.name)
        ),
        timeout=T,
    )
    path = operator_config.write(
        args.out, api=cfg.api, key_pem=pki.private_key_pem(op_key),
        cert_pem=r.certificate_pem, ca_pem=r.ca_pem,
    )
    print(f"operator {args.name} ({args.role}): {path}")


def _operator_json(o: admin_pb2.Operator) -> dict[str, Any]:
    return {"name": o.name, "role": o.role, "created_at": o.created_at,
            "created_by": o.created_by, "revoked_at": o.revoked_at or None,
            "certificate_serials": list(o.certificate_serials)}


def _operators_list(stub: Stub, args: argparse.Namespace, cfg: OperatorConfig) -> None:
    r = stub.ListOperators(admin_pb2.ListOperatorsRequest(), timeout=T)
    if args.json:
        print_json([_operator_json(o) for o in r.operators])
        return
    print_table(("NAME", "ROLE", "CREATED", "BY", "REVOKED", "CERTIFICATES"), [
        (o.name, o.role, ts(o.created_at), o.created_by,
         ts(o.revoked_at) if o.revoked_at else "-", len(o.certificate_serials))
        for o in r.operators])


def _operators_revoke(stub: Stub, args: argparse.Namespace, cfg: OperatorConfig) -> None:
    o = stub.RevokeOperator(admin_pb2.RevokeOperatorRequest(name=args.name,
                                                            reason=args.reason), timeout=T)
    if args.json:
        print_json(_operator_json(o))
    else:
        print(f"operator {o.name} revoked at {ts(o.revoked_at)}: "
              f"{len(o.certificate_serials)} certificate(s) refused from now on")


def _audit_list(stub: Stub, args: argparse.Namespace, cfg: OperatorConfig) -> None:
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
            (e["seq"], ts(e["time"]), e["actor"], e["action"], e["target"] or "-", e["outcome"])
            for e in events
        ],
    )


def _audit_checkpoint(stub: Stub, args: argparse.Namespace, cfg: OperatorConfig) -> None:
    c = stub.CheckpointAudit(admin_pb2.CheckpointAuditRequest(), timeout=T)
    text = json.dumps({"document": c.document.decode(),
                       "signature": base64.b64encode(c.signature).decode()}, indent=2) + "\n"
    if args.out:
        atomic_write(args.out, text.encode())
        head = json.loads(c.document)
        print(f"checkpoint of {head['size']} entries (head {head['hash'][:16]}) -> {args.out}")
    else:
        sys.stdout.write(text)


def _audit_verify(stub: Stub, args: argparse.Namespace, cfg: OperatorConfig) -> None:
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


COMMANDS: dict[tuple[str, str], Callable[[Stub, argparse.Namespace, OperatorConfig], None]] = {
    **MODEL_COMMANDS,
    **PUBLISHER_COMMANDS,
    ("console", "serve"): run_console,
    ("audit", "verify"): _audit_verify,
    ("audit", "checkpoint"): _audit_checkpoint,
    ("tokens", "create"): _tokens_create,
    ("devices", "list"): _devices_list,
    ("devices", "show"): _devices_show,
    ("devices", "revoke"): _devices_revoke,
    ("operators", "create"): _operators_create,
    ("operators", "list"): _operators_list,
    ("operators", "revoke"): _operators_revoke,
    ("audit", "list"): _audit_list,
}


# What to do next, per gRPC status (printed after the error).
NEXT_STEPS = {
    grpc.StatusCode.UNAVAILABLE: "is `control-plane serve` running and listening on {api}? "
                                 "pass --api HOST:PORT to reach another address",
    grpc.StatusCode.UNAUTHENTICATED: "the operator certificate in {config} was refused "
                                     "(expired, revoked or from another fleet); ask an admin for "
                                     "a new one (`fleet operators create`)",
    grpc.StatusCode.PERMISSION_DENIED: "your operator role does not allow this; `fleet audit "
                                       "list` (viewer) shows the denial; ask an admin",
    grpc.StatusCode.DEADLINE_EXCEEDED: "the control plane did not answer in time; retry, or "
                                       "check its load and log",
}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    def body() -> int:
        path = args.config or (Path(os.environ["FLEET_CONFIG"]) if "FLEET_CONFIG" in os.environ
                               else None)
        if path is None:
            raise InvalidInputError("no client config: pass --config FILE or set $FLEET_CONFIG")
        cfg = operator_config.load(path)
        if args.api:
            parse_hostport(args.api)
            cfg = dataclasses.replace(cfg, api=args.api)
        try:
            with open_channel(cfg) as channel:
                COMMANDS[(args.group, args.command)](Stub(channel), args, cfg)
            return 0
        except grpc.RpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.UNAVAILABLE:
                print(f"error: cannot reach the control plane at {cfg.api}: {exc.details()}",
                      file=sys.stderr)
            else:
                print(f"error: {code.name}: {exc.details()}", file=sys.stderr)
            hint = NEXT_STEPS.get(code, "")
            if hint:
                print(f"hint: {hint.format(api=cfg.api, config=path)}", file=sys.stderr)
            return 1

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
