"""`fleet console`: a local web app over the operator's own AdminService connection
(docs/console.md)."""

from __future__ import annotations

import argparse
import ipaddress
import sys
import threading
from typing import Any

from fleet.common import Stub
from fleetcore import pki
from fleetcore.addresses import parse_hostport
from fleetcore.errors import InvalidInputError

__all__ = ["add_console_command", "run_console"]


def add_console_command(sub: Any) -> None:
    c = sub.add_parser(
        "console", help="a local web console (fleet, rollouts, experiments, drift, audit)",
        description="Serve the console on a local address with this operator's certificate "
                    "and role; open the printed URL (it holds the session token).")
    c.set_defaults(command="serve")
    c.add_argument("--listen", default="127.0.0.1:8800", metavar="HOST:PORT",
                   help="where to serve (default 127.0.0.1:8800; port 0: any free port)")


def run_console(stub: Stub, args: argparse.Namespace, cfg: Any,
                stop: threading.Event | None = None) -> None:
    from fleet.console.api import ConsoleApi  # noqa: PLC0415 (only this command needs it)
    from fleet.console.server import ConsoleServer  # noqa: PLC0415

    host, port = parse_hostport(args.listen)
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    identity = pki.identity_from_certificate(pki.load_certificate(cfg.cert.read_bytes()))
    role = identity.role.label if identity.role is not None else "viewer"
    try:
        console = ConsoleServer(ConsoleApi(stub), operator=identity.name, role=role,
                                host=host, port=port)
    except OSError as exc:
        raise InvalidInputError(f"cannot listen on {args.listen}: {exc.strerror} (choose "
                                "another --listen address)") from None
    console.start()
    if not loopback:
        print(f"warning: {host} is not a loopback address; anyone who can reach it and has "
              "the URL acts with your certificate", file=sys.stderr)
    print(f"console for {identity.name} ({role}) at {cfg.api}; open:\n  {console.url}\n"
          "Ctrl-C stops it.", flush=True)
    try:
        (stop or threading.Event()).wait()
    except KeyboardInterrupt:
        pass
    finally:
        console.stop()
