"""The Open Inference Protocol's binary tensor data extension (HTTP), both ways.

A request that carries binary tensors has the header ``Inference-Header-Content-Length: N``:
the first N bytes of the body are the JSON document, the rest is the tensors' raw bytes, one
after another in the order of the inputs that say ``"parameters": {"binary_data_size": K}``
(such an input has no ``data``). A response is binary when the requested output says
``"parameters": {"binary_data": true}``, or, when it says nothing, when the request's
``parameters.binary_data_output`` is true; it then carries the same header and its output
gives ``binary_data_size`` instead of ``data``. Tensors are little-endian, row-major.

Rules (every refusal is a ``BadRequestError``, a 400, quoting at most ``MAX_SHOWN_CHARS``):

* The header is a decimal integer of at most ``MAX_HEADER_LENGTH_DIGITS`` digits, no sign, at
  most the body's length. The JSON part is parsed by the same strict loader and checked by the
  same rules as a JSON-only request (``http.parse_infer_request``); the body as a whole was
  already read within ``max_body_bytes``.
* ``binary_data_size`` is a non-negative integer (not a boolean); the sizes of the inputs must
  add up to exactly the bytes after the JSON part (no trailing bytes), and each input's size
  must be its shape's element count times its datatype's width. An input gives either
  ``binary_data_size`` or ``data``, not both.
* Nothing is copied that need not be: an input's rows are a read-only view of the body's bytes
  when they are aligned float32 on a little-endian host (``ServingCore`` copies what it keeps).
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from edge_agent.serving.errors import BadRequestError
from edge_agent.serving.limits import MAX_HEADER_LENGTH_DIGITS, shown

__all__ = [
    "BINARY_DATA",
    "BINARY_DATA_OUTPUT",
    "BINARY_DATA_SIZE",
    "DATATYPE_BYTES",
    "HEADER",
    "binary_size",
    "check_all_used",
    "split_body",
    "tensor_from_bytes",
    "wants_binary_output",
]

HEADER = b"inference-header-content-length"  # as ASGI gives it: lower case
BINARY_DATA_SIZE = "binary_data_size"
BINARY_DATA = "binary_data"
BINARY_DATA_OUTPUT = "binary_data_output"
# The datatypes the agent serves, and their width in bytes (every model takes and gives FP32).
DATATYPE_BYTES = {"FP32": 4}
_NUMPY = {"FP32": np.dtype("<f4")}
_LITTLE = sys.byteorder == "little"


def split_body(body: bytes, header_length: bytes | None) -> tuple[bytes, memoryview | None]:
    """(the JSON part, the binary part or None) of a body, by the header's value."""
    if header_length is None:
        return body, None
    text = header_length.strip()
    if not text.isdigit() or len(text) > MAX_HEADER_LENGTH_DIGITS:
        raise BadRequestError(f"Inference-Header-Content-Length must be a non-negative "
                              f"integer; got {shown(header_length)}")
    length = int(text)
    if length > len(body):
        raise BadRequestError(f"Inference-Header-Content-Length is {length}; the body has only "
                              f"{len(body)} bytes")
    view = memoryview(body)
    return bytes(view[:length]), view[length:]


def binary_size(tensor: dict[str, Any]) -> int | None:
    """The tensor's ``parameters.binary_data_size``, None when it has none."""
    params = tensor.get("parameters")
    if params is None:
        return None
    if not isinstance(params, dict):
        raise BadRequestError(f"expected a tensor's 'parameters' to be an object; got "
                              f"{shown(params)}")
    size = params.get(BINARY_DATA_SIZE)
    if size is None:
        return None
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise BadRequestError(f"binary_data_size must be a non-negative integer; got "
                              f"{shown(size)}")
    if "data" in tensor:
        raise BadRequestError("an input gives either 'data' or parameters.binary_data_size, "
                              "not both")
    return size


def tensor_from_bytes(binary: memoryview | None, offset: int, size: int, datatype: str,
                      shape: list[int]) -> np.ndarray:
    """The tensor of ``shape`` at ``binary[offset:offset + size]`` (sizes checked here)."""
    if binary is None:
        raise BadRequestError("an input says binary_data_size, but the request has no "
                              "Inference-Header-Content-Length header (no binary part)")
    width = DATATYPE_BYTES[datatype]
    count = 1
    for dim in shape:
        count *= dim
    if size != count * width:
        raise BadRequestError(f"binary_data_size is {size}; shape {shown(shape)} of {datatype} "
                              f"takes {count * width} bytes")
    if offset + size > len(binary):
        raise BadRequestError(f"the binary part has {len(binary)} bytes; the inputs declare at "
                              f"least {offset + size}")
    arr = np.frombuffer(binary, dtype=_NUMPY[datatype], count=count, offset=offset)
    if not (_LITTLE and arr.flags.aligned):
        arr = arr.astype(arr.dtype.newbyteorder("="))  # a native, aligned copy
    return arr.reshape(shape)


def check_all_used(binary: memoryview | None, used: int) -> None:
    """Every byte of the binary part belongs to an input: trailing bytes are a 400."""
    if binary is not None and used != len(binary):
        raise BadRequestError(f"the binary part has {len(binary)} bytes; the inputs declare "
                              f"{used}")


def wants_binary_output(request_params: object, output: dict[str, Any] | None) -> bool:
    """Whether the (one) output goes back as binary data (module rules)."""
    default = False
    if isinstance(request_params, dict) and BINARY_DATA_OUTPUT in request_params:
        default = _flag(request_params[BINARY_DATA_OUTPUT], BINARY_DATA_OUTPUT)
    if output is None:
        return default
    params = output.get("parameters")
    if params is None:
        return default
    if not isinstance(params, dict):
        raise BadRequestError(f"expected an output's 'parameters' to be an object; got "
                              f"{shown(params)}")
    if BINARY_DATA in params:
        return _flag(params[BINARY_DATA], BINARY_DATA)
    return default


def _flag(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise BadRequestError(f"{name} must be true or false; got {shown(value)}")
    return value
