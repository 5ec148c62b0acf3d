"""Try to crash the MQTT broker the way one crashed in the field: repeated control-plane
restarts and broker SIGHUPs (CRL reload) while MQTT agents download bundles.

    python -m scripts.broker_stress --bundle DIR [--seconds 240] [--agents 4] [--restart-broker]

DIR is a trained, signed bundle (e.g. the demo's ``training/bundle``, or ``trainer run``'s
``WORKDIR/bundle``); it is re-signed as versions 1-6 with a throw-away control plane's
publisher key. Each round starts a rollout of another version, sends SIGHUP to Mosquitto and
restarts the control plane; the script stops at the first broker exit and prints its status.
It never crashed the broker; the cause was found by reading Mosquitto's source, and
``scripts/broker_crash.py`` reproduces it in seconds (docs/mqtt.md).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from fleet.cli import main as fleet_main
from tests.mqtt_support import start_mqtt_control_plane, wait_bridge
from tests.support import LoopThread, start_agent
from tests.test_delivery import _bundle_for


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=240.0)
    parser.add_argument("--agents", type=int, default=4)
    parser.add_argument("--restart-broker", action="store_true",
                        help="also restart the broker each round (it loads its persistence "
                             "file, then gets the SIGHUP: Mosquitto's tracker has crashes there)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="broker-stress-"))
    loop = LoopThread()
    cp = start_mqtt_control_plane(work / "cp", loop)
    config = str(cp.home / "operators/admin/fleet.toml")

    def fleet(*more: str) -> int:
        return fleet_main(["--config", config, "--api", cp.api, *more])

    for version in range(1, 7):
        fleet("models", "publish", str(_bundle_for(cp, args.bundle, work / f"v{version}",
                                                   version=version)))
    agents = []
    for i in range(args.agents):
        cp.enroll_agent(work / f"a{i}")
        agents.append(start_agent(work / f"a{i}", cp.loop, probation_seconds=0.0,
                                  transport="mqtt"))
    deadline, rounds, status, slow_bridge = time.monotonic() + args.seconds, 0, None, 0
    while time.monotonic() < deadline and status is None:
        rounds += 1
        fleet("rollouts", "start", "--model", "digits", "--version", str(1 + rounds % 6))
        time.sleep(0.3)  # agents start downloading
        if args.restart_broker:
            cp.broker.restart()
        cp.broker.reload()
        time.sleep(0.2)  # the broker reloads its CRL while they do
        cp.restart()
        try:
            wait_bridge(cp)
        except TimeoutError:
            slow_bridge += 1  # the bridge's reconnect backed off; the broker is what we watch
        status = cp.broker.proc.poll() if cp.broker.proc is not None else -1
    print(f"broker_stress: {rounds} rounds ({slow_bridge} with the bridge back after 30 s); "
          "broker "
          + ("still running" if status is None else f"exited with status {status}"),
          file=sys.stderr)
    for agent in agents:
        agent.stop()
    cp.stop()
    cp.broker.stop()
    shutil.rmtree(work, ignore_errors=True)
    return 0 if status is None else 1


if __name__ == "__main__":
    raise SystemExit(main())
