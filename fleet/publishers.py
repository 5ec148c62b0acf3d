"""`fleet publishers list | add PUB.pem | revoke KEYID [--rollback]`: the keys that sign model
bundles (the root's publisher role; control_plane/services/publishers.py)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from edgefleet.v1 import admin_pb2
from google.protobuf import json_format

from fleet.common import RPC_TIMEOUT_SECONDS as T
from fleet.common import Stub
from fleetcore.cli import print_json, print_table
from fleetcore.errors import InvalidInputError
from fleetcore.operator_config import OperatorConfig

__all__ = ["PUBLISHER_COMMANDS", "add_publisher_commands"]

MAX_PEM_BYTES = 4096


def add_publisher_commands(sub: Any) -> None:
    pubs = sub.add_parser("publishers", help="the keys that sign model bundles (admin)"
                          ).add_subparsers(dest="command", required=True)
    pl = pubs.add_parser("list", help="the trusted publisher keys and their threshold")
    pl.add_argument("--json", action="store_true")
    pa = pubs.add_parser("add", help="trust another publisher key (a new root)")
    pa.add_argument("pem", type=argparse.FileType("rb"), metavar="PUB.pem")
    pa.add_argument("--threshold", type=int, default=0, metavar="K",
                    help="distinct publisher signatures a bundle needs from now on (default: "
                         "keep)")
    pa.add_argument("--json", action="store_true")
    pr = pubs.add_parser("revoke", help="withdraw a publisher key (a new root)")
    pr.add_argument("keyid", help="the key id (or a unique prefix) from `fleet publishers list`")
    pr.add_argument("--rollback", action="store_true",
                    help="release devices serving a version no longer trusted back to the "
                         "last trusted version of that model")
    pr.add_argument("--threshold", type=int, default=0, metavar="K")
    pr.add_argument("--json", action="store_true")


def _print(r: admin_pb2.ListPublishersResponse, args: argparse.Namespace) -> None:
    if args.json:
        print_json(json_format.MessageToDict(r, preserving_proto_field_name=True,
                                             always_print_fields_with_no_presence=True))
        return
    if r.changed_keyid:
        state = ("published: agents adopt it at their next sync" if r.change_published else
                 "staged: too few root keys at hand; run `control-plane root sign --home DIR "
                 "--root-key FILE` to publish it")
        print(f"{args.command} {r.changed_keyid[:16]}...: root version "
              f"{r.change_root_version} {state}")
        for line in r.rolled_back:
            print(f"rolled back: {line}")
    print_table(["KEYID", "ROOT", "THRESHOLD"],
                [[p.keyid, str(r.root_version), str(r.threshold)] for p in r.publishers])
    if r.pending_version:
        print(f"pending: root version {r.pending_version} waits for root-key signatures")


def _list(stub: Stub, args: argparse.Namespace, cfg: OperatorConfig) -> None:
    _print(stub.ListPublishers(admin_pb2.ListPublishersRequest(), timeout=T), args)


def _add(stub: Stub, args: argparse.Namespace, cfg: OperatorConfig) -> None:
    with args.pem as fh:
        pem = fh.read(MAX_PEM_BYTES + 1)
    if len(pem) > MAX_PEM_BYTES:
        raise InvalidInputError(f"{args.pem.name} is over {MAX_PEM_BYTES} bytes; hint: pass "
                                "the publisher's public key (publisher.pub from `trainer keygen`)")
    if args.threshold < 0:
        raise InvalidInputError("--threshold must be >= 1")
    _print(stub.AddPublisher(admin_pb2.AddPublisherRequest(
        public_key_pem=pem, threshold=args.threshold), timeout=T), args)


def _revoke(stub: Stub, args: argparse.Namespace, cfg: OperatorConfig) -> None:
    if args.threshold < 0:
        raise InvalidInputError("--threshold must be >= 1")
    _print(stub.RevokePublisher(admin_pb2.RevokePublisherRequest(
        keyid=args.keyid, rollback=args.rollback, threshold=args.threshold), timeout=T), args)


PUBLISHER_COMMANDS: dict[tuple[str, str],
                         Callable[[Stub, argparse.Namespace, OperatorConfig], None]] = {
    ("publishers", "list"): _list,
    ("publishers", "add"): _add,
    ("publishers", "revoke"): _revoke,
}
