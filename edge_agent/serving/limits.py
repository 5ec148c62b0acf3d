"""Every limit the serving path puts on a client, in one place (docs/serving.md, "Limits").

A local client is not trusted to be well behaved: whatever it sends, the agent's memory stays
bounded in bytes (not only in entries), other clients keep being served, and every refusal is
a 4xx with a one-line body. The HTTP front end (``http.py``), the gRPC front end
(``grpc_server.py``) and ``ServingCore`` read these names; the tests and docs cite them.
"""

from __future__ import annotations

from edge_agent.serving.errors import BadRequestError, ModelNotFoundError

__all__ = [
    "BACKGROUND_QUEUE_BYTES",
    "BACKGROUND_QUEUE_JOBS",
    "BODY_TIMEOUT_S",
    "FEEDBACK_LOG_BYTES",
    "FEEDBACK_LOG_ENTRIES",
    "HEADER_TIMEOUT_S",
    "KEEP_ALIVE_S",
    "MAX_BODY_BYTES",
    "MAX_CONNECTIONS",
    "MAX_HEADER_BYTES",
    "MAX_HEADER_LENGTH_DIGITS",
    "MAX_JSON_DEPTH",
    "MAX_LABEL_MAGNITUDE",
    "MAX_MESSAGE_BYTES",
    "MAX_MODEL_NAME_CHARS",
    "MAX_PARAMETERS",
    "MAX_PARAMETER_NAME_CHARS",
    "MAX_PARAMETER_VALUE_CHARS",
    "MAX_REQUEST_ID_CHARS",
    "MAX_ROUTING_KEY_CHARS",
    "MAX_SHOWN_CHARS",
    "MAX_VERSION_DIGITS",
    "PARSE_INLINE_MAX_BYTES",
    "shown",
]

# ---------------------------------------------------------------- the connection (HTTP)
MAX_HEADER_BYTES = 16 * 1024  # request line + headers (h11's max incomplete event): else 400
HEADER_TIMEOUT_S = 10.0  # first byte of a request (or the connection) -> its last header: 408
BODY_TIMEOUT_S = 30.0  # last header -> last body byte: 408 (8 MiB over loopback takes ms)
KEEP_ALIVE_S = 5  # an idle keep-alive connection is closed after this (uvicorn)
MAX_CONNECTIONS = 512  # open connections + running requests; past it uvicorn answers 503

# ---------------------------------------------------------------- one request
MAX_BODY_BYTES = 8 * 1024 * 1024  # HTTP body: from Content-Length, and while reading: 413
MAX_MESSAGE_BYTES = MAX_BODY_BYTES  # gRPC message, either way: RESOURCE_EXHAUSTED
# Inference-Header-Content-Length (the binary data extension): a decimal of at most this many
# digits, and at most the body's length: 400
MAX_HEADER_LENGTH_DIGITS = 10
MAX_JSON_DEPTH = 32  # nesting of arrays and objects (a v2 infer body needs 5): 400
PARSE_INLINE_MAX_BYTES = 64 * 1024  # larger bodies are parsed on a worker thread
MAX_REQUEST_ID_CHARS = 256  # "id" of infer and feedback, gRPC ``id``: 400
MAX_ROUTING_KEY_CHARS = 256  # parameters.routing_key, x-routing-key: 400
MAX_MODEL_NAME_CHARS = 128  # a longer name cannot be served: 404 without a lookup
MAX_VERSION_DIGITS = 18  # a version is a positive integer of at most this many digits: 400
MAX_PARAMETERS = 32  # string parameters kept with a sampled request: 400 past any of these
MAX_PARAMETER_NAME_CHARS = 128
MAX_PARAMETER_VALUE_CHARS = 1024
MAX_SHOWN_CHARS = 64  # a client's value quoted in an error message is cut to this
# A regression label (feedback): finite and at most this large, so that the squared errors an
# arm sums stay finite in float64 (1e150 squared is 1e300) whatever a client sends.
MAX_LABEL_MAGNITUDE = 1e150

# ---------------------------------------------------------------- what outlives a request
# The feedback log (request id -> answer, for scoring) and the background queue (copies of
# rows for shadow arms and hooks) are bounded both ways; an entry's bytes are accounted from
# its request id, parameters, sampled rows and shadow answers (``stats.PredictionLog``).
FEEDBACK_LOG_ENTRIES = 100_000
FEEDBACK_LOG_BYTES = 64 * 1024 * 1024  # oldest entries are evicted past either bound
BACKGROUND_QUEUE_JOBS = 4096
BACKGROUND_QUEUE_BYTES = 64 * 1024 * 1024  # past either bound a job is dropped and counted


def shown(value: object) -> str:
    """``repr(value)`` cut to ``MAX_SHOWN_CHARS``: what an error message quotes of a client's
    input (an 8 MiB id must not come back in the 400; ``repr`` keeps it on one line)."""
    if isinstance(value, str | bytes) and len(value) > MAX_SHOWN_CHARS:
        return f"{value[:MAX_SHOWN_CHARS]!r}... ({len(value)} long)"
    text = repr(value)
    return text if len(text) <= MAX_SHOWN_CHARS else f"{text[:MAX_SHOWN_CHARS]}..."


def check_model_name(name: str) -> None:
    """A name over the limit names no served model (the same answer over HTTP and gRPC)."""
    if len(name) > MAX_MODEL_NAME_CHARS:
        raise ModelNotFoundError(f"no model named {shown(name)} is served (names have at most "
                                 f"{MAX_MODEL_NAME_CHARS} characters)")


def parse_version(text: str) -> int:
    """A version from a path or a gRPC field: a positive integer of bounded length."""
    if not text.isdigit() or len(text) > MAX_VERSION_DIGITS or int(text) <= 0:
        raise BadRequestError(f"a version is a positive integer; got {shown(text)}")
    return int(text)
