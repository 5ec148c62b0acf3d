"""The agent's HTTP stack on each parser and event loop it may run on (issue 19): httptools or
h11, uvloop or asyncio's loop. The same guarantees hold on all four: answers, pipelining, the
head limit (whole or growing), the head and body deadlines, the body limit; and where the fast
parts are not installed the agent falls back to h11 and asyncio (and says so when asked for
them by name).
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import uvloop

from edge_agent.cli import event_loop_factory
from edge_agent.serving import ServingCore, http_protocols, start_http
from edge_agent.serving.http import HttpServer, choose_parser
from edge_agent.serving.limits import MAX_HEADER_BYTES
from fleetcore.errors import InvalidInputError
from tests.support import WAIT

T = TypeVar("T")
SHORT_S = 0.5
INFER = b"/v2/models/digits/infer"


class _Loop:
    def __init__(self, factory: Callable[[], asyncio.AbstractEventLoop]) -> None:
        self.loop = factory()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(WAIT)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT)
        self.loop.close()


@pytest.fixture(scope="module")
def core(trained_bundle: Path) -> Iterator[ServingCore]:
    manifest = json.loads((trained_bundle / "manifest.json").read_text())
    core = ServingCore()
    core.set_model("digits", [(manifest["version"], 1.0, False)],
                   {manifest["version"]: trained_bundle})
    yield core
    core.close()


STACKS = [(p, lp) for p in ("httptools", "h11") for lp in ("uvloop", "asyncio")]


@pytest.fixture(params=STACKS, ids=[f"{p}-{lp}" for p, lp in STACKS])
def port(request: pytest.FixtureRequest, core: ServingCore) -> Iterator[int]:
    parser, loop_name = request.param
    loop = _Loop(uvloop.new_event_loop if loop_name == "uvloop" else asyncio.new_event_loop)

    async def up() -> tuple[HttpServer, int]:
        return await start_http(core, "127.0.0.1", 0, parser=parser, header_timeout_s=SHORT_S,
                                body_timeout_s=SHORT_S)

    server, bound = loop.run(up())
    assert server.parser == parser
    assert type(loop.loop).__module__.split(".")[0] == loop_name
    yield bound
    loop.run(server.stop())
    loop.close()


def _infer_request(rows: int = 1, *, binary: bool = False) -> bytes:
    x = np.full((rows, 64), 3.0, np.float32)
    if binary:
        data = x.astype("<f4").tobytes()
        head = json.dumps({"inputs": [{"name": "input", "shape": [rows, 64], "datatype": "FP32",
                                       "parameters": {"binary_data_size": len(data)}}]}).encode()
        return (b"POST %s HTTP/1.1\r\nhost: a\r\ninference-header-content-length: %d\r\n"
                b"content-length: %d\r\n\r\n" % (INFER, len(head), len(head) + len(data))
                + head + data)
    body = json.dumps({"inputs": [{"name": "input", "shape": [rows, 64], "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()
    return (b"POST %s HTTP/1.1\r\nhost: a\r\ncontent-length: %d\r\n\r\n" % (INFER, len(body))
            + body)


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=WAIT)


def _read_answer(sock: socket.socket, buffered: bytes = b"") -> tuple[int, bytes, bytes]:
    """(status, body, what was read past it) of one answer."""
    data = buffered
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")[1:]
                  if line.lower().startswith(b"content-length:"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk
        rest += chunk
    return int(head.split(b" ", 2)[1]), rest[:length], rest[length:]


def _read_until_closed(sock: socket.socket) -> bytes:
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def test_answers_keep_alive_and_pipelining(port: int) -> None:
    with _connect(port) as sock:
        for binary in (False, True, False):
            sock.sendall(_infer_request(2, binary=binary))
            status, body, _ = _read_answer(sock)
            assert status == 200, body
        # Three requests in one write: three answers, in order.
        sock.sendall(_infer_request() + b"GET /v2 HTTP/1.1\r\nhost: a\r\n\r\n" + _infer_request())
        rest = b""
        statuses = []
        for _ in range(3):
            status, body, rest = _read_answer(sock, rest)
            statuses.append((status, body[:20]))
        assert [s for s, _ in statuses] == [200, 200, 200]
        assert statuses[1][1].startswith(b'{"name":"edgefleet')


@pytest.mark.parametrize("growing", [False, True], ids=["whole", "growing"])
def test_a_head_over_the_limit_is_a_431(port: int, growing: bool) -> None:
    filler = b"x-filler: " + b"a" * (MAX_HEADER_BYTES + 100) + b"\r\n"
    head = b"GET /v2 HTTP/1.1\r\nhost: a\r\n" + filler
    with _connect(port) as sock:
        if growing:  # never finished: sent in pieces, no blank line
            for i in range(0, len(head), 4096):
                try:
                    sock.sendall(head[i:i + 4096])
                except OSError:
                    break  # refused and closed while sending
        else:
            sock.sendall(head + b"\r\n")
        answer = _read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    assert b"over %d bytes" % MAX_HEADER_BYTES in answer
    with _connect(port) as sock:  # the server goes on
        sock.sendall(_infer_request())
        assert _read_answer(sock)[0] == 200


@pytest.mark.parametrize("first", [b"", b"POST /v2/models/digits/infer HTTP/1.1\r\nx-a: 1",
                                   b"KEEP"], ids=["silent", "partial-head", "after-a-request"])
def test_a_slow_head_gets_a_408(port: int, first: bytes) -> None:
    with _connect(port) as sock:
        if first == b"KEEP":  # a request answered, then half of the next head
            sock.sendall(_infer_request() + b"GET /v2 HTTP/1.1\r\n")
        else:
            sock.sendall(first)
        answer = _read_until_closed(sock)
    assert b"HTTP/1.1 408" in answer and b"head did not arrive" in answer, answer[-300:]


def test_a_slow_body_gets_a_408_and_a_large_one_a_413(port: int) -> None:
    with _connect(port) as sock:
        sock.sendall(b"POST %s HTTP/1.1\r\nhost: a\r\ncontent-length: 1000\r\n\r\n{\"in" % INFER)
        answer = _read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408") and b"body did not arrive" in answer, answer
    with _connect(port) as sock:
        sock.sendall(b"POST %s HTTP/1.1\r\nhost: a\r\ncontent-length: %d\r\n\r\n"
                     % (INFER, 9 * 2**20))
        status, body, _ = _read_answer(sock)
    assert status == 413 and b"limit" in body


def test_the_stack_falls_back_where_the_fast_parts_are_missing(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    assert choose_parser("auto") == "httptools"  # the agent extra installs it here
    assert event_loop_factory("auto") is uvloop.new_event_loop
    assert event_loop_factory("asyncio") is None
    monkeypatch.setattr(http_protocols, "HTTPTOOLS", False)
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop raises ImportError
    assert choose_parser("auto") == "h11"
    assert event_loop_factory("auto") is None
    for ask in (lambda: choose_parser("httptools"), lambda: event_loop_factory("uvloop")):
        with pytest.raises(InvalidInputError, match="not"):
            ask()
    with pytest.raises(InvalidInputError):
        choose_parser("picohttp")
