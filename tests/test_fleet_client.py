"""The `fleet` client stands alone: importing it loads none of the server, agent or trainer
code, nor the control plane's scheduler or MQTT client (an operator installs only the
`fleet` extra), and ``python -m fleet`` is the same command."""

from __future__ import annotations

import ast
import subprocess
import sys

SERVER_SIDE = ("control_plane", "apscheduler", "paho", "edge_agent", "trainer")


def test_importing_the_client_loads_nothing_server_side() -> None:
    code = ("import fleet.cli, sys; print(sorted(m for m in sys.modules if m.split('.')[0] in "
            f"{set(SERVER_SIDE)!r}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60, check=True)
    assert ast.literal_eval(r.stdout.strip()) == []


def test_python_dash_m_fleet_is_the_cli() -> None:
    r = subprocess.run([sys.executable, "-m", "fleet", "--help"], capture_output=True,
                       text=True, timeout=60, check=True)
    assert r.stdout.startswith("usage: fleet ")
    assert r.stdout == subprocess.run(
        [sys.executable, "-c", "from fleet.cli import main; main(['--help'])"],
        capture_output=True, text=True, timeout=60, check=False).stdout

