"""Run Mosquitto with the configuration that `control-plane mqtt-config` wrote (demo, tests).

``start_mosquitto(settings)`` starts ``mosquitto -c OUT/mosquitto.conf`` and returns once the
broker says it is running (it reads the broker's log, it does not poll the port). In production
the broker runs under its own service manager with the same files.
"""

from __future__ import annotations

import collections
import logging
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

from control_plane.config import ControlPlaneConfig
from control_plane.ops.mqtt_config import write_broker_config
from control_plane.services.broker import MqttSettings
from control_plane.storage import open_store

__all__ = [
    "Mosquitto",
    "find_mosquitto",
    "said",
    "start_fleet_broker",
    "start_mosquitto",
    "start_plain_mosquitto",
]

log = logging.getLogger(__name__)

START_TIMEOUT_SECONDS = 20.0
_CANDIDATES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto")


def find_mosquitto() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    return next((c for c in _CANDIDATES if Path(c).exists()), None)


class Mosquitto:
    """One broker process; ``restart`` starts it again on the same files (and port)."""

    def __init__(self, settings: MqttSettings, binary: str) -> None:
        self.settings = settings
        self.binary = binary
        self.log: collections.deque[str] = collections.deque(maxlen=2000)
        self._lines = threading.Condition()
        self.proc: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        return f"mqtts://127.0.0.1:{self.settings.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> Mosquitto:
        proc = subprocess.Popen([self.binary, "-c", str(self.settings.conf)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        self.proc = proc
        started = threading.Event()

        def pump() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                with self._lines:
                    self.log.append(line.rstrip())
                    self._lines.notify_all()
                if " running" in line:
                    started.set()
            started.set()  # it exited: start() looks at the return code

        threading.Thread(target=pump, name="mosquitto-log", daemon=True).start()
        if not started.wait(START_TIMEOUT_SECONDS) or proc.poll() is not None:
            self.stop()
            raise RuntimeError("mosquitto did not start:\n" + "\n".join(self.log))
        log.info("mosquitto %d listening on port %d", proc.pid, self.settings.port)
        return self

    def wait_for_log(self, text: str, timeout: float = START_TIMEOUT_SECONDS,
                     after: int = 0) -> str:
        """Block until a log line (from line number ``after`` on) contains ``text``."""
        with self._lines:
            found: list[str] = []

            def seen() -> bool:
                found[:] = [line for line in list(self.log)[after:] if text in line]
                return bool(found)

            if not self._lines.wait_for(seen, timeout):
                raise TimeoutError(f"mosquitto never logged {text!r}")
            return found[0]

    def reload(self) -> None:
        """SIGHUP: Mosquitto reads its configuration, ACL and CRL again."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        """A clean stop (SIGTERM): Mosquitto saves its persistence file first."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(START_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def kill(self) -> None:
        """SIGKILL: a crash. What Mosquitto held in memory since its last autosave is gone."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()


def start_mosquitto(settings: MqttSettings, binary: str | None = None) -> Mosquitto:
    """Start Mosquitto on ``settings``' files; raise if it is not installed or fails."""
    found = binary or find_mosquitto()
    if found is None:
        raise RuntimeError("mosquitto is not installed (apt-get install mosquitto)")
    return Mosquitto(settings, found).start()


def start_plain_mosquitto(conf_dir: Path, port: int, *,
                          max_inflight: int = 100) -> subprocess.Popen[str]:
    """An anonymous Mosquitto on plain TCP at 127.0.0.1:``port`` (the MQTT client's own tests
    and ``bench_mqtt --client``: no fleet, no TLS), returned once it says it is running; its
    log is drained so that a full pipe cannot stop it. Terminate it when done."""
    found = find_mosquitto()
    if found is None:
        raise RuntimeError("mosquitto is not installed (apt-get install mosquitto)")
    conf = conf_dir / "plain-mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n"
                    f"max_inflight_messages {max_inflight}\nset_tcp_nodelay true\n")
    proc = subprocess.Popen([found, "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    return said(proc, "running", "mosquitto")


def said(proc: subprocess.Popen[str], text: str, what: str) -> subprocess.Popen[str]:
    """``proc`` once a line of its stderr (a pipe, text mode) holds ``text``; its log is then
    drained in a thread, so that a full pipe cannot stop it. Raises if it exits first."""
    assert proc.stderr is not None
    for line in proc.stderr:
        if text in line:
            break
    else:
        raise RuntimeError(f"{what} did not say {text!r} (exit {proc.wait()})")
    threading.Thread(target=proc.stderr.read, daemon=True).start()
    return proc


def start_fleet_broker(home: Path, out: Path, port: int, *, bind: str = "127.0.0.1",
                       fleet_size: int = 0) -> Mosquitto:
    """`control-plane mqtt-config` for the home, then Mosquitto on it (for the demo).

    Start the control plane afterwards with ``--mqtt`` set to the returned broker's ``url``
    (``mqtts://127.0.0.1:PORT``) so that its bridge connects and enrollment hands agents the URL.
    """
    cfg = ControlPlaneConfig.load(home)
    store = open_store(cfg.store_location)
    try:
        settings = write_broker_config(cfg, store, out, port=port, bind=bind,
                                       fleet_size=fleet_size, now=time.time())
    finally:
        store.close()
    return start_mosquitto(settings)
