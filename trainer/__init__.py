"""The Edgefleet trainer: data to a signed, compressed model bundle.

The ``trainer`` command runs the pipeline (``pipeline``: ingest -> train -> evaluate ->
compress -> export -> profile -> bundle) over a content-addressed feature store (``store``,
``sources``, device ``samples``): deterministic PyTorch training with optional DDP (``train``,
``models``), structured pruning and int8 quantization (``prune``, ``onnx_tools``), ONNX and
optional TFLite export (``tflite``), the drift profile (``profile``) and the signed bundle
(``bundle``).
"""

__all__: list[str] = []
