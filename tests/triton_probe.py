"""The real ``tritonclient`` against a running agent, in a process of its own.

Run by ``tests/test_serving_protocol.py`` as ``python -m tests.triton_probe HTTP_PORT GRPC_PORT
MODEL ROWS.npy``: tritonclient.grpc's generated code declares the same protobuf package and
messages (``inference.*``) as the agent's ``grpc_predict_v2.proto``, and one process's default
descriptor pool cannot hold both, so the client cannot share the test's process. It prints one
JSON document: what each call answered, outputs as nested lists.

Every call uses the client's defaults (HTTP: binary tensor data both ways; gRPC: raw
contents), plus the explicit JSON variants for comparison.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np
import tritonclient.grpc as tg
import tritonclient.http as th
from tritonclient.utils import InferenceServerException


def _http(port: int, model: str, x: np.ndarray) -> dict[str, Any]:
    client = th.InferenceServerClient(f"127.0.0.1:{port}")
    out: dict[str, Any] = {
        "live": client.is_server_live(), "ready": client.is_model_ready(model),
        "server": client.get_server_metadata(), "model": client.get_model_metadata(model),
    }
    default = th.InferInput("input", list(x.shape), "FP32")
    default.set_data_from_numpy(x)  # binary_data=True: the client's default
    result = client.infer(model, [default])
    out["default"] = result.as_numpy("probabilities").tolist()
    out["default_response"] = result.get_response()
    requested = client.infer(model, [default], outputs=[th.InferRequestedOutput("probabilities")],
                             request_id="probe-1")
    out["requested_binary"] = requested.as_numpy("probabilities").tolist()
    out["requested_binary_response"] = requested.get_response()
    as_json = th.InferInput("input", list(x.shape), "FP32")
    as_json.set_data_from_numpy(x, binary_data=False)
    result = client.infer(model, [as_json], outputs=[
        th.InferRequestedOutput("probabilities", binary_data=False)])
    out["json"] = result.as_numpy("probabilities").tolist()
    out["json_response"] = result.get_response()
    out["statistics"] = client.get_inference_statistics(model)
    out["index"] = client.get_model_repository_index()
    try:
        client.infer("no-such-model", [default])
        out["unknown_model"] = None
    except InferenceServerException as exc:
        out["unknown_model"] = exc.message()
    client.close()
    return out


def _grpc(port: int, model: str, x: np.ndarray) -> dict[str, Any]:
    client = tg.InferenceServerClient(f"127.0.0.1:{port}")
    out: dict[str, Any] = {
        "live": client.is_server_live(), "ready": client.is_model_ready(model),
        "server": client.get_server_metadata(as_json=True),
        "model": client.get_model_metadata(model, as_json=True),
    }
    tensor = tg.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer(model, [tensor])
    out["default"] = result.as_numpy("probabilities").tolist()
    requested = client.infer(model, [tensor], outputs=[tg.InferRequestedOutput("probabilities")],
                             request_id="probe-2")
    out["requested"] = requested.as_numpy("probabilities").tolist()
    out["requested_response"] = requested.get_response(as_json=True)
    try:
        client.infer("no-such-model", [tensor])
        out["unknown_model"] = None
    except InferenceServerException as exc:
        out["unknown_model"] = exc.status()
    client.close()
    return out


def main(argv: list[str]) -> int:
    http_port, grpc_port, model, rows = int(argv[0]), int(argv[1]), argv[2], argv[3]
    x = np.load(rows).astype(np.float32)
    print(json.dumps({"http": _http(http_port, model, x), "grpc": _grpc(grpc_port, model, x)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
