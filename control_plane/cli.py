"""`control-plane`: init a home, serve the APIs, write the MQTT broker's configuration, back
up and restore a home."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from pathlib import Path

from control_plane.config import ControlPlaneConfig, Pkcs11Settings, parse_hostport
from control_plane.ops import (  # noqa: F401  (rotate_*: each registers its rotation)
    roots_cli,
    rotate,
    rotate_ca,
    rotate_server_cert,
)
from control_plane.ops.backup import backup, restore
from control_plane.ops.home import init_home
from control_plane.ops.migrate import migrate as migrate_home
from control_plane.ops.mqtt_config import write_broker_config
from control_plane.server import ControlPlane
from control_plane.services.broker import MqttSettings
from control_plane.storage import open_store
from fleetcore import operator_config
from fleetcore.cli import run_main, setup_logging
from fleetcore.errors import InvalidInputError
from fleetcore.mqtt_wire import parse_url

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="control-plane", description="Edgefleet control plane")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    init = sub.add_parser("init", help="create a control-plane home (CA, keys, database, admin)")
    init.add_argument("--home", required=True, type=Path)
    init.add_argument("--san", action="append", default=[], metavar="NAME",
                      help="extra DNS name or IP for the server certificate (repeatable)")
    init.add_argument("--force", action="store_true", help="replace an existing home")
    init.add_argument("--root-keys", type=int, default=3, metavar="N",
                      help="root keys to make under HOME/root-keys/ (default 3; move them "
                           "offline afterwards)")
    init.add_argument("--root-threshold", type=int, default=2, metavar="K",
                      help="root keys that must sign a new root (default 2)")
    init.add_argument("--pkcs11-module", type=Path, metavar="PATH",
                      help="keep the CA and release keys in a PKCS#11 token: its library")
    init.add_argument("--pkcs11-token", metavar="LABEL", help="the token's label")
    init.add_argument("--pkcs11-pin-env", metavar="VAR",
                      help="the environment variable that holds the token's user PIN")
    init.add_argument("--pkcs11-keys", default="ca,release", metavar="NAMES",
                      help="which keys go in the token (default ca,release)")
    init.add_argument("--database", default="", metavar="URL",
                      help="postgresql://USER@HOST:PORT/DB instead of the home's SQLite file")

    serve = sub.add_parser("serve", help="serve the mTLS API and the enrollment endpoint")
    serve.add_argument("--home", required=True, type=Path)
    serve.add_argument("--api", metavar="HOST:PORT", help="mTLS API address (default from config)")
    serve.add_argument("--enroll", metavar="HOST:PORT", help="enrollment address")
    serve.add_argument("--mqtt", metavar="URL",
                       help="the fleet's MQTT broker (mqtts://HOST:PORT): the bridge connects to "
                            "it and enrollment gives it to agents (run mqtt-config first)")
    serve.add_argument("--bridge", type=int, default=1, metavar="N",
                       help="with several replicas on one broker: this replica's MQTT bridge "
                            "identity, 1..the --bridges given to mqtt-config (default 1)")
    serve.add_argument("--metrics", metavar="HOST:PORT",
                       help="serve Prometheus /metrics, /healthz and /readyz over plain HTTP "
                            "here (e.g. 127.0.0.1:9464; default from config: off)")

    mq = sub.add_parser("mqtt-config", help="write a Mosquitto configuration for the fleet")
    mq.add_argument("--home", required=True, type=Path)
    mq.add_argument("--out", required=True, type=Path, help="directory for the broker's files")
    mq.add_argument("--port", type=int, default=8883, help="TLS listener port (default 8883)")
    mq.add_argument("--bind", default="", metavar="ADDRESS",
                    help="listen on this address only (default: every address)")
    mq.add_argument("--bridges", type=int, default=1, metavar="N",
                    help="control-plane replicas that bridge to this broker: one identity each "
                         "(serve --bridge 1..N; default 1)")
    mq.add_argument("--fleet-size", type=int, default=1000, metavar="N",
                    help="devices to size the broker's queues for (default 1000)")
    mq.add_argument("--broker-dir", type=Path, metavar="DIR",
                    help="where the broker sees these files, when not at --out (a container "
                         "mount such as /mosquitto/config)")
    mq.add_argument("--data-dir", type=Path, metavar="DIR",
                    help="writable directory for the broker's persistence and pid file "
                         "(default: BROKER_DIR/data)")

    roots_cli.add_parsers(sub)

    rot = sub.add_parser("rotate", help="rotate a key or certificate beside a serving control "
                                        "plane (docs/operator-guide.md, Rotate)")
    rotate.add_parsers(rot.add_subparsers(dest="what", required=True, metavar="WHAT"))

    bk = sub.add_parser("backup", help="archive a home while it serves (database copied with "
                                       "SQLite's online backup); the archive holds every key")
    bk.add_argument("--home", required=True, type=Path)
    bk.add_argument("--out", required=True, type=Path, help="archive to write (.tar.gz, 0600)")
    rs = sub.add_parser("restore", help="unpack and check a backup into a new home")
    rs.add_argument("--archive", required=True, type=Path)
    rs.add_argument("--home", required=True, type=Path, help="a new (or empty) directory")

    mg = sub.add_parser("migrate", help="copy a stopped SQLite home's fleet into an empty "
                                        "PostgreSQL database and switch the home to it")
    mg.add_argument("--home", required=True, type=Path)
    mg.add_argument("--to", required=True, metavar="URL",
                    help="postgresql://USER@HOST:PORT/DB (an empty database)")

    return p


def _init_config(args: argparse.Namespace) -> ControlPlaneConfig | None:
    """The config `init` writes: the defaults, with [pki.pkcs11] when --pkcs11-* are given."""
    given = [args.pkcs11_module, args.pkcs11_token, args.pkcs11_pin_env]
    if not any(given):
        return None
    if not all(given):
        raise InvalidInputError("--pkcs11-module, --pkcs11-token and --pkcs11-pin-env go "
                                "together")
    cfg = ControlPlaneConfig(home=args.home)
    cfg.pkcs11 = Pkcs11Settings.parse({
        "module": str(args.pkcs11_module), "token": args.pkcs11_token,
        "pin_env": args.pkcs11_pin_env, "keys": args.pkcs11_keys.split(",")})
    return cfg


async def _serve(cfg: ControlPlaneConfig) -> None:
    cp = ControlPlane(cfg)
    await cp.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await cp.stop()


def _migrate(home: Path, url: str) -> int:
    def progress(table: str, rows: int) -> None:
        print(f"copied {table}: {rows:,} rows", flush=True)

    done = migrate_home(home, url, on_table=progress)
    print(f"migrated {sum(done.rows.values()):,} rows in {len(done.rows)} tables to {done.url}; "
          f"audit chain intact: {done.audit_entries} entries, head {done.audit_head[:16]}")
    print(f"config.toml now names {done.url}; {done.sqlite_file} is kept, unchanged, as the way "
          "back (set [server] database to its name again)")
    print(f"next: control-plane serve --home {home} (agents need nothing)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args.verbose)

    def body() -> int:  # noqa: PLR0911 - one return per command
        if args.command == "init":
            cfg = init_home(args.home, sans=args.san, force=args.force,
                            root_keys=args.root_keys, root_threshold=args.root_threshold,
                            config=_init_config(args), database_url=args.database)
            print(f"initialised {cfg.home}")
            admin = cfg.layout.operator_dir("admin") / operator_config.CONFIG_FILE
            print(f"admin client config: {admin}")
            return 0
        if args.command == "restore":
            done = restore(args.archive, args.home)
            print(f"restored {done.files} files ({done.bytes:,} bytes) into {done.path}; audit "
                  f"chain intact: {done.audit_entries} entries")
            print(f"next: control-plane serve --home {done.path} (agents need nothing)")
            return 0
        if args.command == "migrate":
            return _migrate(args.home, args.to)
        if args.command in ("rotate", "root"):
            return rotate.run(args)
        cfg = ControlPlaneConfig.load(args.home)
        if args.command == "backup":
            done = backup(cfg.home, args.out)
            print(f"wrote {done.path}: {done.files} files, {done.bytes:,} bytes, audit head "
                  f"{done.audit_head[:16]} ({done.audit_entries} entries)")
            print("it holds the CA, release and bundle keys: encrypt it and keep it offline")
            return 0
        if args.command == "mqtt-config":
            store = open_store(cfg.store_location)
            try:
                settings = write_broker_config(cfg, store, args.out, port=args.port,
                                               bind=args.bind, fleet_size=args.fleet_size,
                                               now=time.time(), broker_dir=args.broker_dir,
                                               data_dir=args.data_dir, bridges=args.bridges)
            finally:
                store.close()
            print(f"wrote {settings.conf} and, beside it, acl, ca.pem, crl.pem, server.pem, "
                  "server.key")
            print(f"run: mosquitto -c {settings.conf}")
            print(f"then: control-plane serve --home {cfg.home} --mqtt mqtts://HOST:{args.port}")
            return 0
        if args.api:
            parse_hostport(args.api)
            cfg.api_listen = args.api
        if args.enroll:
            parse_hostport(args.enroll)
            cfg.enroll_listen = args.enroll
        if args.mqtt is not None:
            parse_url(args.mqtt)
            cfg.mqtt_url = args.mqtt
        if not MqttSettings.bridge_key(cfg.home, args.bridge).exists() and args.bridge != 1:
            raise InvalidInputError(
                f"no MQTT bridge identity {args.bridge} in {cfg.home}; hint: run `control-plane "
                f"mqtt-config --bridges {args.bridge}` (one per replica) and copy the home")
        cfg.mqtt_bridge = args.bridge
        if args.metrics:
            parse_hostport(args.metrics)
            cfg.metrics_listen = args.metrics
        asyncio.run(_serve(cfg))
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
