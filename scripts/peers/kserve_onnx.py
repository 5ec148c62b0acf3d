"""KServe's ModelServer serving an ONNX file with ONNX Runtime (a peer in ``make bench``).

Runs in its own virtualenv (``.bench/kserve``, ``scripts/bench_peers.py`` makes it), so it
imports nothing of this project: ``python kserve_onnx.py MODEL.onnx NAME HTTP_PORT GRPC_PORT``.
The session has the agent's options for a fair comparison: one intra-op thread, sequential,
spinning off, all graph optimisations.
"""

from __future__ import annotations

import sys
import uuid

import kserve
import numpy as np
import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse


def session(path: str) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


class OnnxModel(kserve.Model):
    def __init__(self, name: str, path: str) -> None:
        super().__init__(name)
        self.path = path
        self.session: ort.InferenceSession | None = None
        self.load()

    def load(self) -> bool:
        self.session = session(self.path)
        self.input = self.session.get_inputs()[0].name
        self.output = self.session.get_outputs()[0].name
        self.ready = True
        return self.ready

    def predict(self, payload: InferRequest, headers: dict[str, str] | None = None,
                response_headers: dict[str, str] | None = None) -> InferResponse:
        x = payload.inputs[0].as_numpy().astype(np.float32, copy=False)
        assert self.session is not None
        out = self.session.run([self.output], {self.input: x})[0]
        result = InferOutput(name=self.output, shape=list(out.shape), datatype="FP32")
        result.set_data_from_numpy(out, binary_data=False)
        return InferResponse(model_name=self.name, infer_outputs=[result],
                             response_id=payload.id or str(uuid.uuid4()))


if __name__ == "__main__":
    path, name, http_port, grpc_port = sys.argv[1:5]
    sys.argv = [sys.argv[0]]  # ModelServer parses the command line itself
    kserve.ModelServer(http_port=int(http_port), grpc_port=int(grpc_port),
                       workers=1).start([OnnxModel(name, path)])
