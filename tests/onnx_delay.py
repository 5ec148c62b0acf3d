"""Test models that are slow on purpose: a real ONNX graph with a Loop in front of a model.

``delay_model(src, dst, iterations)`` feeds the model's input through a Loop that runs
``iterations`` times (each one adds zero), so the outputs are exactly the model's and only the
time differs: a few thousand iterations make a deliberately slower model, 10^12 one that
never finishes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["HANG", "bloat_model", "delay_model", "delayed_bundle"]

HANG = 10**12  # iterations: far beyond any time limit


def _in_front(graph: onnx.GraphProto, suffix: str) -> tuple[str, str]:
    """Make every node read the model's input from a new name; return (input, new name) for
    the nodes put in front to produce it."""
    source = graph.input[0].name
    renamed = f"{source}__{suffix}"
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == source:
                node.input[i] = renamed
    return source, renamed


def delay_model(src: Path, dst: Path, iterations: int) -> None:
    model = onnx.load(str(src))
    graph = model.graph
    source, delayed = _in_front(graph, "delayed")
    for out in graph.output:  # a model that outputs its input unchanged is not expected here
        assert out.name != source
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Add", ["v_in", "zero"], ["v_out"])],
        "delay_body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.zeros((), np.float32), "zero")],
    )
    nodes = [
        helper.make_node("Constant", [], ["delay_trip"],
                         value=numpy_helper.from_array(np.array(iterations, np.int64))),
        helper.make_node("Constant", [], ["delay_cond"],
                         value=numpy_helper.from_array(np.array(True))),
        helper.make_node("Loop", ["delay_trip", "delay_cond", source], [delayed], body=body),
    ]
    for node in reversed(nodes):
        graph.node.insert(0, node)
    onnx.save(model, str(dst))


def bloat_model(src: Path, dst: Path, floats: int) -> None:
    """``src`` with ``floats`` float32 zeros allocated in front of it and summed into its
    input times zero: the same outputs, ``4 * floats`` bytes more memory."""
    model = onnx.load(str(src))
    graph = model.graph
    source, bloated = _in_front(graph, "bloated")
    nodes = [
        helper.make_node("Constant", [], ["bloat_shape"],
                         value=numpy_helper.from_array(np.array([floats], np.int64))),
        helper.make_node("ConstantOfShape", ["bloat_shape"], ["bloat_zeros"],
                         value=numpy_helper.from_array(np.zeros(1, np.float32))),
        helper.make_node("ReduceSum", ["bloat_zeros"], ["bloat_sum"], keepdims=0),
        helper.make_node("Add", [source, "bloat_sum"], [bloated]),
    ]
    for node in reversed(nodes):
        graph.node.insert(0, node)
    onnx.save(model, str(dst))


def delayed_bundle(source: Path, dest: Path, version: int, iterations: int,
                   **smoke_test: object) -> Path:
    """A copy of ``source`` (a bundle) as ``version`` whose model.onnx is delayed, with the
    manifest's file table updated and ``smoke_test`` fields set; unsigned."""
    shutil.copytree(source, dest)
    (dest / "model.sig").unlink(missing_ok=True)
    delay_model(source / "model.onnx", dest / "model.onnx", iterations)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["version"] = version
    manifest["smoke_test"].update(smoke_test)
    data = (dest / "model.onnx").read_bytes()
    if "files" in manifest:
        manifest["files"]["model.onnx"] = {"sha256": hashlib.sha256(data).hexdigest(),
                                           "size": len(data)}
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return dest
