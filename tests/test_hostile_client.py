"""A hostile local client against a real running agent (issue 13): real sockets, a real
control plane, a real signed ONNX bundle rolled out and committed, the agent's own HTTP and gRPC
listeners. One test per attack; each asserts the status and the one-line body, that other
clients keep being served, and that what the agent keeps stays bounded in bytes.

The deadline tests use a second HTTP listener on the same agent's ``ServingCore`` whose
deadlines are short (the agent's own are ``HEADER_TIMEOUT_S`` / ``BODY_TIMEOUT_S``): they wait
for the agent to close the slow connection, never on a fixed sleep.
"""

from __future__ import annotations

import json
import shutil
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from edgefleet.v1 import grpc_predict_v2_pb2 as pb
from edgefleet.v1 import grpc_predict_v2_pb2_grpc as pb_grpc
from sklearn.datasets import load_digits

from edge_agent.serving import ServingCore
from edge_agent.serving.http import HttpServer, start_http
from edge_agent.serving.limits import (
    FEEDBACK_LOG_BYTES,
    MAX_BODY_BYTES,
    MAX_HEADER_BYTES,
    MAX_JSON_DEPTH,
    MAX_MESSAGE_BYTES,
    MAX_REQUEST_ID_CHARS,
    MAX_SHOWN_CHARS,
)
from edge_agent.serving.stats import Pending, PredictionLog, entry_bytes
from tests.support import WAIT, LoopThread, RunningAgent, start_agent, start_control_plane
from tests.test_delivery import _bundle_for, _committed, _fleet, _wait_models

SHORT_S = 0.5  # the test listener's head and body deadlines
ONE_MB = 1024 * 1024


@dataclass
class Site:
    agent: RunningAgent
    loop: LoopThread
    port: int  # the agent's own HTTP listener
    grpc_port: int
    short_port: int  # a listener on the agent's core with SHORT_S deadlines
    rows: np.ndarray

    @property
    def core(self) -> ServingCore:
        return self.agent.agent.supervisor.core

    def url(self, path: str = "/v2/models/digits/infer") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def body(self, x: np.ndarray | None = None, **extra: Any) -> dict[str, Any]:
        x = self.rows[:1] if x is None else x
        return {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                            "data": x.ravel().tolist()}], **extra}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, trained_bundle: Path) -> Iterator[Site]:
    base = tmp_path_factory.mktemp("hostile")
    loop = LoopThread()
    cp = start_control_plane(base / "cp", loop)
    bundle = _bundle_for(cp, trained_bundle, base / "v1", version=1)
    assert _fleet(cp, "models", "publish", str(bundle)) == 0
    cp.enroll_agent(base / "a")
    agent = start_agent(base / "a", loop, probation_seconds=0.0)
    short: HttpServer | None = None
    try:
        ports = agent.wait_for("serving")
        assert _fleet(cp, "rollouts", "start", "--model", "digits", "--version", "1") == 0
        _wait_models(agent, _committed(1))
        short, short_port = loop.run(start_http(agent.agent.supervisor.core, "127.0.0.1", 0,
                                                header_timeout_s=SHORT_S,
                                                body_timeout_s=SHORT_S))
        yield Site(agent, loop, ports["http_port"], ports["grpc_port"], short_port,
                   load_digits().data[:8].astype(np.float32))
    finally:
        if short is not None:
            loop.run(short.stop())
        agent.stop()
        cp.stop()
        loop.close()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def client(site: Site) -> Iterator[httpx.Client]:
    with httpx.Client(timeout=WAIT) as c:
        yield c


@pytest.fixture(scope="module")
def stub(site: Site) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    # A client that would send more than the server takes: the server's limit is what's tested.
    with grpc.insecure_channel(f"127.0.0.1:{site.grpc_port}", options=[
            ("grpc.max_send_message_length", 4 * MAX_MESSAGE_BYTES)]) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def _one_line_error(response: httpx.Response, status: int, needle: str = "") -> str:
    """The refusal's status and its body: one short line of JSON, no traceback."""
    assert response.status_code == status, response.text[:300]
    text = response.text
    assert "\n" not in text.strip() and len(text) < 400 and "Traceback" not in text, text[:300]
    error = str(response.json()["error"])
    assert needle in error, error
    return error


def _served(site: Site, client: httpx.Client) -> None:
    """A normal request, answered: the agent still serves other clients."""
    r = client.post(site.url(), json=site.body())
    assert r.status_code == 200, r.text
    assert r.json()["model_version"] == "1"


def _grpc_request(x: np.ndarray, *, request_id: str = "", model: str = "digits",
                  version: str = "") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    tensor = request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    return request


def _grpc_refused(stub: pb_grpc.GRPCInferenceServiceStub, request: pb.ModelInferRequest,
                  code: grpc.StatusCode, needle: str = "") -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=WAIT)
    error: Any = info.value
    assert error.code() == code, error.details()
    details = str(error.details())
    assert "\n" not in details and len(details) < 400, details[:300]
    assert needle in details, details


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    return sock


def _read_until_closed(sock: socket.socket) -> bytes:
    """Everything the agent sends until it closes the connection (bounded by WAIT)."""
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def _still_open(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) != b""  # data would be an answer: not expected while stalled
    except BlockingIOError:
        return True  # nothing to read and not closed
    finally:
        sock.setblocking(True)
        sock.settimeout(WAIT)


def _status_and_body(raw: bytes) -> tuple[int, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


# ------------------------------------------------------------------ huge ids


def test_huge_request_ids_are_refused_and_the_feedback_log_stays_bounded_in_bytes(
    site: Site, client: httpx.Client, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    log = site.core.log
    before = log.bytes
    # 1,000 requests with 1 MB ids over one keep-alive connection: each a 400, nothing kept.
    body = json.dumps(site.body(id="i" * ONE_MB)).encode()
    for _ in range(1000):
        r = client.post(site.url(), content=body)
        _one_line_error(r, 400, f"at most {MAX_REQUEST_ID_CHARS} characters")
    assert log.bytes == before
    feedback = client.post(site.url("/v2/models/digits/feedback"),
                           json={"id": "f" * ONE_MB, "label": 1})
    _one_line_error(feedback, 400, f"at most {MAX_REQUEST_ID_CHARS} characters")
    _grpc_refused(stub, _grpc_request(site.rows[:1], request_id="g" * ONE_MB),
                  grpc.StatusCode.INVALID_ARGUMENT, f"at most {MAX_REQUEST_ID_CHARS}")
    assert log.bytes == before

    # Ids at the limit are kept, and their bytes are what the log accounts (an entry ~1 KB).
    for i in range(1000):
        rid = f"{i:04d}" + "x" * (MAX_REQUEST_ID_CHARS - 4)
        assert client.post(site.url(), json=site.body(id=rid)).status_code == 200
    site.core.flush(WAIT)
    assert len(log) >= 1000
    assert log.bytes - before <= 1000 * 1024
    assert log.bytes <= FEEDBACK_LOG_BYTES
    _served(site, client)


def test_the_feedback_log_evicts_by_bytes_not_only_by_entries() -> None:
    """The structure behind the test above, at a small byte bound: 1,000 entries carrying
    sampled rows of 1 MB each never hold more than the bound."""
    log = PredictionLog(capacity=100_000, max_bytes=4 * ONE_MB)
    rows = np.zeros((ONE_MB // 256, 64), np.float32)  # 1 MiB of float32
    for i in range(1000):
        pending = Pending("digits", 1, None, 3)  # type: ignore[arg-type]
        pending.sample = (rows, {"customer": "c" * 1024})
        log.put(f"{i}-" + "r" * (MAX_REQUEST_ID_CHARS - 8), pending)
        assert log.bytes <= 4 * ONE_MB
    assert 1 <= len(log) <= 4 and log.evicted == 1000 - len(log)
    last = "999-" + "r" * (MAX_REQUEST_ID_CHARS - 8)
    taken = log.take(last, "digits")
    assert taken is not None and taken.cost == entry_bytes(last, taken) > ONE_MB
    assert log.bytes == sum(p.cost for p in log._entries.values())


# ------------------------------------------------------------------ deep JSON


def test_deep_json_is_a_400_with_one_line_on_every_path(
    site: Site, client: httpx.Client
) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    just_over = b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1)
    for path in ("/v2/models/digits/infer", "/v2/models/digits/feedback"):
        for payload in (deep, just_over, b'{"id": "x", "label": ' + deep + b"}",
                        b'{"inputs": [{"data": ' + just_over + b"}]}"):
            r = client.post(site.url(path), content=payload)
            _one_line_error(r, 400, f"nests deeper than {MAX_JSON_DEPTH}")
    # Brackets inside strings do not nest: this id is fine.
    r = client.post(site.url(), json=site.body(id="[" * 200))
    assert r.status_code == 200, r.text
    _served(site, client)


# ------------------------------------------------------------------ large bodies


def test_a_large_body_does_not_hold_up_a_small_request(
    site: Site, client: httpx.Client
) -> None:
    """The small request is answered while the large one is still being sent; then the large
    one (parsed on a worker thread: over PARSE_INLINE_MAX_BYTES) is answered too."""
    x = np.tile(site.rows, (1500, 1))  # 12,000 rows: a ~5 MB body
    large = json.dumps(site.body(x)).encode()
    assert ONE_MB < len(large) < MAX_BODY_BYTES
    sock = _connect(site.port)
    try:
        sock.sendall(b"POST /v2/models/digits/infer HTTP/1.1\r\nhost: agent\r\n"
                     b"content-type: application/json\r\n"
                     b"content-length: %d\r\n\r\n" % len(large) + large[:len(large) // 2])
        _served(site, client)  # meanwhile
        assert _still_open(sock)
        sock.sendall(large[len(large) // 2:])
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(65536)
        assert head.startswith(b"HTTP/1.1 200"), head[:200]
    finally:
        sock.close()
    # Over the limit: refused from Content-Length before a byte of it is read, and closed.
    sock = _connect(site.port)
    try:
        sock.sendall(b"POST /v2/models/digits/infer HTTP/1.1\r\nhost: agent\r\n"
                     b"content-length: %d\r\n\r\n" % (MAX_BODY_BYTES + 1))
        status, body = _status_and_body(_read_until_closed(sock))
        assert status == 413 and b"\n" not in body and b"limit" in body, body
    finally:
        sock.close()
    _served(site, client)


# ------------------------------------------------------------------ slowloris


def test_a_slow_head_does_not_block_others_and_gets_a_408(
    site: Site, client: httpx.Client
) -> None:
    slow = _connect(site.port)  # the agent's own listener (deadline HEADER_TIMEOUT_S)
    idle = _connect(site.port)  # connects and says nothing
    try:
        slow.sendall(b"POST /v2/models/digits/infer HTTP/1.1\r\nhost: agent\r\nx-a: ")
        _served(site, client)
        assert _still_open(slow) and _still_open(idle)
    finally:
        slow.close()
        idle.close()
    # On the short-deadline listener the agent answers 408 and closes.
    for first in (b"", b"POST /v2/models/digits/infer HTTP/1.1\r\nhost: agent\r\nx-a: 1"):
        sock = _connect(site.short_port)
        try:
            sock.sendall(first)
            status, body = _status_and_body(_read_until_closed(sock))
            assert status == 408 and b"\n" not in body, body
            assert b"head did not arrive" in body
        finally:
            sock.close()
    # After a kept-alive request, the next head has its own deadline.
    sock = _connect(site.short_port)
    try:
        body = json.dumps(site.body()).encode()
        sock.sendall(b"POST /v2/models/digits/infer HTTP/1.1\r\nhost: agent\r\n"
                     b"content-length: %d\r\n\r\n" % len(body) + body + b"GET /v2 HTTP/1.1\r\n")
        answers = _read_until_closed(sock)
        assert answers.startswith(b"HTTP/1.1 200") and b"HTTP/1.1 408" in answers, answers
    finally:
        sock.close()
    _served(site, client)


def test_a_slow_body_does_not_block_others_and_gets_a_408(
    site: Site, client: httpx.Client
) -> None:
    for port in (site.port, site.short_port):
        sock = _connect(port)
        try:
            sock.sendall(b"POST /v2/models/digits/infer HTTP/1.1\r\nhost: agent\r\n"
                         b"content-length: 1000\r\n\r\n{\"inputs\": ")
            _served(site, client)
            if port == site.port:
                assert _still_open(sock)  # BODY_TIMEOUT_S has not passed
                continue
            status, body = _status_and_body(_read_until_closed(sock))
            assert status == 408 and b"\n" not in body and b"body did not arrive" in body
        finally:
            sock.close()
    _served(site, client)


# ------------------------------------------------------------------ NaN / Inf


def test_non_finite_inputs_are_refused_over_http_and_grpc(
    site: Site, client: httpx.Client, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    x = site.rows[:1].copy()
    x[0, 7] = 12345.5  # a placeholder, replaced in the text
    template = json.dumps(site.body(x))
    for bad in ("1e999", "-1e999", "1e39"):  # JSON has no NaN: overflow is how Inf arrives
        text = template.replace("12345.5", bad)
        _one_line_error(client.post(site.url(), content=text.encode()), 400, "finite")
    _one_line_error(client.post(site.url(), content=b'{"inputs": [NaN]}'), 400, "NaN")
    for value in (float("nan"), float("inf"), -float("inf")):
        x = site.rows[:2].copy()
        x[1, 5] = value
        _grpc_refused(stub, _grpc_request(x), grpc.StatusCode.INVALID_ARGUMENT, "finite")
        raw = pb.ModelInferRequest(model_name="digits")
        raw.inputs.add(name="input", datatype="FP32", shape=[2, 64])
        raw.raw_input_contents.append(x.astype("<f4").tobytes())
        _grpc_refused(stub, raw, grpc.StatusCode.INVALID_ARGUMENT, "finite")
    assert site.core.stats()["models"]["digits"]["bad_requests"] >= 9
    _served(site, client)


def test_a_manifest_may_allow_non_finite_inputs(trained_bundle: Path, tmp_path: Path) -> None:
    """``"input": {"allow_non_finite": true}`` (a model that handles missing values) lets
    NaN through; without it the same rows are refused."""
    allowed = tmp_path / "allowed"
    shutil.copytree(trained_bundle, allowed)
    manifest = json.loads((allowed / "manifest.json").read_text())
    manifest["input"]["allow_non_finite"] = True
    (allowed / "manifest.json").write_text(json.dumps(manifest))
    x = load_digits().data[:1].astype(np.float32)
    x[0, 3] = np.nan
    for bundle, refused in ((trained_bundle, True), (allowed, False)):
        core = ServingCore()
        try:
            core.set_model("digits", [(1, 1.0, False)], {1: bundle})
            if refused:
                with pytest.raises(Exception, match="finite numbers only"):
                    core.infer("digits", x)
            else:
                assert core.infer("digits", x).outputs.shape == (1, 10)
        finally:
            core.close()


# ------------------------------------------------------------------ lengths and sizes


def test_names_versions_keys_headers_and_sizes_have_limits(
    site: Site, client: httpx.Client, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    long_name = "m" * 10_000
    error = _one_line_error(client.post(site.url(f"/v2/models/{long_name}/infer"),
                                        json=site.body()), 404, "no model named")
    assert len(error) < 2 * MAX_SHOWN_CHARS + 200  # the name is quoted cut short
    _one_line_error(client.post(site.url("/v2/models/digits/versions/" + "9" * 40 + "/infer"),
                                json=site.body()), 400, "positive integer")
    _one_line_error(client.post(site.url(), json=site.body(
        parameters={"routing_key": "k" * 10_000})), 400, "routing_key")
    _one_line_error(client.post(site.url(), json=site.body(), headers={
        "x-routing-key": "k" * 4000}), 400, "x-routing-key")
    _one_line_error(client.post(site.url(), json=site.body(
        parameters={f"p{i}": "v" for i in range(100)}, id="with-params")), 400, "parameters")
    _one_line_error(client.post(site.url(), json={"inputs": [{"name": "i" * ONE_MB}]}), 400,
                    "expected input")

    # Headers past MAX_HEADER_BYTES, whole or in pieces: 431, one line, closed.
    for pieces in (1, 4):
        head = (b"GET /v2 HTTP/1.1\r\nhost: agent\r\nx-big: " + b"a" * MAX_HEADER_BYTES
                + b"\r\n\r\n")
        sock = _connect(site.port)
        try:
            step = len(head) // pieces + 1
            for i in range(0, len(head), step):
                sock.sendall(head[i:i + step])
            status, body = _status_and_body(_read_until_closed(sock))
            assert status == 431 and b"\n" not in body and b"headers are over" in body, body
        finally:
            sock.close()
    assert client.get(site.url("/v2"), headers={"x-ok": "a" * (MAX_HEADER_BYTES // 2)}).json()[
        "name"] == "edgefleet-agent"

    # The same over gRPC.
    _grpc_refused(stub, _grpc_request(site.rows[:1], model=long_name),
                  grpc.StatusCode.NOT_FOUND, "no model named")
    _grpc_refused(stub, _grpc_request(site.rows[:1], version="9" * 40),
                  grpc.StatusCode.INVALID_ARGUMENT, "positive integer")
    big = pb.ModelInferRequest(model_name="digits")
    big.inputs.add(name="input", datatype="FP32", shape=[1, 64])
    big.raw_input_contents.append(b"\0" * (MAX_MESSAGE_BYTES + 1))
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(big, timeout=WAIT)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(_grpc_request(site.rows[:1]), timeout=WAIT,
                        metadata=[("x-routing-key", "k" * 10_000)])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert stub.ModelInfer(_grpc_request(site.rows[:1], request_id="ok"),
                           timeout=WAIT).model_version == "1"
    _served(site, client)
