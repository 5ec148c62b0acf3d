"""The agent's HTTP/1.1 connection protocols: uvicorn's, with the limits a hostile client needs.

Two parsers, the same guarantees (docs/serving.md, "Limits"):

* ``GuardedHttpTools``: uvicorn's httptools protocol (llhttp, in C), used when ``httptools``
  is importable (the ``agent`` extra installs it where a wheel exists). llhttp has no limit on
  a request's head, so the protocol counts it: the bytes received while a head is incomplete,
  and the URL and headers of a complete one; past ``MAX_HEADER_BYTES`` either way the client
  gets a 431 and the connection closes.
* ``GuardedH11``: uvicorn's h11 protocol (pure Python), the fallback. h11 checks its size limit
  only while a head is incomplete (a whole head arriving in one read of up to 256 KiB would
  pass), so it checks a whole head too.

Both add what uvicorn lacks, deadlines for reading a request (``_Deadlines``): one timer per
connection, armed for the head when the connection opens and when the first byte of a later
request arrives (uvicorn's keep-alive timer covers the idle time between requests), re-armed
for the body once the head is in, disarmed once the whole request is. Past either deadline the
client gets a 408 (or, when its answer has started, a closed connection).
``head_timeout_s`` and ``body_timeout_s`` are set per server (``protocol_class``).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
from typing import Any, Literal

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from edge_agent.serving.limits import BODY_TIMEOUT_S, HEADER_TIMEOUT_S, MAX_HEADER_BYTES

__all__ = ["HTTPTOOLS", "GuardedH11", "Parser", "parser_available", "protocol_class"]

Parser = Literal["httptools", "h11"]
HTTPTOOLS = importlib.util.find_spec("httptools") is not None


def parser_available(parser: str) -> bool:
    return parser == "h11" or (parser == "httptools" and HTTPTOOLS)


class _Deadlines:
    """The deadline timer and the direct refusal, shared by both protocols."""

    head_timeout_s = HEADER_TIMEOUT_S
    body_timeout_s = BODY_TIMEOUT_S
    _deadline: asyncio.TimerHandle | None = None
    _due = 0.0  # loop time the armed phase must be over by
    _reading: str = ""  # "head", "body" or "" (nothing armed)
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    cycle: Any

    def _arm(self, reading: str) -> None:
        """Arm the deadline for ``reading`` ("" disarms). One timer at most per connection,
        rescheduled only when it would fire too late: a request's three phases cost no timer
        operations in the common case (a loop's call_later and cancel were measurable)."""
        self._reading = reading
        if not reading:
            return  # a pending timer finds nothing to do when it fires
        delay = self.head_timeout_s if reading == "head" else self.body_timeout_s
        self._due = self.loop.time() + delay
        if self._deadline is not None:
            if self._deadline.when() <= self._due:
                return  # fires first and reschedules (``_check``)
            self._deadline.cancel()
        self._deadline = self.loop.call_at(self._due, self._check)

    def _disarm(self) -> None:
        self._reading = ""
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _check(self) -> None:
        self._deadline = None
        if not self._reading:
            return
        if self.loop.time() < self._due:
            self._deadline = self.loop.call_at(self._due, self._check)
            return
        self._expired()

    def _expired(self) -> None:
        reading, self._reading = self._reading, ""
        if self.transport.is_closing():
            return
        if reading == "head" or self.cycle is None or not self.cycle.response_started:
            limit = self.head_timeout_s if reading == "head" else self.body_timeout_s
            self._refuse(408, b"Request Timeout",
                         f"the request's {reading} did not arrive within {limit:g} s")
        self.transport.close()  # an ASGI app waiting for the body sees a disconnect

    def _refuse(self, status: int, reason: bytes, message: str) -> None:
        """Answer ``status`` with the one-line error body and close: written directly, since
        the parser has no request to answer yet (or is in the middle of its body)."""
        body = json.dumps({"error": message}, separators=(",", ":")).encode()
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                             % (status, reason, len(body), body))
        self.transport.close()

    def _refuse_head(self) -> None:
        self._refuse(431, b"Request Header Fields Too Large",
                     f"the request line and headers are over {MAX_HEADER_BYTES} bytes")


class GuardedH11(_Deadlines, H11Protocol):
    """uvicorn's h11 protocol with the whole-head limit and the deadlines (module rules)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm("head")

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE and self._head_too_large(data):
            return
        super().data_received(data)
        self._follow()

    def _head_too_large(self, data: bytes) -> bool:
        """Measured over what h11 holds plus ``data``: a whole head in one read counts."""
        held = self.conn.trailing_data[0]
        head = held + data if held else data
        if len(head) <= MAX_HEADER_BYTES:
            return False
        if 0 <= head.find(b"\r\n\r\n", 0, MAX_HEADER_BYTES + 4) <= MAX_HEADER_BYTES:
            return False
        self._refuse_head()
        return True

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _follow(self) -> None:
        state = self.conn.their_state
        if state is h11.IDLE:
            if self.conn.trailing_data[0]:  # part of a head is in: its deadline runs
                if self._reading != "head":
                    self._arm("head")
            elif self.timeout_keep_alive_task is not None:
                self._arm("")  # idle between requests: uvicorn's keep-alive timer counts
            # else a new connection that sent nothing yet: the head deadline runs
        elif state is h11.SEND_BODY:
            if self._reading != "body":
                self._arm("body")
        else:
            self._arm("")


class _Refused(Exception):
    """Raised from a parser callback to stop llhttp once the connection was refused."""


def _httptools_protocol() -> type[Any]:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol  # noqa: PLC0415

    class GuardedHttpTools(_Deadlines, HttpToolsProtocol):
        """uvicorn's httptools protocol with the head limit and the deadlines (module rules).

        ``_head_open``: a head has started (or the connection is new) and is not complete;
        ``_head_bytes``: what arrived since it started, while it is open (an upper bound of
        the head: a read may carry the body too, so the limit is checked on it only while the
        head is still incomplete after the read); ``_head_size``: the URL and headers llhttp
        handed over, checked when the head completes.
        """

        _head_open = True
        _head_bytes = 0
        _head_size = 0
        _refused = False

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm("head")

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            if self._head_open:
                self._head_bytes += len(data)
            super().data_received(data)  # a callback's _Refused lands in send_400_response
            if self._head_open and self._head_bytes > MAX_HEADER_BYTES and not self._refused:
                self._refused = True
                self._disarm()
                self._refuse_head()

        def send_400_response(self, msg: str) -> None:
            if not self._refused:  # else the refusal was written already
                super().send_400_response(msg)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if not self._head_open:  # a later request's first byte
                self._head_open, self._head_bytes = True, 0
            self._head_size = 0
            if self._reading != "head":
                self._arm("head")

        def on_url(self, url: bytes) -> None:
            self._count(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count(len(name) + len(value) + 4)
            super().on_header(name, value)

        def _count(self, size: int) -> None:
            self._head_size += size
            if self._head_size > MAX_HEADER_BYTES:
                self._refused = True
                self._disarm()
                self._refuse_head()
                raise _Refused

        def on_headers_complete(self) -> None:
            self._head_open = False
            super().on_headers_complete()
            self._arm("body")

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._arm("")

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return GuardedHttpTools


def protocol_class(parser: Parser, head_timeout_s: float, body_timeout_s: float) -> type[Any]:
    """The protocol class for uvicorn's ``http`` setting, with this server's deadlines."""
    base = _httptools_protocol() if parser == "httptools" else GuardedH11
    return type(f"{base.__name__}Server", (base,), {"head_timeout_s": head_timeout_s,
                                                     "body_timeout_s": body_timeout_s})
