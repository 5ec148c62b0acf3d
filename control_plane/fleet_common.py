"""What the `fleet` command modules share: the stub type, the timeout, value formatting."""

from __future__ import annotations

import datetime as dt

from edgefleet.v1 import admin_pb2_grpc

__all__ = ["RPC_TIMEOUT_SECONDS", "Stub", "labels_text", "ts"]

RPC_TIMEOUT_SECONDS = 30.0
Stub = admin_pb2_grpc.AdminServiceStub


def ts(value: float | None) -> str:
    """Unix seconds as ISO 8601 UTC, or "-" for none."""
    if not value:
        return "-"
    return dt.datetime.fromtimestamp(value, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def labels_text(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "-"
