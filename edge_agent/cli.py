"""`edge-agent`: enroll this host, run the agent, show its status."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from edge_agent.daemon import Agent
from edge_agent.install.model_store import ModelStore
from edge_agent.state import AgentConfig, StateDir
from edge_agent.transport import TRANSPORTS
from fleetcore.cli import print_json, print_table, run_main, setup_logging
from fleetcore.errors import InvalidInputError
from fleetcore.labels import parse_label_args

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-agent", description="Edgefleet edge agent")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("enroll", help="enroll this host with a one-time token")
    e.add_argument("--server", required=True, metavar="HOST:PORT", help="enrollment address")
    e.add_argument("--token", required=True)
    e.add_argument("--ca", required=True, type=Path, help="the fleet CA certificate (PEM)")
    e.add_argument("--state-dir", required=True, type=Path)
    e.add_argument("--label", action="append", default=[], metavar="K=V")
    e.add_argument("--force", action="store_true", help="replace an existing enrollment")
    e.add_argument("--transport", choices=TRANSPORTS, default="grpc",
                   help="how `run` reaches the control plane (mqtt: through the fleet's broker)")

    r = sub.add_parser("run", help="run the agent until SIGTERM/SIGINT")
    r.add_argument("--state-dir", required=True, type=Path)
    r.add_argument("--listen", metavar="HOST:PORT", default="127.0.0.1:8080",
                   help="Open Inference Protocol HTTP address ('' to disable; port 0: any)")
    r.add_argument("--grpc-listen", metavar="HOST:PORT", default="127.0.0.1:8081",
                   help="Open Inference Protocol gRPC address ('' to disable; port 0: any)")
    r.add_argument("--transport", choices=TRANSPORTS, default=None,
                   help="override agent.transport from agent.toml for this run")
    r.add_argument("--http-parser", choices=("auto", "httptools", "h11"), default="auto",
                   help="HTTP/1.1 parser (auto: httptools when installed, else h11)")
    r.add_argument("--event-loop", choices=("auto", "uvloop", "asyncio"), default="auto",
                   help="event loop (auto: uvloop when installed, else asyncio's)")

    s = sub.add_parser("status", help="show this agent's identity and last contact")
    s.add_argument("--state-dir", required=True, type=Path)
    s.add_argument("--json", action="store_true")
    return p


def event_loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory for "uvloop" (and for "auto" when importable), else None
    (asyncio's own loop). "uvloop" where it is not installed is an error with a hint."""
    if choice == "asyncio":
        return None
    try:
        import uvloop  # noqa: PLC0415 (optional: the agent extra installs it where it builds)
    except ImportError:
        if choice == "uvloop":
            raise InvalidInputError("--event-loop uvloop: uvloop is not installed (pip "
                                    "install uvloop, or use --event-loop asyncio)") from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


async def _run(state_dir: Path, transport: str | None, listen: str, grpc_listen: str,
               http_parser: str = "auto") -> None:
    cfg = AgentConfig.load(StateDir(state_dir))
    cfg.transport = transport or cfg.transport
    agent = Agent(state_dir, config=cfg, listen=listen or None, grpc_listen=grpc_listen or None,
                  http_parser=http_parser)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, agent.request_stop)
    await agent.run()


def _ts(value: float | None) -> str:
    if not value:
        return "-"
    return dt.datetime.fromtimestamp(value, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _status(state_dir: Path, as_json: bool) -> int:
    # A one-shot command: it may load cryptography (`edge-agent run` never does).
    from edge_agent.identity import load_credentials  # noqa: PLC0415
    from edge_agent.install.release_trust import recorded_serial  # noqa: PLC0415
    from edge_agent.install.root_trust import recorded_root_version  # noqa: PLC0415

    state = StateDir(state_dir)
    cfg = AgentConfig.load(state)
    creds = load_credentials(state)
    live = state.read_status()
    models = ModelStore(state.models).status() if state.models.exists() else []
    doc = {
        "device_id": cfg.device_id,
        # The replica the running agent uses now (it moves on failover), and every one known.
        "api_address": live.get("api_address") or cfg.api_address,
        "api_addresses": cfg.failover_addresses(),
        "transport": cfg.transport,
        "labels": cfg.labels,
        "certificate_serial": creds.serial,
        "certificate_expires_at": creds.not_after,
        "state": live.get("state", "never-run"),
        "last_heartbeat": live.get("last_heartbeat"),
        "last_error": live.get("last_error"),
        "consecutive_failures": live.get("consecutive_failures", 0),
        "release_serial": recorded_serial(state.release),
        # Freeze, slow retrieval (docs/security.md, "Detection"), as last reported.
        "delivery_problems": live.get("delivery_problems", {}),
        "root_version": recorded_root_version(state.root_file),
        "root_expires_at": live.get("root_expires_at"),
        # What the running agent serves each version with (variant, threads, graph
        # optimisation), as of its last status write.
        "runtimes": live.get("runtimes", {}),
        "models": [
            {k: m.get(k) for k in ("name", "version", "state", "reason", "serving",
                                   "bundle_digest")}
            for m in models
        ],
    }
    if as_json:
        print_json(doc)
    else:
        print_table(
            ("field", "value"),
            [
                ("device_id", doc["device_id"]),
                ("state", doc["state"]),
                ("api_address", doc["api_address"]),
                ("api_addresses", ", ".join(doc["api_addresses"])),
                ("transport", f"{cfg.transport} {cfg.mqtt_url}".strip()
                 if cfg.transport == "mqtt" else cfg.transport),
                ("labels", ",".join(f"{k}={v}" for k, v in sorted(cfg.labels.items())) or "-"),
                ("last_heartbeat", _ts(doc["last_heartbeat"])),
                ("last_error", doc["last_error"] or "-"),
                ("certificate", f"{creds.serial} (expires {_ts(creds.not_after)})"),
                ("release_serial", doc["release_serial"] or "-"),
                ("delivery_problems", "; ".join(
                    f"{k}: {v}" for k, v in sorted(doc["delivery_problems"].items())) or "-"),
                ("root_version", doc["root_version"] or "- (keys pinned at enrollment)"),
            ],
        )
        if models:
            runtimes = doc["runtimes"] if isinstance(doc["runtimes"], dict) else {}
            print()
            print_table(("MODEL", "VERSION", "STATE", "SERVING", "RUNS ON", "REASON"), [
                (m["name"], m["version"], m["state"], "yes" if m["serving"] else "",
                 _runs_on(runtimes.get(m["name"], {}).get(str(m["version"]))),
                 m.get("reason") or "-") for m in models
            ])
    return 0


def _runs_on(facts: object) -> str:
    """``onnx model.fp32.onnx (fp32), 2 threads``: what the running agent chose, or "-"."""
    if not isinstance(facts, dict):
        return "-"
    what = f"{facts.get('kind', '?')} {facts.get('file', '')}".strip()
    if facts.get("precision"):
        what += f" ({facts['precision']})"
    if facts.get("threads"):
        what += f", {facts['threads']} thread{'s' if facts['threads'] != 1 else ''}"
    return what


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args.verbose)

    def body() -> int:
        if args.command == "enroll":
            from edge_agent.enroll import enroll  # noqa: PLC0415 (grpc: only to enroll)

            cfg = enroll(
                args.server,
                args.token,
                args.ca.read_bytes(),
                args.state_dir,
                labels=parse_label_args(args.label),
                force=args.force,
                transport=args.transport,
            )
            print(f"enrolled as {cfg.device_id}")
            return 0
        if args.command == "run":
            with asyncio.Runner(loop_factory=event_loop_factory(args.event_loop)) as runner:
                runner.run(_run(args.state_dir, args.transport, args.listen, args.grpc_listen,
                                args.http_parser))
            return 0
        return _status(args.state_dir, args.json)

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
