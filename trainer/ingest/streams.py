"""Stream sources (MQTT 5, NATS JetStream): the interface trainer.ingest.follow reads.

The clients themselves are being written (issue 15); until they land, opening a stream
fails with a clear message."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from fleetcore.errors import InvalidInputError
from trainer.ingest.urls import redact

__all__ = ["StreamMessage", "StreamSource", "open_stream"]


@dataclass(frozen=True)
class StreamMessage:
    payload: bytes
    position: int | None
    redelivered: bool
    token: Any = field(default=None, repr=False, compare=False)


class StreamSource(Protocol):
    url: str

    def open(self) -> None: ...

    def fetch(self, max_messages: int, timeout_s: float) -> list[StreamMessage]: ...

    def ack(self, messages: Sequence[StreamMessage]) -> None: ...

    def close(self) -> None: ...


def open_stream(url: str, *, name: str, settings: Mapping[str, Any]) -> StreamSource:
    raise InvalidInputError(f"data source {redact(url)}: stream clients are not available yet")
