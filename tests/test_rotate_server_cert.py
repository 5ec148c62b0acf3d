"""`control-plane rotate server-cert`: the serving control plane and the MQTT broker present a
new server certificate without a restart, and live agents keep heartbeating."""

from __future__ import annotations

import json
import socket
import ssl
from pathlib import Path

import pytest
from cryptography import x509

from control_plane.cli import main as cp_main
from control_plane.ops.rotate_server_cert import server_names
from edge_agent.state import StateDir
from fleetcore import pki
from tests.support import WAIT, RunningControlPlane, start_agent


def served_serial(host: str, port: int, ca_pem: bytes, state: StateDir | None = None) -> str:
    """The serial of the certificate a new TLS handshake sees (verified against ``ca_pem``)."""
    ctx = ssl.create_default_context(cadata=ca_pem.decode())
    ctx.set_alpn_protocols(["h2"])
    if state is not None:
        ctx.load_cert_chain(state.cert, state.key)
    with socket.create_connection((host, port), timeout=WAIT) as raw, \
            ctx.wrap_socket(raw, server_hostname=host) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return pki.serial_hex(x509.load_der_x509_certificate(der))


def _ports(cp: RunningControlPlane) -> dict[str, int]:
    ports = {"api": cp.cp.api_port, "enroll": cp.cp.enroll_port}
    if cp.cp.mqtt is not None:
        ports["mqtt"] = cp.cp.mqtt.port
    return ports


def _serials(cp: RunningControlPlane, state: StateDir) -> dict[str, str]:
    return {name: served_serial("127.0.0.1", port, cp.ca_pem, state)
            for name, port in _ports(cp).items()}


def test_a_rotated_server_certificate_is_served_to_new_connections_while_agents_keep_working(
    cp_any: RunningControlPlane, tmp_path: Path
) -> None:
    cp = cp_any
    cp.enroll_agent(tmp_path / "a")
    state = StateDir(tmp_path / "a")
    agent = start_agent(state.root, cp.loop, transport=cp.transport)
    try:
        agent.wait_for("heartbeat")
        before = _serials(cp, state)
        old_serial = pki.serial_hex(pki.load_certificate(cp.cp.authority.server_cert_pem))
        assert set(before.values()) == {old_serial}
        old_key = cp.cp.config.layout.server_key.read_bytes()
        mark = len(cp.broker.log) if cp.broker is not None else 0

        assert cp_main(["rotate", "server-cert", "--home", str(cp.home),
                        "--san", "fleet.example.com"]) == 0
        cp.loop.run(cp.cp._reload_keys())  # what KeyWatch does within a second
        if cp.broker is not None:
            cp.broker.wait_for_log("Reloading config", after=mark)

        new = pki.load_certificate(cp.cp.authority.server_cert_pem)
        new_serial = pki.serial_hex(new)
        assert new_serial != old_serial
        assert _serials(cp, state) == dict.fromkeys(before, new_serial)
        assert server_names(new) == ["localhost", "127.0.0.1", "fleet.example.com"]
        # The agents' open connections (or their reconnections) carry on.
        for _ in range(2):
            agent.wait_for("heartbeat")
    finally:
        agent.stop()

    # The old key is gone from the home and from the broker's files.
    homes = [cp.home] + ([cp.cp.mqtt.out] if cp.cp.mqtt is not None else [])
    for folder in homes:
        for path in folder.rglob("*"):
            if path.is_file():
                assert old_key not in path.read_bytes(), path
    entry = next(e for e in cp.cp.store.list_audit(50)
                 if e.action == "keys.rotate-server-cert")
    detail = json.loads(entry.detail)
    assert (detail["old_serial"], detail["serial"]) == (old_serial, new_serial)


def test_rotate_server_cert_on_a_home_that_is_not_one_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cp_main(["rotate", "server-cert", "--home", str(tmp_path / "none")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
