"""Check an untrusted ONNX model and rewrite it to the bundle's interface.

``load_untrusted`` reads a file under a size limit, parses it without following external data,
refuses external-data locations outside the file's folder, then loads that data (bounded too),
and checks that ONNX Runtime can build a session from it.

``normalize`` rewrites a graph to what agents serve: one float input named ``input`` taking
[batch, features], and one float output (probabilities [batch, classes], or the value
[batch, 1]) under the manifest's name; other outputs (a classifier's label, say) are dropped
with the nodes that only they needed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fleetcore.errors import InvalidInputError

if TYPE_CHECKING:
    import onnx

__all__ = ["MAX_ONNX_BYTES", "check_session", "load_untrusted", "normalize"]

MAX_ONNX_BYTES = 256 * 1024 * 1024  # the model file plus its external data


def _fail(where: str, message: str) -> InvalidInputError:
    return InvalidInputError(f"{where}: {' '.join(message.split())[:300]}")


def load_untrusted(path: Path, *, max_bytes: int | None = None,
                   where: str | None = None) -> onnx.ModelProto:
    import onnx
    from onnx.external_data_helper import load_external_data_for_model, uses_external_data

    limit = MAX_ONNX_BYTES if max_bytes is None else max_bytes
    where = where or str(path)
    try:
        size = os.stat(path).st_size
    except OSError as exc:
        raise _fail(where, f"cannot read it: {exc.strerror}") from None
    if not path.is_file():
        raise _fail(where, "not a regular file")
    if size > limit:
        raise _fail(where, f"{size} bytes; the limit is {limit}")
    try:
        model = onnx.load_model_from_string(path.read_bytes())
    except Exception as exc:  # protobuf's DecodeError and friends
        raise _fail(where, f"not an ONNX model ({type(exc).__name__})") from None
    if not model.graph.node and not model.graph.output:
        raise _fail(where, "not an ONNX model (no graph)")
    folder = path.resolve().parent
    external = 0
    tensors = [*model.graph.initializer,
               *(a.t for n in model.graph.node for a in n.attribute if a.HasField("t"))]
    for tensor in tensors:
        if not uses_external_data(tensor):
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        target = (folder / location).resolve()
        if not location or os.path.isabs(location) or not target.is_relative_to(folder):
            raise _fail(where, f"initializer {tensor.name!r} keeps its data at {location!r}, "
                               f"outside the model's folder {folder}")
        if not target.is_file():
            raise _fail(where, f"initializer {tensor.name!r}: external data file {location!r} "
                               "does not exist")
        external += target.stat().st_size
        if size + external > limit:
            raise _fail(where, f"with its external data more than {limit} bytes")
    if external:
        try:
            load_external_data_for_model(model, str(folder))
        except Exception as exc:
            raise _fail(where, f"cannot load its external data: {exc}") from None
    check_session(model, where)
    return model


def check_session(model: onnx.ModelProto, where: str) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    try:
        return ort.InferenceSession(model.SerializeToString(), opts,
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise _fail(where, f"ONNX Runtime cannot load it: {exc}") from None


def _dims(value_info: Any) -> list[int | None] | None:
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]


def _is_float(value_info: Any) -> bool:
    import onnx

    return bool(value_info.type.HasField("tensor_type")
                and value_info.type.tensor_type.elem_type == onnx.TensorProto.FLOAT)


def _fits_output(dims: list[int | None] | None, task: str, classes: int) -> bool:
    if dims is None:
        return True  # unknown statically; checked on real rows afterwards
    if task == "classification":
        return len(dims) == 2 and dims[1] in (classes, None)
    return (len(dims) == 2 and dims[1] in (1, None)) or len(dims) == 1


def _rename(graph: Any, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
        node.output[:] = [new if n == old else n for n in node.output]
    for vi in (*graph.input, *graph.output, *graph.value_info):
        if vi.name == old:
            vi.name = new


def normalize(model: onnx.ModelProto, *, task: str, features: int, classes: int,
              input_name: str | None, output_name: str | None, out_name: str,
              where: str) -> tuple[onnx.ModelProto, str, str]:
    """The graph rewritten to one input ``input`` [?, features] and one float output
    ``out_name`` ([?, classes] or [?, 1]), with the original input and output names chosen;
    InvalidInputError says what does not fit."""
    import onnx


    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    inp = _pick_input(graph, inits, input_name, features, where)
    out = _pick_output(graph, output_name, task, classes, where)
    chosen_in, chosen_out = inp.name, out.name
    _wire(graph, inits, inp, out, out_name, task, classes)
    return model, chosen_in, chosen_out


def _pick_input(graph: Any, inits: set[str], input_name: str | None, features: int,
                where: str) -> Any:
    inputs = [i for i in graph.input if i.name not in inits]
    if input_name is not None:
        inputs = [i for i in inputs if i.name == input_name]
        if not inputs:
            raise _fail(where, f"no graph input named {input_name!r} (model.input)")
    if len(inputs) != 1:
        raise _fail(where, f"{len(inputs)} graph inputs "
                           f"({', '.join(i.name for i in inputs)}); the bundle feeds one "
                           "(name it with model.input)")
    inp = inputs[0]
    dims = _dims(inp)
    if not _is_float(inp) or dims is None or len(dims) != 2 or dims[1] != features:
        raise _fail(where, f"input {inp.name!r} is {_describe(inp)}; expected float "
                           f"[batch, {features}] (the snapshot has {features} features)")
    if dims[0] is not None:
        raise _fail(where, f"input {inp.name!r} has a fixed batch size {dims[0]}; export it "
                           "with a dynamic batch dimension")
    return inp


def _pick_output(graph: Any, output_name: str | None, task: str, classes: int,
                 where: str) -> Any:
    candidates = list(graph.output)
    if output_name is not None:
        candidates = [o for o in candidates if o.name == output_name]
        if not candidates:
            raise _fail(where, f"no graph output named {output_name!r} (model.output); it has "
                               f"{', '.join(o.name for o in graph.output)}")
    fitting = [o for o in candidates
               if _is_float(o) and _fits_output(_dims(o), task, classes)]
    want = (f"float [batch, {classes}] (probabilities of the {classes} classes)"
            if task == "classification" else "float [batch, 1] or [batch] (the value)")
    if len(fitting) != 1:
        found = "; ".join(f"{o.name!r} {_describe(o)}" for o in candidates)
        raise _fail(where, f"{'no' if not fitting else 'more than one'} output fits {want} "
                           f"(outputs: {found}); "
                           + ("name one with model.output" if fitting
                              else "check data.task and the model"))
    return fitting[0]


def _wire(graph: Any, inits: set[str], inp: Any, out: Any, out_name: str, task: str,
          classes: int) -> None:
    """Rename the input to ``input``; expose ``out`` (reshaped to [?, 1] for regression) as
    the one output ``out_name``; drop what only other outputs needed."""
    import onnx
    from onnx import helper

    from trainer.onnx_tools import INPUT_NAME

    # Free the two names the bundle uses, then wire them.
    for name, keep in ((INPUT_NAME, inp.name), (out_name, out.name)):
        taken = {n for node in graph.node for n in (*node.input, *node.output)} | \
            {v.name for v in (*graph.input, *graph.output, *graph.value_info)} | inits
        if name in taken and name != keep:
            _rename(graph, name, f"{name}__orig")
    _rename(graph, inp.name, INPUT_NAME)
    src = out.name
    dims_out = _dims(out)
    if src != out_name or (dims_out is not None and len(dims_out) == 1):
        if (dims_out is not None and len(dims_out) == 1) or task == "regression":
            shape = helper.make_tensor(f"{out_name}__shape", onnx.TensorProto.INT64, [2],
                                       [-1, 1 if task == "regression" else classes])
            graph.initializer.append(shape)
            graph.node.append(helper.make_node("Reshape", [src, shape.name], [out_name]))
        else:
            graph.node.append(helper.make_node("Identity", [src], [out_name]))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(
        out_name, onnx.TensorProto.FLOAT, ["batch", 1 if task == "regression" else classes]))
    _drop_dead_nodes(graph)


def _describe(vi: Any) -> str:
    import onnx

    t = vi.type.tensor_type if vi.type.HasField("tensor_type") else None
    if t is None:
        return "not a tensor"
    dtype = onnx.TensorProto.DataType.Name(t.elem_type).lower()
    dims = _dims(vi)
    return f"{dtype} {['?' if d is None else d for d in dims] if dims is not None else '[?]'}"


def _drop_dead_nodes(graph: Any) -> None:
    while True:
        needed = {o.name for o in graph.output}
        for node in graph.node:
            needed.update(node.input)
        dead = [n for n in graph.node if not any(o in needed for o in n.output if o)]
        if not dead:
            return
        for node in dead:
            graph.node.remove(node)
