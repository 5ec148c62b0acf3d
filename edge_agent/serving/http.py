"""Open Inference Protocol v2 over HTTP: a plain ASGI app served by uvicorn.

Routes::

    GET  /v2                                   server metadata
    GET  /v2/health/live | /v2/health/ready    200, or 503 when no model is served (ready)
    GET  /v2/models/{name}[/versions/{v}]      model metadata
    GET  /v2/models/{name}[/versions/{v}]/ready
    POST /v2/models/{name}[/versions/{v}]/infer
    POST /v2/models/{name}/feedback            {"id": request id, "label": int | [int, ...]}
    GET  /v2/models/stats | /v2/models/{name}[/versions/{v}]/stats   statistics (repository.py)
    POST /v2/repository/index                  served versions; load/unload: 403
    GET  /metrics                              Prometheus text

Rules:

* An infer request has exactly one input, named as the model's input, datatype "FP32", shape
  ``[n, features]`` (n >= 1) and ``data`` flat or nested (row-major) holding n * features
  numbers, or, with the binary data extension (``binary.py``), ``parameters.binary_data_size``
  and its bytes after the JSON part; the answer is binary when the request asks
  (``binary_data`` on the output, or ``parameters.binary_data_output``).
  ``parameters.routing_key`` (or the header ``x-routing-key``) makes the A/B choice sticky.
  A versioned path asks for that version: no routing, no mirroring.
* Every limit is a named constant in ``limits.py`` (docs/serving.md, "Limits"). The body limit
  (``max_body_bytes``, default ``MAX_BODY_BYTES``) is enforced from Content-Length before
  reading and again while reading a chunked body; the body must nest at most
  ``MAX_JSON_DEPTH`` deep (checked before parsing); ids, routing keys and parameters have
  lengths; an error message quotes at most ``MAX_SHOWN_CHARS`` of what the client sent.
* A body over ``PARSE_INLINE_MAX_BYTES`` is parsed on a worker thread with Python-level number
  functions (``strict_json`` ``cooperative``), so the event loop keeps serving other clients
  meanwhile; the C parser would hold the GIL for the whole body.
* The connection is uvicorn's httptools protocol when ``httptools`` is importable, else its
  h11 protocol (``parser``: "auto", "httptools", "h11"), each guarded
  (``http_protocols.py``): request line + headers at most ``MAX_HEADER_BYTES`` (431), its
  head within ``HEADER_TIMEOUT_S`` of the connection or of its first byte, its body within
  ``BODY_TIMEOUT_S`` of the head (408); idle keep-alive ``KEEP_ALIVE_S``, at most
  ``MAX_CONNECTIONS`` (uvicorn answers 503 past it). The event loop is the caller's (the CLI
  runs the agent on uvloop when it is importable: ``edge_agent/cli.py``).
* Every refusal is ``{"error": "..."}`` (one line) with a 4xx status (400 malformed, 404
  unknown model, version or request id, 405 wrong method, 408 too slow, 413 too large, 431
  headers too large); a
  runtime failure is 500. Nothing a request does disturbs another.
* The app is written against ASGI directly, not Starlette: routing is a few string
  comparisons, and the infer response is written out by hand. Called directly with one
  64-feature row it takes ~45 µs against ~60 µs for a minimal Starlette app doing less (no
  checks, no stats); through uvicorn (h11) ``bench_http`` measured 1.09-1.13x the Starlette
  app's requests/s on the 2-core host. Most of a request's time was uvicorn's h11 parser,
  hence httptools (``make bench`` measures both stacks in the same run).
* ``start_http`` runs uvicorn on the caller's event loop without taking over its signal
  handlers (the daemon owns those) and returns the bound port (port 0 picks a free one).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import socket
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, NamedTuple, TypeVar

import numpy as np
import uvicorn

from edge_agent._version import __version__
from edge_agent.serving.binary import (
    BINARY_DATA_SIZE,
    HEADER,
    binary_size,
    check_all_used,
    split_body,
    tensor_from_bytes,
    wants_binary_output,
)
from edge_agent.serving.categorical import encode
from edge_agent.serving.core import InferResult, ModelSignature, ServingCore
from edge_agent.serving.errors import (
    BadRequestError,
    InferenceError,
    ModelNotFoundError,
    PayloadTooLargeError,
)
from edge_agent.serving.heap import trim as trim_heap
from edge_agent.serving.http_protocols import Parser, parser_available, protocol_class
from edge_agent.serving.limits import (
    BODY_TIMEOUT_S,
    HEADER_TIMEOUT_S,
    KEEP_ALIVE_S,
    MAX_BODY_BYTES,
    MAX_CONNECTIONS,
    MAX_HEADER_BYTES,
    MAX_HEADER_LENGTH_DIGITS,
    MAX_JSON_DEPTH,
    MAX_PARAMETER_NAME_CHARS,
    MAX_PARAMETER_VALUE_CHARS,
    MAX_PARAMETERS,
    MAX_REQUEST_ID_CHARS,
    MAX_ROUTING_KEY_CHARS,
    PARSE_INLINE_MAX_BYTES,
    check_model_name,
    parse_version,
    shown,
)
from edge_agent.serving.metrics import ServingMetrics
from edge_agent.serving.repository import (
    EXTENSIONS,
    REPOSITORY_REFUSAL,
    SERVER_NAME,
    repository_index,
    statistics,
)
from edge_agent.serving.spans import Served
from fleetcore import strict_json
from fleetcore.errors import EdgefleetError, InvalidInputError, NotFoundError

__all__ = [
    "MAX_BODY_BYTES",  # re-exported from limits.py
    "HttpServer",
    "InferRequest",
    "InferenceApp",
    "binary_infer_response",
    "choose_parser",
    "infer_response",
    "parse_infer_request",
    "start_http",
]

logger = logging.getLogger(__name__)



Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
_T = TypeVar("_T")
Send = Callable[[Message], Awaitable[None]]

_JSON = b"application/json"
_OCTETS = b"application/octet-stream"
_ENCODER = json.JSONEncoder(separators=(",", ":"))
_string = json.encoder.encode_basestring_ascii
_MODELS = "/v2/models/"
_ALL_STATS = "/v2/models/stats"  # as in Triton: a model named "stats" has no metadata route
_REPOSITORY = "/v2/repository/models/"

# Domain errors -> HTTP status: the one place where that mapping lives. First match wins.
_STATUS: tuple[tuple[type[EdgefleetError], int], ...] = (
    (PayloadTooLargeError, 413),
    (InvalidInputError, 400),
    (NotFoundError, 404),
    (InferenceError, 500),
)


class _HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Disconnected(Exception):
    """The client went away before its body arrived."""


class InferenceApp:
    """The ASGI application (see the module rules)."""

    def __init__(self, core: ServingCore, metrics: ServingMetrics | None = None, *,
                 max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self.core = core
        self.metrics = metrics or ServingMetrics(core)
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # lifespan is off; websockets are not served
        extra: list[tuple[bytes, bytes]] = []
        try:
            status, body, content_type = await self._dispatch(scope, receive, extra)
        except _Disconnected:
            return
        except _HttpError as exc:
            status, body, content_type = exc.status, _error(str(exc)), _JSON
        except EdgefleetError as exc:
            status = next((code for cls, code in _STATUS if isinstance(exc, cls)), 500)
            body, content_type = _error(str(exc)), _JSON
        except Exception as exc:
            logger.exception("%s %s failed", scope.get("method"), scope.get("path"))
            status, body, content_type = 500, _error(f"internal error: {type(exc).__name__}"), _JSON
        headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
        if status == 200 and extra:
            headers += extra
        if status == 413:  # the rest of the body is not worth reading: close the connection
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _dispatch(self, scope: Scope, receive: Receive,
                        extra: list[tuple[bytes, bytes]]) -> tuple[int, bytes, bytes]:
        """(status, body, content type); headers of a 200 beyond those go into ``extra``."""
        path: str = scope["path"]
        method: str = scope["method"]
        if not path.startswith(_MODELS) or path == _ALL_STATS:
            return self._server_route(path, method)
        name, _, rest = path[len(_MODELS):].partition("/")
        check_model_name(name)
        version: int | None = None
        if rest.startswith("versions/"):
            text, _, rest = rest[len("versions/"):].partition("/")
            version = parse_version(text)
        if rest == "infer":
            _allow(method, "POST")
            spans = self.core.spans  # None: inference spans off (the one check)
            if spans is None:
                body, json_length = await self._infer(name, version, scope, receive)
            else:
                with spans.request(name, "http", _trace_headers(scope)) as served:
                    body, json_length = await self._infer(name, version, scope, receive,
                                                          served)
            if json_length is None:
                return 200, body, _JSON
            extra.append((HEADER, str(json_length).encode()))
            return 200, body, _OCTETS
        if rest == "feedback" and version is None:
            _allow(method, "POST")
            return await self._feedback(name, scope, receive)
        if rest == "stats":
            _allow(method, "GET")
            return 200, _dump(statistics(self.core.stats(), name, version)), _JSON
        if rest in {"", "ready"}:
            _allow(method, "GET")
            meta = self._metadata(name, version)  # 404 when unknown
            return 200, _dump(meta if rest == "" else {"name": name, "ready": True}), _JSON
        raise _HttpError(404, f"no route {shown(path)}")

    def _server_route(self, path: str, method: str) -> tuple[int, bytes, bytes]:
        if path == "/metrics":
            _allow(method, "GET")
            text, content_type = self.metrics.render()
            return 200, text, content_type.encode()
        if path == "/v2/health/live":
            _allow(method, "GET")
            return 200, b'{"live":true}', _JSON
        if path == "/v2/health/ready":
            _allow(method, "GET")
            ready = self.core.ready()
            return (200 if ready else 503), _dump({"ready": ready}), _JSON
        if path == _ALL_STATS:
            _allow(method, "GET")
            return 200, _dump(statistics(self.core.stats())), _JSON
        if path == "/v2/repository/index":
            _allow(method, "POST")
            return 200, _ENCODER.encode(repository_index(self.core.models())).encode(), _JSON
        if path.startswith(_REPOSITORY) and path.endswith(("/load", "/unload")):
            _allow(method, "POST")
            raise _HttpError(403, REPOSITORY_REFUSAL)
        if path in {"/v2", "/v2/"}:
            _allow(method, "GET")
            return 200, _dump({"name": SERVER_NAME, "version": __version__,
                               "extensions": list(EXTENSIONS)}), _JSON
        raise _HttpError(404, f"no route {shown(path)}")

    def _metadata(self, name: str, version: int | None) -> dict[str, Any]:
        meta = self.core.models().get(name)
        if meta is None or (version is not None and str(version) not in meta["versions"]):
            what = name if version is None else f"{name} v{version}"
            raise ModelNotFoundError(f"{what} is not served")
        return meta

    async def _infer(self, name: str, version: int | None, scope: Scope,
                     receive: Receive, served: Served | None = None,
                     ) -> tuple[bytes, int | None]:
        """(body, length of its JSON part when the answer is binary, else None)."""
        signature = self.core.signature(name)  # 404 before reading the body
        header_key = None
        declared = None
        header_length = None
        for key, value in scope["headers"]:
            if key == b"content-length":
                declared = value
            elif key == b"x-routing-key":
                header_key = value.decode("latin-1")
            elif key == HEADER:
                header_length = value
        try:
            if header_key is not None and len(header_key) > MAX_ROUTING_KEY_CHARS:
                raise BadRequestError(f"x-routing-key has {len(header_key)} characters; the "
                                      f"limit is {MAX_ROUTING_KEY_CHARS}")
            body = await self._read_body(receive, declared)
            json_bytes = len(body) if header_length is None else _json_length(header_length)
            if json_bytes <= PARSE_INLINE_MAX_BYTES:
                request = parse_infer_request(body, signature, header_length=header_length)
            else:
                request = await asyncio.to_thread(parse_infer_request, body, signature,
                                                  cooperative=True, header_length=header_length)
        except BadRequestError:
            self.core.note_bad_request(name)
            raise
        result = await self.core.ainfer(name, request.rows, request_id=request.request_id,
                                        routing_key=request.routing_key or header_key,
                                        version=version, context=request.context)
        if served is not None:
            served.version, served.rows = result.version, len(request.rows)
        if request.binary_output:
            return binary_infer_response(result, signature)
        return infer_response(result, signature), None

    async def _feedback(self, name: str, scope: Scope,
                        receive: Receive) -> tuple[int, bytes, bytes]:
        signature = self.core.signature(name)  # 404 for an unknown model
        body = await self._read_body(receive, _content_length(scope))
        doc = await _off_loop_if_large(_load_json, body)
        request_id, label = doc.get("id"), doc.get("label")
        if not isinstance(request_id, str):
            raise BadRequestError(f"feedback needs a string 'id'; got {shown(request_id)}")
        if signature.task == "regression":
            if isinstance(label, bool) or not isinstance(label, int | float | list):
                raise BadRequestError(f"feedback needs a numeric 'label' (or one per row); "
                                      f"got {shown(label)}")
        elif not isinstance(label, int | list):
            raise BadRequestError(f"feedback needs an integer 'label' (or one per row); got "
                                  f"{shown(label)}")
        if not self.core.feedback(name, request_id, label):
            raise _HttpError(404, f"no answered request {shown(request_id)} of {name} is "
                                  "waiting for a label")
        return 200, b'{"accepted":true}', _JSON

    async def _read_body(self, receive: Receive, declared: bytes | None) -> bytes:
        limit = self.max_body_bytes
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                raise BadRequestError(f"bad Content-Length {shown(declared)}") from None
            if length > limit:
                raise PayloadTooLargeError(f"body is {length} bytes; the limit is {limit}")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLargeError(f"body is over the limit of {limit} bytes")
            if not message.get("more_body", False):
                return chunk if not chunks else b"".join([*chunks, chunk])
            chunks.append(chunk)


def _trace_headers(scope: Scope) -> dict[str, str]:
    """A request's W3C trace headers (check_carrier bounds them)."""
    return {key.decode("latin-1"): value.decode("latin-1") for key, value in scope["headers"]
            if key in (b"traceparent", b"tracestate")}


def _content_length(scope: Scope) -> bytes | None:
    for key, value in scope["headers"]:
        if key == b"content-length":
            return bytes(value)
    return None


async def _off_loop_if_large(parse: Callable[..., _T], body: bytes, *args: Any) -> _T:
    """``parse(body, *args)``: inline for a small body, else on a worker thread with the
    cooperative JSON parser (module rules)."""
    if len(body) <= PARSE_INLINE_MAX_BYTES:
        return parse(body, *args)
    return await asyncio.to_thread(parse, body, *args, cooperative=True)


def _json_length(header_length: bytes) -> int:
    """The JSON part's length a binary request declares (checked again by ``split_body``);
    0 when it is not a number, so that the refusal happens inline."""
    text = header_length.strip()
    return int(text) if text.isdigit() and len(text) <= MAX_HEADER_LENGTH_DIGITS else 0


def _check_id(request_id: str) -> None:
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise BadRequestError(f"a request id has at most {MAX_REQUEST_ID_CHARS} characters; got "
                              f"{len(request_id)}")


class InferRequest(NamedTuple):
    """A parsed v2 infer request (``parse_infer_request``)."""

    rows: np.ndarray  # float32 [n, features]
    request_id: str | None
    routing_key: str | None
    context: dict[str, str] | None  # string parameters, kept only with an id
    binary_output: bool = False  # answer with the binary data extension


def parse_infer_request(
    body: bytes, signature: ModelSignature, *, cooperative: bool = False,
    header_length: bytes | None = None,
) -> InferRequest:
    """(rows, request id, routing key, string parameters, binary output) from a v2 infer body,
    or ``BadRequestError``. Parameters are kept only for a request with an id. ``cooperative``:
    see ``strict_json.loads`` (for a large body on a worker thread). ``header_length``: the
    ``Inference-Header-Content-Length`` header of a body with binary tensors (``binary.py``)."""
    text, binary = split_body(body, header_length)
    doc = _load_json(text, cooperative=cooperative)
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise BadRequestError(f"expected 'inputs' to hold one tensor named "
                              f"{signature.input_name!r}")
    tensor = inputs[0]
    if tensor.get("name") != signature.input_name:
        raise BadRequestError(f"expected input {signature.input_name!r}; got "
                              f"{shown(tensor.get('name'))}")
    raw = tensor.get("datatype") == "BYTES" and signature.categories is not None
    if tensor.get("datatype") != "FP32" and not raw:
        also = " (or 'BYTES' with raw values: the model has categorical inputs)" \
            if signature.categories is not None else ""
        raise BadRequestError(f"expected datatype 'FP32'{also}; got "
                              f"{shown(tensor.get('datatype'))}")
    shape = tensor.get("shape")
    features = signature.features
    if (not isinstance(shape, list) or len(shape) != 2
            or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
            or shape[0] < 1 or shape[1] != features):
        raise BadRequestError(f"expected shape [n, {features}] with n >= 1; got {shown(shape)}")
    x = _input_rows(tensor, binary, shape, signature, raw=raw)
    request_id = doc.get("id")
    if request_id is not None:
        if not isinstance(request_id, str):
            raise BadRequestError(f"expected 'id' to be a string; got {shown(request_id)}")
        _check_id(request_id)
    params = doc.get("parameters") or {}
    key = params.get("routing_key") if isinstance(params, dict) else None
    if key is not None and (not isinstance(key, str) or len(key) > MAX_ROUTING_KEY_CHARS):
        raise BadRequestError(f"expected parameters.routing_key to be a string of at most "
                              f"{MAX_ROUTING_KEY_CHARS} characters; got {shown(key)}")
    outputs = doc.get("outputs")
    if outputs is not None and (not isinstance(outputs, list) or any(
            not isinstance(o, dict) or o.get("name") != signature.output_name for o in outputs)):
        raise BadRequestError(f"the only output is {signature.output_name!r}")
    binary_output = wants_binary_output(params, outputs[0] if outputs else None)
    return InferRequest(x, request_id, key, _context(params) if request_id is not None else None,
                        binary_output)


def _input_rows(tensor: dict[str, Any], binary: Any, shape: list[int],
                signature: ModelSignature, *, raw: bool) -> np.ndarray:
    """The input tensor's rows: binary FP32, JSON numbers, or (``raw``) JSON raw values that
    the model's categories encode."""
    size = binary_size(tensor)
    if raw and size is not None:
        raise BadRequestError("raw values of categorical inputs go in the tensor's JSON 'data'; "
                              "binary tensor data carries FP32 codes")
    if size is not None:
        x = tensor_from_bytes(binary, 0, size, "FP32", shape)
        check_all_used(binary, size)
        return x
    check_all_used(binary, 0)
    if not raw:
        return _rows_from_json(tensor.get("data"), shape[0], signature.features)
    assert signature.categories is not None
    data = tensor.get("data")
    if not isinstance(data, list):
        raise BadRequestError("expected 'data' to be a list of values")
    return encode(_flat(data, shape[0]), shape[0], signature.categories)


def _flat(data: list[Any], rows: int) -> list[Any]:
    """A BYTES tensor's values, row-major: a flat list or one list per row."""
    if len(data) == rows and all(isinstance(r, list) for r in data):
        return [v for r in data for v in r]
    return data


def _rows_from_json(data: object, rows: int, features: int) -> np.ndarray:
    if not isinstance(data, list):
        raise BadRequestError("expected 'data' to be a list of numbers")
    try:
        arr = np.array(data)
    except ValueError:
        raise BadRequestError("'data' is ragged: rows of different lengths") from None
    if arr.dtype.kind not in "fiu" or arr.size != rows * features:
        raise BadRequestError(f"expected 'data' to hold {rows * features} numbers; got "
                              f"{arr.size} of kind {arr.dtype}")
    with np.errstate(over="ignore"):  # beyond float32 becomes Inf: ServingCore refuses it
        return arr.astype(np.float32).reshape(rows, features)


def _context(params: object) -> dict[str, str] | None:
    """The request's string parameters (where PII such as a customer id may travel).

    Kept only with a sampled request, and only the manifest's PII columns, pseudonymized or
    dropped, ever leave the device (``edge_agent/supervisor.py``)."""
    if not isinstance(params, dict):
        return None
    out = {k: v for k, v in params.items()
           if isinstance(k, str) and isinstance(v, str) and k != "routing_key"}
    if len(out) > MAX_PARAMETERS or any(len(k) > MAX_PARAMETER_NAME_CHARS
                                        or len(v) > MAX_PARAMETER_VALUE_CHARS
                                        for k, v in out.items()):
        raise BadRequestError(f"at most {MAX_PARAMETERS} string parameters, names up to "
                              f"{MAX_PARAMETER_NAME_CHARS} and values up to "
                              f"{MAX_PARAMETER_VALUE_CHARS} characters")
    return out or None


def infer_response(result: InferResult, signature: ModelSignature) -> bytes:
    """The v2 infer response body. Written out by hand: measured ~3 µs faster than
    ``json.dumps`` of the same document; non-finite outputs take the encoder's path."""
    out = result.outputs
    values = out.ravel().tolist()
    if not math.isfinite(math.fsum(values)):
        doc: dict[str, Any] = {
            "model_name": result.model, "model_version": str(result.version),
            "outputs": [{"name": signature.output_name, "datatype": "FP32",
                         "shape": list(out.shape), "data": values}],
        }
        if result.request_id is not None:
            doc["id"] = result.request_id
        return _dump(doc)
    rid = "" if result.request_id is None else f',"id":{_string(result.request_id)}'
    return (f'{{"model_name":{_string(result.model)},"model_version":"{result.version}"{rid},'
            f'"outputs":[{{"name":{_string(signature.output_name)},"datatype":"FP32",'
            f'"shape":[{out.shape[0]},{out.shape[1]}],'
            f'"data":[{",".join(map(float.__repr__, values))}]}}]}}').encode()


def binary_infer_response(result: InferResult, signature: ModelSignature) -> tuple[bytes, int]:
    """(body, length of its JSON part): the answer with the output as binary data (``binary``
    module rules): the JSON document, then the output's little-endian float32 bytes."""
    data = result.outputs.astype("<f4", copy=False).tobytes()
    rid = "" if result.request_id is None else f',"id":{_string(result.request_id)}'
    out = result.outputs
    head = (f'{{"model_name":{_string(result.model)},"model_version":"{result.version}"{rid},'
            f'"outputs":[{{"name":{_string(signature.output_name)},"datatype":"FP32",'
            f'"shape":[{out.shape[0]},{out.shape[1]}],'
            f'"parameters":{{"{BINARY_DATA_SIZE}":{len(data)}}}}}]}}').encode()
    return head + data, len(head)


def _load_json(body: bytes, *, cooperative: bool = False) -> dict[str, Any]:
    """The strict loader: duplicate keys, NaN/Infinity and nesting past ``MAX_JSON_DEPTH`` are
    a 400, not a 500. Its size limit is not the one that counts: the body was read within
    ``max_body_bytes``."""
    try:
        # finite=False: every input number is checked against the manifest after parsing.
        doc = strict_json.loads(body, what="body", max_bytes=len(body), max_depth=MAX_JSON_DEPTH,
                                cooperative=cooperative, finite=False)
    except InvalidInputError as exc:
        raise BadRequestError(str(exc)) from None
    if not isinstance(doc, dict):
        raise BadRequestError(f"expected a JSON object; got {type(doc).__name__}")
    return doc


def _allow(method: str, allowed: str) -> None:
    if method != allowed:
        raise _HttpError(405, f"use {allowed}, not {method}")


def _dump(doc: dict[str, Any]) -> bytes:
    return _ENCODER.encode(doc).encode()


def _error(message: str) -> bytes:
    return _dump({"error": message})




class HttpServer:
    """A running uvicorn server on the caller's loop; ``stop`` closes it."""

    def __init__(self, server: uvicorn.Server, sock: socket.socket,
                 ticker: asyncio.Task[None]) -> None:
        self._server = server
        self._sock = sock
        self._ticker = ticker
        self.port: int = sock.getsockname()[1]
        self.parser: Parser = "h11"

    async def stop(self) -> None:
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._ticker
        await self._server.shutdown(sockets=[self._sock])


def choose_parser(parser: str) -> Parser:
    """The HTTP parser for ``parser`` ("auto": httptools when importable, else h11)."""
    if parser == "auto":
        return "httptools" if parser_available("httptools") else "h11"
    if parser not in ("httptools", "h11") or not parser_available(parser):
        raise InvalidInputError(f"HTTP parser {parser!r} is not available; use auto, h11"
                                f"{' or httptools' if parser_available('httptools') else ''}")
    return "httptools" if parser == "httptools" else "h11"


def _listen(host: str, port: int, backlog: int) -> socket.socket:
    # proto=IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say so, and
    # without it a response written in two parts waits ~40 ms on delayed ACKs (measured).
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


async def start_http(core: ServingCore, host: str = "127.0.0.1", port: int = 0, *,
                     metrics: ServingMetrics | None = None,
                     max_body_bytes: int = MAX_BODY_BYTES,
                     header_timeout_s: float = HEADER_TIMEOUT_S,
                     body_timeout_s: float = BODY_TIMEOUT_S,
                     parser: str = "auto") -> tuple[HttpServer, int]:
    """Serve ``core`` over HTTP on ``host:port`` (0: any free port); return (server, port).
    ``parser``: "auto" (httptools when importable, else h11), "httptools" or "h11"."""
    chosen = choose_parser(parser)
    app = InferenceApp(core, metrics, max_body_bytes=max_body_bytes)
    # No proxy-header middleware: the agent trusts no proxy, and it costs a layer per request.
    # log_config=None: uvicorn's default applies logging.config.dictConfig, which closes every
    # handler of the process (the agent's own, and any a library installed: absl's closes the
    # stream it writes to, sys.stderr included). The agent configures logging; uvicorn's
    # loggers propagate to it.
    config = uvicorn.Config(app, host=host, port=port, lifespan="off", access_log=False,
                            log_config=None, log_level="warning", server_header=False,
                            proxy_headers=False,
                            timeout_graceful_shutdown=5,
                            http=protocol_class(chosen, header_timeout_s, body_timeout_s),
                            h11_max_incomplete_event_size=MAX_HEADER_BYTES,
                            timeout_keep_alive=KEEP_ALIVE_S, limit_concurrency=MAX_CONNECTIONS)
    config.load()
    sock = _listen(host, port, config.backlog)
    server = uvicorn.Server(config)
    # Not Server.serve(): in the main thread that installs its own SIGINT/SIGTERM handlers,
    # and the daemon owns those. These are the steps of Server._serve, minus the signals.
    server.lifespan = config.lifespan_class(config)
    await server.startup(sockets=[sock])
    ticker = asyncio.create_task(server.main_loop(), name="uvicorn-ticker")
    running = HttpServer(server, sock, ticker)
    running.parser = chosen
    trim_heap()  # what importing and setting up the server freed goes back to the OS
    logger.info("inference HTTP listening on %s:%d (%s, %s)", host, running.port, chosen,
                type(asyncio.get_running_loop()).__module__.split(".")[0])
    return running, running.port
