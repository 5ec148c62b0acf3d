"""The commands as the README gives them, as subprocesses: init, serve, tokens, enroll, run."""

from __future__ import annotations

import io
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from fleet.common import Progress
from tests.support import WAIT

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


class Proc:
    """A long-running command whose stderr lines can be awaited."""

    def __init__(self, *args: str) -> None:
        self.p = subprocess.Popen(
            [str(BIN / args[0]), *args[1:]], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.p.stderr is not None
        for line in self.p.stderr:
            self.lines.put(line)

    def expect(self, pattern: str) -> re.Match[str]:
        while True:
            try:
                line = self.lines.get(timeout=WAIT)
            except queue.Empty:
                raise AssertionError(f"never saw {pattern!r}; saw {self.seen}") from None
            self.seen.append(line)
            m = re.search(pattern, line)
            if m:
                return m

    def terminate(self) -> int:
        self.p.send_signal(signal.SIGTERM)
        return self.p.wait(WAIT)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True,
                          timeout=WAIT, check=False)


def test_commands_end_to_end(tmp_path: Path) -> None:
    home = tmp_path / "cp"
    assert run("control-plane", "init", "--home", str(home)).returncode == 0
    again = run("control-plane", "init", "--home", str(home))
    assert again.returncode != 0
    assert again.stderr.strip().count("\n") == 0 and "--force" in again.stderr
    config = home / "config.toml"  # heartbeat every second so revocation shows quickly
    config.write_text(config.read_text().replace("heartbeat_interval_seconds = 10",
                                                 "heartbeat_interval_seconds = 1"))

    server = Proc("control-plane", "serve", "--home", str(home),
                  "--api", "127.0.0.1:0", "--enroll", "127.0.0.1:0")
    try:
        api = server.expect(r"api \(mTLS\) listening on (\S+)").group(1)
        enroll_addr = server.expect(r"enrollment .* listening on (\S+)").group(1)
        fleet = ("fleet", "--config", str(home / "operators/admin/fleet.toml"), "--api", api)

        tok = run(*fleet, "tokens", "create", "--label", "site=berlin", "--ttl", "600")
        assert tok.returncode == 0, tok.stderr
        token = tok.stdout.strip()
        assert re.fullmatch(r"eft_[A-Za-z0-9_-]{43}", token)

        state = tmp_path / "agent"
        enrolled = run("edge-agent", "enroll", "--server", enroll_addr, "--token", token,
                       "--ca", str(home / "pki/ca.pem"), "--state-dir", str(state),
                       "--label", "tier=canary")
        assert enrolled.returncode == 0, enrolled.stderr
        device_id = enrolled.stdout.split()[-1]

        reuse = run("edge-agent", "enroll", "--server", enroll_addr, "--token", token,
                    "--ca", str(home / "pki/ca.pem"), "--state-dir", str(tmp_path / "other"))
        assert reuse.returncode != 0
        assert "already been used" in reuse.stderr

        agent = Proc("edge-agent", "run", "--state-dir", str(state), "--listen", "127.0.0.1:0",
                     "--grpc-listen", "127.0.0.1:0")
        try:
            agent.expect(r"connected to control plane")
            listed = run(*fleet, "devices", "list", "--json")
            assert listed.returncode == 0, listed.stderr
            devices = json.loads(listed.stdout)
            assert [(d["id"], d["status"], d["labels"]) for d in devices] == [
                (device_id, "online", {"site": "berlin", "tier": "canary"})
            ]
            table = run(*fleet, "devices", "list")
            assert device_id in table.stdout and "online" in table.stdout

            status = run("edge-agent", "status", "--state-dir", str(state), "--json")
            assert json.loads(status.stdout)["state"] == "connected"

            missing = run(*fleet, "devices", "show", "dev-nope", "--json")
            assert missing.returncode != 0 and missing.stdout == ""
            assert missing.stderr.startswith("error: NOT_FOUND")

            revoked = run(*fleet, "devices", "revoke", device_id, "--json")
            assert json.loads(revoked.stdout)["status"] == "revoked"
            agent.expect(r"refused")
        finally:
            assert agent.terminate() == 0
        audit = json.loads(run(*fleet, "audit", "list", "--json").stdout)
        assert [(e["action"], e["outcome"]) for e in audit][-4:] == [
            ("tokens.create", "allowed"),
            ("devices.enroll", "allowed"),
            ("devices.enroll", "denied"),  # the reused token
            ("devices.revoke", "allowed"),
        ]
    finally:
        assert server.terminate() == 0
    server.expect(r"control plane stopped")


def test_fleet_without_config_fails_with_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "FLEET_CONFIG"}
    r = subprocess.run([str(BIN / "fleet"), "devices", "list"], capture_output=True, text=True,
                       env=env, timeout=WAIT, check=False)
    assert r.returncode == 1
    assert r.stderr.strip() == "error: no client config: pass --config FILE or set $FLEET_CONFIG"


def test_progress_draws_on_a_terminal_and_stays_silent_otherwise() -> None:
    shown = io.StringIO()
    bar = Progress(shown, enabled=True)
    bar.bar("uploading bundle", 3 * 2**20, 4 * 2**20)
    assert "uploading bundle [" in shown.getvalue() and "3.0/4.0 MiB (75%)" in shown.getvalue()
    bar.done()
    assert shown.getvalue().endswith("\r")
    quiet = io.StringIO()  # not a terminal: scripts and --json output stay clean
    Progress(quiet).bar("uploading bundle", 1, 2)
    assert quiet.getvalue() == ""
