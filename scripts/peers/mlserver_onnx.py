"""An MLServer custom runtime serving an ONNX file with ONNX Runtime (a peer in ``make bench``).

Loaded by ``mlserver start DIR`` in its own virtualenv (``.bench/mlserver``); DIR holds
``settings.json`` and ``model-settings.json`` (``scripts/bench_peers.py`` writes them, with
``"implementation": "mlserver_onnx.OnnxModel"`` and the model's path as ``parameters.uri``).
The session has the agent's options: one intra-op thread, sequential, spinning off, all
graph optimisations.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxModel(MLModel):
    async def load(self) -> bool:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(self.settings.parameters.uri, opts,
                                            providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.output = self.session.get_outputs()[0].name
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32, copy=False)
        out = self.session.run([self.output], {self.input: x})[0]
        return InferenceResponse(model_name=self.name, id=payload.id,
                                 outputs=[NumpyCodec.encode_output(self.output, out)])
