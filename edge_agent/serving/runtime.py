"""Model runtimes: one loaded bundle version that turns rows into class probabilities (a
classifier) or into one value per row (a regression model: ``task = "regression"``).

Rules:

* ``Runtime.predict(x)`` takes float32 ``[n, features]`` (already checked by the caller) and
  returns float32 ``[n, classes]`` (``[n, 1]`` for regression: ``classes`` is the output's
  width). It is safe to call from several threads at once.
* ONNX Runtime is the default. LiteRT runs ``model.tflite`` when the bundle carries one and the
  manifest's ``runtime.preferred`` or the caller's ``prefer`` says "tflite"; when no LiteRT
  interpreter is installed (the ``agent`` extra does not pull one in) it falls back to ONNX
  Runtime with a warning.
* LiteRT has no dynamic batch: a bundle's model.tflite has one signature per batch size (``b1``,
  ``b64``). Full batches of 64 go through b64; the rest goes row by row through b1, unless the
  remainder is at least ``t(b64) / t(b1)`` rows (measured at load), in which case it is padded
  to 64 and sliced, which is then cheaper. An interpreter is not thread-safe, so calls take a
  lock.
* Hardware fit (docs/serving.md, "Hardware fit"): intra-op threads are the manifest's, clamped
  to the cores this process may use (``usable_cores``: its CPU affinity, so a container's or
  taskset's limit counts, not the machine's core count); graph optimisation ``ORT_ENABLE_ALL``
  (which includes the layout passes specific to the host's instruction set). A bundle may offer
  several ONNX files for one version (``runtime.onnx.variants``, e.g. int8 and fp32): each is
  loaded, checked against the manifest's smoke test, timed here, and the fastest that passes is
  served (``_fastest_variant``); the runtime says which (``file``, ``precision``, ``variants``).
* Every runtime runs one warm-up row at load, so the first request after a switch is not slow,
  and remembers ``row_latency_s`` (median of a few one-row runs) for the inline-or-thread
  decision of the front ends.

ONNX Runtime session options, measured on the 2-core development host (shared Intel Xeon VM)
with ``python -m scripts.bench_agent_serving session-options MODEL.onnx``, ranges over 2-3 runs:
median µs of one ``run`` at batch 1 and 64, and runs/s of batch 1 with two caller threads
sharing the session. "tiny": the digits MLP of the tests (1.8k parameters, dynamic int8);
"1.1M": a 64-1024-1024-10 fp32 MLP.

===============  ==========  ===========  ==========  ===========  ===============
threads / spin   tiny b1     tiny b64     1.1M b1     1.1M b64     1.1M 2 callers
===============  ==========  ===========  ==========  ===========  ===============
1 / on           8.0-8.2     13.7-14.7    167-189     809-877      10.8k-12.6k/s
1 / off          8.1-8.7     13.8-14.0    161-170     813-852      12.0k-13.2k/s
2 / on           8.3-8.4     17.2-21.0    59-60       468-477      12.3k-14.1k/s
2 / off          8.3-8.4     18.4-19.3    121-124     588-618      10.3k-11.9k/s
===============  ==========  ===========  ==========  ===========  ===============

(The tiny model's two-caller rate is GIL-bound: 54k-100k/s in every setting, no signal.)

Chosen: spinning off, and the manifest's ``runtime.onnx.intra_op_num_threads`` (the trainer
writes 1; clamped to the host's cores). One thread is best for small models (a second costs
25-40% at batch 64) and loses nothing in throughput once requests overlap; a second thread
pays only for a big model's lone requests, which is the publisher's call. Two spinning
threads are fastest for a lone big request but give no more throughput under load and keep a
core busy between requests on a host that runs other things. With one thread there is no
pool, so spinning is moot; it is switched off explicitly for the multi-thread case.

Weight prepacking (ONNX Runtime's ``session.disable_prepacking``): ORT copies each MatMul's
weights into a GEMM-friendly layout at load and keeps both copies. On the 1.1M-parameter fp32
MLP that is +4.3 MiB resident (18.8 vs 14.5 MiB for the session) for no gain at one row per
call (237 vs 238 µs median) and an 18% gain at 64 rows (1.17 vs 1.43 ms), measured on the
2-core host with ``python -m scripts.bench_agent_serving prepack MODEL.onnx``.
Chosen: off unless the model
runs batches, i.e. on when the manifest asks for dynamic batching (``runtime.batching``) or
sets ``runtime.onnx.prepack = true`` (a publisher whose clients send many rows per request).
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import onnxruntime as ort

from fleetcore.bundle import MODEL_ONNX, MODEL_TFLITE, manifest_task
from fleetcore.errors import InvalidInputError

__all__ = [
    "INTRA_OP_THREADS",
    "OnnxRuntime",
    "Runtime",
    "RuntimeKind",
    "TfliteRuntime",
    "io_names",
    "litert_interpreter_class",
    "load_runtime",
    "model_dims",
    "onnx_session",
    "usable_cores",
]

logger = logging.getLogger(__name__)

RuntimeKind = Literal["onnx", "tflite"]
INTRA_OP_THREADS = 1  # the default; see the table above
_ORT_LOG_ERROR = 3
_TIMED_ROWS = 5  # one-row runs timed at load for ``row_latency_s``
_TFLITE_BATCH = 64
_MAX_VARIANTS = 4  # ONNX files a bundle may offer for one version (the rest are ignored)


class Runtime(Protocol):
    """A loaded model version; ``predict`` is thread-safe."""

    kind: RuntimeKind
    version: int
    features: int
    classes: int
    row_latency_s: float  # median of a one-row predict, measured at load

    def predict(self, x: np.ndarray) -> np.ndarray: ...


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's or a taskset's
    limit), not the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity call on this platform
        return os.cpu_count() or 1


def onnx_session(path: Path, *, threads: int = INTRA_OP_THREADS,
                 spinning: bool = False, prepack: bool = True) -> ort.InferenceSession:
    """An ONNX Runtime CPU session with the serving options (see the module docstring)."""
    opts = ort.SessionOptions()
    if not prepack:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = _ORT_LOG_ERROR
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class OnnxRuntime:
    kind: RuntimeKind = "onnx"
    graph_optimization = "all"  # ORT_ENABLE_ALL: includes the host-specific layout passes

    def __init__(self, path: Path, version: int, features: int, classes: int,
                 input_name: str, output_name: str, threads: int = INTRA_OP_THREADS,
                 precision: str = "", prepack: bool = True) -> None:
        self.version = version
        self.features = features
        self.classes = classes
        self.threads = threads
        self.prepack = prepack
        self.file = path.name
        self.precision = precision  # as the manifest names it ("" when it does not)
        self.variants: dict[str, Any] = {}  # what load_runtime measured of each candidate
        self._session = onnx_session(path, threads=threads, prepack=prepack)
        self._outputs = [output_name]
        self._input = input_name
        self._run = self._session.run
        self.row_latency_s = _warm_up(self)

    def predict(self, x: np.ndarray) -> np.ndarray:
        out: np.ndarray = self._run(self._outputs, {self._input: x})[0]
        return out


def litert_interpreter_class() -> Any | None:
    """LiteRT's ``Interpreter``, else tflite-runtime's (docs/design.md §1), else None."""
    for module in ("ai_edge_litert.interpreter", "tflite_runtime.interpreter"):
        try:
            return importlib.import_module(module).Interpreter
        except ImportError:
            continue
    return None


class TfliteRuntime:
    kind: RuntimeKind = "tflite"

    def __init__(self, path: Path, version: int, features: int, classes: int,
                 spec: dict[str, Any], interpreter_class: Any) -> None:
        self.version = version
        self.features = features
        self.classes = classes
        self._input = str(spec.get("input", "args_0"))
        self._output = str(spec.get("output", "output_0"))
        interpreter = interpreter_class(model_path=str(path), num_threads=INTRA_OP_THREADS)
        names = set(interpreter.get_signature_list())
        if not {"b1", "b64"} <= names:
            raise InvalidInputError(f"{path}: expected signatures b1 and b64; found "
                                    f"{sorted(names)}")
        self._b1 = interpreter.get_signature_runner("b1")
        self._b64 = interpreter.get_signature_runner("b64")
        self._interpreter = interpreter  # the runners need it alive
        self._lock = threading.Lock()
        self._pad_from = _TFLITE_BATCH  # never pad until measured below
        self.row_latency_s = _warm_up(self)
        t64 = _median_time(lambda: self.predict(np.zeros((64, features), np.float32)))
        self._pad_from = max(1, min(_TFLITE_BATCH, math.ceil(t64 / max(self.row_latency_s,
                                                                        1e-9))))

    def predict(self, x: np.ndarray) -> np.ndarray:
        n = x.shape[0]
        full = n - n % _TFLITE_BATCH
        rest = n - full
        parts: list[np.ndarray] = []
        with self._lock:
            for i in range(0, full, _TFLITE_BATCH):
                parts.append(self._b64(**{self._input: x[i:i + _TFLITE_BATCH]})[self._output])
            if rest >= self._pad_from:
                padded = np.zeros((_TFLITE_BATCH, x.shape[1]), np.float32)
                padded[:rest] = x[full:]
                parts.append(self._b64(**{self._input: padded})[self._output][:rest])
            else:
                for i in range(full, n):
                    parts.append(self._b1(**{self._input: x[i:i + 1]})[self._output])
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


def load_runtime(bundle_dir: Path, manifest: dict[str, Any], *,
                 prefer: str = "onnx") -> Runtime:
    """Load the runtime for one bundle version (see the module rules for the choice)."""
    bundle_dir = Path(bundle_dir)
    version = int(manifest["version"])
    features, classes = model_dims(manifest)
    runtime_spec = _section(manifest, "runtime")
    tflite_spec = _section(runtime_spec, "tflite")
    tflite_path = _bundle_file(bundle_dir, tflite_spec.get("file", MODEL_TFLITE))
    wants_tflite = "tflite" in (prefer, runtime_spec.get("preferred"))
    if wants_tflite and tflite_path.is_file():
        interpreter_class = litert_interpreter_class()
        if interpreter_class is not None:
            return TfliteRuntime(tflite_path, version, features, classes, tflite_spec,
                                 interpreter_class)
        logger.warning("%s v%d prefers LiteRT but no interpreter is installed; using ONNX "
                       "Runtime", manifest.get("name"), version)
    onnx_spec = _section(runtime_spec, "onnx")
    threads = onnx_spec.get("intra_op_num_threads", INTRA_OP_THREADS)
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        threads = INTRA_OP_THREADS
    input_name, output_name = io_names(manifest)
    threads = min(threads, usable_cores())
    prepack = wants_prepacking(manifest)
    candidates = _variants(onnx_spec)
    if len(candidates) == 1:
        file, precision = candidates[0]
        return OnnxRuntime(_bundle_file(bundle_dir, file), version, features, classes,
                           input_name, output_name, threads=threads, precision=precision,
                           prepack=prepack)
    return _fastest_variant(bundle_dir, manifest, candidates, features, classes, input_name,
                            output_name, threads, prepack)


def wants_prepacking(manifest: dict[str, Any]) -> bool:
    """Whether the model runs batches: ``runtime.onnx.prepack`` when it is a bool, else
    whether the manifest asks for dynamic batching (module docstring)."""
    runtime_spec = _section(manifest, "runtime")
    asked = _section(runtime_spec, "onnx").get("prepack")
    if isinstance(asked, bool):
        return asked
    return isinstance(runtime_spec.get("batching"), dict)


def _variants(onnx_spec: dict[str, Any]) -> list[tuple[str, str]]:
    """(file, precision) of the main ONNX file and of each ``runtime.onnx.variants`` entry
    (``[{"file": "model.fp32.onnx", "precision": "fp32"}, ...]``), in that order."""
    main = onnx_spec.get("file", MODEL_ONNX)
    precision = onnx_spec.get("precision", "")
    out = [(main, precision if isinstance(precision, str) else "")]
    listed = onnx_spec.get("variants")
    for entry in listed if isinstance(listed, list) else []:
        if isinstance(entry, dict) and isinstance(entry.get("file"), str):
            label = entry.get("precision", "")
            if entry["file"] not in {f for f, _ in out}:
                out.append((entry["file"], label if isinstance(label, str) else ""))
    return out[:_MAX_VARIANTS]


def _fastest_variant(bundle_dir: Path, manifest: dict[str, Any],
                     candidates: list[tuple[str, str]], features: int, classes: int,
                     input_name: str, output_name: str, threads: int,
                     prepack: bool = True) -> OnnxRuntime:
    """Load each variant, check it against the manifest's smoke test (the main file passed
    it in the install's isolated child; a variant that does not is skipped), time it on this
    host (median one-row ``predict`` and smoke batch), and keep the fastest by the one-row
    time. The others are let go."""
    spec = _section(manifest, "smoke_test")
    best: OnnxRuntime | None = None
    report: dict[str, Any] = {}
    for file, precision in candidates:
        try:
            runtime = OnnxRuntime(_bundle_file(bundle_dir, file), int(manifest["version"]),
                                  features, classes, input_name, output_name,
                                  threads=threads, precision=precision,
                                  prepack=prepack)
            reason = _smoke_mismatch(runtime, spec)
        except Exception as exc:  # a variant that does not load is not served
            report[file] = {"precision": precision, "accepted": False,
                            "reason": f"{type(exc).__name__}: {exc}"[:200]}
            continue
        entry: dict[str, Any] = {"precision": precision, "accepted": reason is None,
                                 "row_latency_us": round(runtime.row_latency_s * 1e6, 2)}
        if reason is not None:
            entry["reason"] = reason
        report[file] = entry
        if reason is None and (best is None or runtime.row_latency_s < best.row_latency_s):
            best = runtime
    if best is None:
        raise InvalidInputError(f"{manifest.get('name')} v{manifest.get('version')}: no ONNX "
                                f"variant passes the smoke test: {report}")
    best.variants = report
    logger.info("%s v%s serves %s (%s) of %s", manifest.get("name"), manifest.get("version"),
                best.file, best.precision or "?", report)
    return best


def _smoke_mismatch(runtime: OnnxRuntime, spec: dict[str, Any]) -> str | None:
    """Why ``runtime`` fails the manifest's smoke test (outputs within ``atol`` of expected,
    the same class per row if asked), or None when it passes (or there is none to run)."""
    inputs, expected = spec.get("inputs"), spec.get("expected")
    if not isinstance(inputs, list) or not isinstance(expected, list):
        return None
    x = np.ascontiguousarray(np.asarray(inputs, dtype=np.float32))
    want = np.asarray(expected, dtype=np.float64)
    got = np.asarray(runtime.predict(x), dtype=np.float64)
    atol = float(spec.get("atol", 0.0))
    if got.shape != want.shape or not np.allclose(got, want, atol=atol, rtol=0.0):
        return f"outputs differ from the smoke test's expected (atol {atol:g})"
    if spec.get("require_same_argmax") and not (got.argmax(-1) == want.argmax(-1)).all():
        return "a predicted class differs from the smoke test's"
    return None


def model_dims(manifest: dict[str, Any]) -> tuple[int, int]:
    """(features, outputs) from a manifest: ``input.shape[1]`` or the feature list's length;
    the number of classes, or 1 for a regression model (one value per row)."""
    section = manifest["input"]
    shape = section.get("shape")
    if isinstance(shape, list) and len(shape) == 2 and isinstance(shape[1], int) and shape[1] > 0:
        features = shape[1]
    else:
        features = len(section["features"])
    if manifest_task(manifest) == "regression":
        return features, 1
    return features, len(manifest["output"]["labels"])


def io_names(manifest: dict[str, Any]) -> tuple[str, str]:
    """The ONNX input and output tensor names declared by the manifest (trainer defaults)."""
    inp = manifest["input"].get("name", "input")
    default = "prediction" if manifest_task(manifest) == "regression" else "probabilities"
    out = manifest["output"].get("name", default)
    return (inp if isinstance(inp, str) else "input",
            out if isinstance(out, str) else default)


def _bundle_file(bundle_dir: Path, name: object) -> Path:
    if not isinstance(name, str) or name in {"", ".", ".."} or Path(name).name != name:
        raise InvalidInputError(f"a runtime file must be a file name in the bundle; got {name!r}")
    return bundle_dir / name


def _section(doc: dict[str, Any], key: str) -> dict[str, Any]:
    value = doc.get(key)
    return value if isinstance(value, dict) else {}


def _median_time(call: Any) -> float:
    times = []
    for _ in range(_TIMED_ROWS):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _warm_up(runtime: Runtime) -> float:
    row = np.zeros((1, runtime.features), np.float32)
    out = runtime.predict(row)
    if out.shape != (1, runtime.classes):
        raise InvalidInputError(
            f"model v{runtime.version} returns shape {out.shape} for one row; the manifest "
            f"says (1, {runtime.classes})"
        )
    return _median_time(lambda: runtime.predict(row))
