"""Reproduce the Mosquitto 2.0.11 crash seen in the field, and show that our sessions avoid it.

    python -m scripts.broker_crash [--sessions persistent|ours] [--returns persistent|ours]
        [--restart-first [--drop-persistence]] [--valgrind] [--rounds N]

Each round starts a broker with the configuration `control-plane mqtt-config` writes, then:

1. a client whose identity is its certificate (``use_identity_as_username``) connects with a
   persistent session (MQTT 5 session expiry > 0) and disconnects: the broker keeps its
   session and puts it on its session-expiry list;
2. the broker reloads (SIGHUP: what the control plane sends after rewriting the CRL, and what
   logrotate or ``systemctl reload`` send). The reload checks every client of a listener with
   ``use_identity_as_username`` for a TLS connection; an offline one has none, so it is
   disconnected again (the log shows ``Client X disconnected.`` right after ``Reloading
   config.``) and goes on the expiry list a second time;
3. the client comes back: the broker frees its old session, and takes only one of the two list
   entries off: the other points at freed memory (648 bytes in Debian 12's build);
4. the next message payload of that size (632-647 bytes) reuses the memory, and the broker's
   once-a-second expiry check reads it as a client whose session expired: SIGSEGV (the kernel
   logs ``mosquitto[PID]: segfault at ...``, in libc.so.6 or in mosquitto). This script's
   payloads are 0xff bytes, which makes it immediate; any allocation of that size whose bytes
   read as a past expiry time can do it (which one did in the field is not known).

``--valgrind`` runs each broker under valgrind, which reports the reads of freed memory
after step 3 (``Invalid read ... inside a block of size 648 free'd``; the crash itself needs
the memory reused, which valgrind holds back).

``--restart-first`` restarts the broker after step 1 and reloads it twice: a session restored
from the persistence file is disconnected by every reload too (it fails the username/password
check, having no TLS listener), so two reloads list it twice, and its client coming back, even
with a clean start (``--returns ours``), frees it: the same crash. That is the case of
sessions left in a broker by agents older than the clean sessions; ``--drop-persistence``
deletes the persistence file during the restart (the upgrade step in docs/mqtt.md).

``--sessions ours`` runs the same steps with the sessions the agent and the bridge use
(``fleetcore.mqtt_wire.CLEAN_START``, ``SESSION_EXPIRY_SECONDS``): the broker keeps no
offline session, step 2 finds nothing, and the broker lives. Exit status: 1 if any round's
broker died, else 0.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from control_plane.config import ControlPlaneConfig
from control_plane.ops.home import init_home
from control_plane.ops.mqtt_config import write_broker_config
from control_plane.services.broker import BRIDGE_NAME, MqttSettings
from control_plane.storage import open_store
from fleetcore.mqtt_wire import CLEAN_START, DEVICE_PREFIX, SESSION_EXPIRY_SECONDS
from scripts.broker import Mosquitto, find_mosquitto, start_mosquitto
from tests.mqtt_support import free_port

__all__ = ["Outcome", "mosquitto_version", "reload_with_offline_session", "start_broker"]

WAIT_SECONDS = 20.0
# The broker checks session expiry once a second: a broker that outlives three checks after
# the payloads arrived has read the memory they reused and survived it.
EXPIRY_CHECKS_SECONDS = 3.0
PERSISTENT_SESSION_SECONDS = 7 * 24 * 3600  # what agents and the bridge used before
# Payload sizes whose buffers come from the same allocator bin as a freed 648-byte session.
PAYLOAD_SIZES = range(632, 648)


@dataclass(frozen=True)
class Outcome:
    offline_session_disconnected: bool  # the reload "disconnected" a client that was away
    status: int | None  # the broker's exit status (-11: SIGSEGV), None: still running


def mosquitto_version(binary: str) -> str:
    """``2.0.11`` from ``mosquitto -h``'s first line (empty when it says something else)."""
    out = subprocess.run([binary, "-h"], capture_output=True, text=True, timeout=WAIT_SECONDS,
                         check=False)
    words = (out.stdout or out.stderr).split()
    return words[2] if words[:2] == ["mosquitto", "version"] and len(words) > 2 else ""


def start_broker(work: Path, binary: str | None = None) -> tuple[Mosquitto, Path]:
    """A fleet home and Mosquitto on the configuration `mqtt-config` writes for it."""
    home, port = work / "home", free_port()
    cfg = init_home(home, config=ControlPlaneConfig(
        home=home, api_listen="127.0.0.1:0", enroll_listen="127.0.0.1:0",
        mqtt_url=f"mqtts://127.0.0.1:{port}"))
    store = open_store(cfg.store_location)
    try:
        settings = write_broker_config(cfg, store, work / "broker", port=port, bind="127.0.0.1",
                                       fleet_size=1, now=time.time())
    finally:
        store.close()
    return start_mosquitto(settings, binary), home


def _connect(settings: MqttSettings, home: Path, *, persistent: bool) -> mqtt.Client:
    """The bridge's certificate (any certificate-identified client does); wait for CONNACK."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(settings.ca))
    ctx.load_cert_chain(settings.bridge_cert(home), settings.bridge_key(home))
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=BRIDGE_NAME,
                         protocol=mqtt.MQTTv5, reconnect_on_failure=False)
    client.tls_set_context(ctx)
    up = threading.Event()
    client.on_connect = lambda *_: up.set()
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = PERSISTENT_SESSION_SECONDS if persistent else \
        SESSION_EXPIRY_SECONDS
    client.connect("127.0.0.1", settings.port, clean_start=False if persistent else CLEAN_START,
                   properties=props)
    client.loop_start()
    if not up.wait(WAIT_SECONDS):
        client.loop_stop()
        raise TimeoutError("no CONNACK from the broker")
    return client


def _close(client: mqtt.Client) -> None:
    client.disconnect()
    client.loop_stop()


def _reload(broker: Mosquitto, *, wait_until_done: bool) -> None:
    """SIGHUP; ``wait_until_done`` before another one (a signal during a reload is lost)."""
    mark = len(broker.log)
    broker.reload()
    broker.wait_for_log("Reloading config", after=mark)
    if wait_until_done:
        # A connection is logged by a later turn of the broker's loop than the reload; it is
        # gone before the caller goes on, so that it does not take the freed session's place.
        with socket.create_connection(("127.0.0.1", broker.settings.port), WAIT_SECONDS):
            broker.wait_for_log("New connection from", after=mark)
        broker.wait_for_log("Client <unknown> disconnected", after=mark)


def reload_with_offline_session(broker: Mosquitto, home: Path, *, persistent: bool,
                                returns_persistent: bool | None = None,
                                restart_first: bool = False,
                                drop_persistence: bool = False) -> Outcome:
    """Steps 1-4 of the module's docstring against a running broker.

    ``returns_persistent``: how the client comes back (default: as it left).
    ``restart_first``: restart the broker once the client has left, then reload twice: the
    session comes back from the persistence file, and the first reload puts it on the expiry
    list, the second a second time (the case of sessions left by older agents).
    ``drop_persistence``: delete the broker's persistence file during that restart (the upgrade
    step in docs/mqtt.md).
    """
    assert broker.proc is not None
    offline = f"Client {BRIDGE_NAME} disconnected."
    back_persistent = persistent if returns_persistent is None else returns_persistent
    mark = len(broker.log)
    _close(_connect(broker.settings, home, persistent=persistent))
    broker.wait_for_log(offline, after=mark)
    if restart_first:
        broker.stop()
        if drop_persistence:
            (broker.settings.out / "data" / "mosquitto.db").unlink()
        broker.start()
    mark = len(broker.log)
    if restart_first:
        _reload(broker, wait_until_done=True)
    _reload(broker, wait_until_done=False)
    client = _connect(broker.settings, home, persistent=back_persistent)
    try:
        # The reloads' own lines come before the broker's answer to this connection.
        broker.wait_for_log(f"as {BRIDGE_NAME} ", after=mark)
        lines = list(broker.log)[mark:]
        back = next(i for i, line in enumerate(lines) if f"as {BRIDGE_NAME} " in line)
        twice = any(offline in line for line in lines[:back])
        for size in PAYLOAD_SIZES:
            client.publish(f"{DEVICE_PREFIX}/crash-probe/telemetry", b"\xff" * size, qos=1)
        try:
            status: int | None = broker.proc.wait(EXPIRY_CHECKS_SECONDS)
        except subprocess.TimeoutExpired:
            status = None
    finally:
        _close(client)
    return Outcome(offline_session_disconnected=twice, status=status)


def _under_valgrind(work: Path, binary: str) -> str:
    wrapper = work / "mosquitto-valgrind"
    wrapper.write_text(f'#!/bin/sh\nexec valgrind -q --log-file={work}/valgrind.log '
                       f'{binary} "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


def _print_valgrind(log: Path) -> None:
    """Each report's first frame and what the address was."""
    lines = [line.partition(" ")[2] for line in log.read_text().splitlines()] \
        if log.exists() else []
    for i, line in enumerate(lines):
        if line.startswith("Invalid "):
            where = next((x for x in lines[i + 1:i + 3] if " at " in x), "").strip()
            block = next((x for x in lines[i + 1:i + 12] if "block of size" in x), "").strip()
            print(f"valgrind: {line} {where}; {block}", file=sys.stderr)
    if not any(line.startswith("Invalid ") for line in lines):
        print("valgrind: no invalid access reported", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", choices=("persistent", "ours"), default="persistent",
                        help="how the client connects (persistent: as agents did before)")
    parser.add_argument("--returns", choices=("persistent", "ours"),
                        help="how the client comes back (default: as --sessions)")
    parser.add_argument("--restart-first", action="store_true",
                        help="restart the broker after the client left, then reload twice")
    parser.add_argument("--drop-persistence", action="store_true",
                        help="with --restart-first: delete mosquitto.db during the restart")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--valgrind", action="store_true",
                        help="run the broker under valgrind and print what it reports")
    args = parser.parse_args(argv)
    binary = find_mosquitto()
    if binary is None:
        print("error: mosquitto is not installed (hint: apt-get install mosquitto)",
              file=sys.stderr)
        return 2
    if args.valgrind and shutil.which("valgrind") is None:
        print("error: valgrind is not installed (hint: apt-get install valgrind)", file=sys.stderr)
        return 2
    if args.drop_persistence and not args.restart_first:
        print("error: --drop-persistence needs --restart-first", file=sys.stderr)
        return 2
    if args.rounds < 1:
        print("error: --rounds must be at least 1", file=sys.stderr)
        return 2
    died = twice = 0
    for _ in range(args.rounds):
        work = Path(tempfile.mkdtemp(prefix="broker-crash-"))
        broker, home = start_broker(work, _under_valgrind(work, binary) if args.valgrind
                                    else binary)
        try:
            outcome = reload_with_offline_session(
                broker, home, persistent=args.sessions == "persistent",
                returns_persistent=None if args.returns is None
                else args.returns == "persistent", restart_first=args.restart_first,
                drop_persistence=args.drop_persistence)
        finally:
            broker.stop()
            if args.valgrind:
                _print_valgrind(work / "valgrind.log")
            shutil.rmtree(work, ignore_errors=True)
        twice += outcome.offline_session_disconnected
        died += outcome.status is not None
        if outcome.status is not None:
            name = (signal.Signals(-outcome.status).name if outcome.status < 0
                    else f"status {outcome.status}")
            print(f"broker_crash: the broker died ({name})", file=sys.stderr)
    how = f"{args.sessions} sessions" + (f", back as {args.returns}" if args.returns else "") \
        + (", broker restarted first" if args.restart_first else "") \
        + (" without its persistence file" if args.drop_persistence else "")
    print(f"broker_crash: mosquitto {mosquitto_version(binary)}, {how}: "
          f"{args.rounds} rounds, the reload disconnected the offline session in {twice}, "
          f"the broker died in {died}", file=sys.stderr)
    return 1 if died else 0


if __name__ == "__main__":
    raise SystemExit(main())
