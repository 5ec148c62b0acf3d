"""Start the project's commands as child processes and wait on what they log (demo, bench)."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

BIN = Path(sys.executable).parent
DEFAULT_WAIT = 60.0


class Child:
    """A long-running command; ``expect`` blocks until a stderr line matches."""

    def __init__(self, name: str, *args: str, log: Path | None = None) -> None:
        self.name = name
        self.port = 0  # what the child listens on, once known
        self.proc = subprocess.Popen(
            [str(BIN / args[0]), *args[1:]],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._log = log.open("a") if log else None
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if self._log:
                self._log.write(line)
                self._log.flush()
            self._lines.put(line)
        self._lines.put(None)

    def expect(self, pattern: str, timeout: float = DEFAULT_WAIT) -> re.Match[str]:
        while True:
            try:
                line = self._lines.get(timeout=timeout)
            except queue.Empty:
                raise RuntimeError(f"{self.name}: no line matching {pattern!r}") from None
            if line is None:
                raise RuntimeError(f"{self.name} exited ({self.proc.wait()}) before {pattern!r}")
            m = re.search(pattern, line)
            if m:
                return m

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.proc.wait()
        return self.proc.returncode


def run(*args: str, check: bool = True, timeout: float = DEFAULT_WAIT) -> str:
    """Run a command to completion and return its stdout; raise with its stderr on failure."""
    r = subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True,
                       timeout=timeout, check=False)
    if check and r.returncode != 0:
        raise RuntimeError(f"`{' '.join(args[:3])} ...` failed: {r.stderr.strip()}")
    return r.stdout
