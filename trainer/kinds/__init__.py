"""One module per model kind behind a small common interface (``Kind``).

* ``torchnet`` - mlp, cnn and torch (the user's own ``nn.Module``): trained here with PyTorch,
  pruned, quantized, exported to ONNX (and TFLite).
* ``sklearn_kind`` - a scikit-learn estimator, trained here, converted with skl2onnx.
* ``onnx_import`` - an ONNX model trained elsewhere; checked and imported, never trained.

The last two share ``onnx_family``: their train step leaves an fp32 ONNX graph, and compress,
export and evaluate work on ONNX only.

Only this package's ``__init__`` is imported by the pipeline at module level; each kind imports
its heavy libraries inside the functions that need them.
"""

from __future__ import annotations

from trainer.kinds.base import Kind, RunContext

__all__ = ["Kind", "RunContext", "kind_of"]


def kind_of(name: str) -> Kind:
    if name in ("mlp", "cnn", "torch"):
        from trainer.kinds import torchnet

        return torchnet.TorchKind()
    if name == "sklearn":
        from trainer.kinds import sklearn_kind

        return sklearn_kind.SklearnKind()
    if name == "onnx":
        from trainer.kinds import onnx_import

        return onnx_import.OnnxKind()
    raise ValueError(f"unknown model kind {name!r}")
