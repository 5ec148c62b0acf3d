"""What the `fleet` command modules share: the stub type, the timeout, value formatting."""

from __future__ import annotations

import datetime as dt
import sys
from typing import TextIO

from edgefleet.v1 import admin_pb2_grpc

__all__ = ["RPC_TIMEOUT_SECONDS", "Progress", "Stub", "labels_text", "ts"]

RPC_TIMEOUT_SECONDS = 30.0
Stub = admin_pb2_grpc.AdminServiceStub


def ts(value: float | None) -> str:
    """Unix seconds as ISO 8601 UTC, or "-" for none."""
    if not value:
        return "-"
    return dt.datetime.fromtimestamp(value, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def labels_text(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "-"


class Progress:
    """One status line on a terminal, rewritten in place (nothing when not a terminal, so
    scripts and ``--json`` output stay clean)."""

    def __init__(self, stream: TextIO | None = None, *, enabled: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self._width = 0

    def show(self, text: str) -> None:
        if self.enabled:
            self.stream.write("\r" + text.ljust(self._width))
            self.stream.flush()
            self._width = len(text)

    def bar(self, label: str, done: int, total: int, unit: float = 2**20,
            suffix: str = "MiB") -> None:
        share = done / total if total else 1.0
        filled = int(24 * share)
        self.show(f"{label} [{'#' * filled}{'.' * (24 - filled)}] "
                  f"{done / unit:.1f}/{total / unit:.1f} {suffix} ({share:.0%})")

    def done(self) -> None:
        if self.enabled and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0
