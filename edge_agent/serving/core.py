"""ServingCore: the loaded versions of every model, the A/B router, stats and hooks.

Rules:

* A model is an immutable snapshot (router, runtimes, stats, metadata). ``set_model`` builds a
  new one (loading only versions it does not already hold from the same directory) and swaps it
  in with one assignment. A request reads the snapshot once, so it finishes on the runtime it
  started with; a version nobody references any more is freed when its last request returns.
  No request fails because of a switch.
* All arms of a model must take the same input width, have the same task and give the same
  number of classes (one request is valid for every arm). A regression model
  (``task = "regression"`` in its manifest) answers one value per row, ``[n, 1]``; feedback
  then takes numbers (finite; not booleans) and scores absolute and squared errors.
* ``infer`` checks the input (float32 ``[n, features]``, n >= 1), routes (or takes the version
  asked for; then no mirroring), runs, and records the arm's numbers. Latency is the runtime's.
  ``on_result(model, version, ok, latency_s)`` runs inline for every request a caller got an
  answer (or an error) from: it must be cheap (the probation counters are).
* Off the request path, on one worker thread with a bounded queue (drops are counted per
  model): shadow arms answer a copy of the rows (their answers only reach their stats and the
  feedback log), and ``on_prediction(model, version, rows, classes)`` gets the primary's rows
  (``classes``: the predicted class ids, or the float32 values of a regression model),
  coalesced per (model, version) into one call per worker batch. Measured with
  ``bench_inprocess`` on the tiny digits model: p50 8.4 µs raw ``run``, 10.8 µs ``infer``,
  13.1 µs with both hooks set, 12.8 µs with a request id. The worker lingers for a batch
  (``_background.py``): waking it for every request had cost ~40 µs of request latency.
* Requests that carry an id are remembered (``PredictionLog``) so that ``feedback`` can score
  the arm that answered, and every shadow whose answer arrived before the label.
* Sampling (``set_sampling``): with a model's rate r > 0, a request with an id is kept as a
  candidate training sample with probability r (its rows and request parameters ride in the
  log entry); when its label arrives, ``on_sample`` gets rows, labels and parameters. What
  leaves the device is the hook's business (the supervisor keeps only the manifest's PII
  columns, pseudonymized or dropped).
* Bad requests raise ``BadRequestError`` and count as the model's ``bad_requests``, not as an
  arm's errors; a runtime failure raises ``InferenceError`` and counts as the arm's error.
* Inputs must be finite: NaN or ±Inf in a row is a bad request (a model answers them with
  confident nonsense), unless every served version's manifest says
  ``"input": {"allow_non_finite": true}``. A request id or routing key longer than
  ``limits.MAX_REQUEST_ID_CHARS`` / ``MAX_ROUTING_KEY_CHARS`` is a bad request. The feedback
  log and the background queue are bounded in entries and in bytes (``limits.py``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.serving._background import Background
from edge_agent.serving.batching import Batcher, BatchPolicy, manifest_policy
from edge_agent.serving.categorical import Categories, ClampedRuntime, from_manifests
from edge_agent.serving.errors import BadRequestError, InferenceError, ModelNotFoundError
from edge_agent.serving.heap import trim as trim_heap
from edge_agent.serving.limits import (
    BACKGROUND_QUEUE_BYTES,
    BACKGROUND_QUEUE_JOBS,
    FEEDBACK_LOG_BYTES,
    FEEDBACK_LOG_ENTRIES,
    MAX_LABEL_MAGNITUDE,
    MAX_REQUEST_ID_CHARS,
    MAX_ROUTING_KEY_CHARS,
    shown,
)
from edge_agent.serving.router import Router, RouterArm
from edge_agent.serving.runtime import Runtime, io_names, load_runtime, usable_cores
from edge_agent.serving.spans import InferenceSpans
from edge_agent.serving.stats import ArmStats, Pending, Predicted, PredictionLog, as_classes
from fleetcore.bundle import MANIFEST, manifest_task, parse_manifest
from fleetcore.errors import InvalidInputError

__all__ = ["INLINE_MAX_ROWS", "INLINE_MAX_S", "InferResult", "ModelSignature", "ServingCore",
           "runtime_facts"]

logger = logging.getLogger(__name__)

PredictionHook = Callable[[str, int, np.ndarray, np.ndarray], None]
ResultHook = Callable[[str, int, bool, float], None]
Labels = list[int] | list[float]  # class ids, or a regression model's values
# (model, version, rows, labels, request parameters) of a sampled request that got its label
SampleHook = Callable[[str, int, np.ndarray, Labels, Mapping[str, str]], None]

# The front ends run a request on the event loop when the model is this fast (a hop to a
# thread measured ~25 µs p50, three times a small model's whole run); slower models or big
# batches go to a thread pool, where ONNX Runtime releases the GIL and a second core can help.
INLINE_MAX_S = 200e-6  # measured one-row latency of the slowest arm
INLINE_MAX_ROWS = 64
_PLATFORMS = {"onnx": "onnxruntime_onnx", "tflite": "litert_tflite"}


@dataclass(frozen=True)
class InferResult:
    model: str
    version: int
    outputs: np.ndarray  # float32 [n, classes] ([n, 1] for regression)
    request_id: str | None


class _Counters:
    """Per-model counters that live across snapshots."""

    def __init__(self) -> None:
        self.bad_requests = 0
        self.mirror_dropped = 0
        self.hook_dropped = 0
        self.lock = threading.Lock()

    def add(self, field: str) -> None:
        with self.lock:
            setattr(self, field, getattr(self, field) + 1)


@dataclass(frozen=True)
class ModelSignature:
    """What a request to a model must look like (the same for all its arms)."""

    input_name: str
    output_name: str
    features: int
    classes: int
    task: str = "classification"
    # per feature: its vocabulary (value -> code) when categorical (serving/categorical.py)
    categories: Categories | None = None


@dataclass(frozen=True)
class _Model:
    name: str
    signature: ModelSignature
    router: Router
    runtimes: Mapping[int, Runtime]
    arms: Mapping[int, ArmStats]
    dirs: Mapping[int, Path]
    manifests: Mapping[int, dict[str, Any]]
    features: int
    classes: int
    inline: bool
    counters: _Counters
    prefer: str
    finite_only: bool  # refuse NaN/Inf rows (unless every manifest allows them)
    task: str  # "classification" | "regression": the same for every arm
    batching: BatchPolicy | None = None  # the primary's manifest hint (``batching.py``)


@dataclass(frozen=True)
class _Mirror:
    model: _Model
    versions: tuple[int, ...]
    rows: np.ndarray
    request_id: str | None


@dataclass(frozen=True)
class _Seen:
    model: str
    version: int
    rows: np.ndarray
    classes: np.ndarray


class ServingCore:
    """Serves every installed model (see the module rules). Thread-safe."""

    def __init__(self, *, on_prediction: PredictionHook | None = None,
                 on_result: ResultHook | None = None,
                 feedback_capacity: int = FEEDBACK_LOG_ENTRIES,
                 feedback_bytes: int = FEEDBACK_LOG_BYTES,
                 background_capacity: int = BACKGROUND_QUEUE_JOBS,
                 background_bytes: int = BACKGROUND_QUEUE_BYTES, seed: int | None = None,
                 on_sample: SampleHook | None = None) -> None:
        self._on_prediction = on_prediction
        self._on_result = on_result
        self._on_sample = on_sample
        self._sampling: dict[str, float] = {}  # replaced whole, never mutated
        self._sample_rng = random.Random(seed)  # noqa: S311 (sampling, not security)
        self._models: dict[str, _Model] = {}  # replaced whole, never mutated
        self._counters: dict[str, _Counters] = {}
        self._set_lock = threading.Lock()
        self._seed = seed
        self.log = PredictionLog(feedback_capacity, max_bytes=feedback_bytes)
        self._background = Background(self._run_background, capacity=background_capacity,
                                      capacity_bytes=background_bytes)
        self._executor = ThreadPoolExecutor(max_workers=max(2, usable_cores()),
                                            thread_name_prefix="serving")
        self._batching: dict[str, BatchPolicy] = {}  # the agent's config; replaced whole
        self._batcher = Batcher(self)
        # Inference spans (spans.py): the front ends' one check; None while they are off.
        self.spans: InferenceSpans | None = None

    # ------------------------------------------------------------------ models
    def set_model(self, name: str, arms: Sequence[tuple[int, float, bool]],
                  bundles: Mapping[int, Path], *, prefer: str = "onnx") -> None:
        """Serve ``arms`` ((version, weight, shadow)) of ``name`` from ``bundles`` (version ->
        bundle dir). Loads new versions, swaps atomically, lets go of the versions not listed.

        Loading takes milliseconds to seconds: call it from a thread, not the event loop.
        """
        rng = None if self._seed is None else random.Random(f"{self._seed}:{name}")  # noqa: S311
        router = Router([RouterArm(int(v), float(w), bool(s)) for v, w, s in arms], rng=rng)
        with self._set_lock:
            old = self._models.get(name)
            counters = self._counters.setdefault(name, _Counters())
            runtimes: dict[int, Runtime] = {}
            manifests: dict[int, dict[str, Any]] = {}
            dirs: dict[int, Path] = {}
            stats: dict[int, ArmStats] = {}
            for v in router.versions:
                if v not in bundles:
                    raise InvalidInputError(f"{name}: no bundle directory for v{v}; got "
                                            f"{sorted(bundles)}")
                path = Path(bundles[v]).resolve()
                if old is not None and old.dirs.get(v) == path and old.prefer == prefer:
                    runtimes[v], manifests[v] = old.runtimes[v], old.manifests[v]
                    runtimes[v] = getattr(runtimes[v], "inner", runtimes[v])  # unclamped
                else:
                    manifests[v] = _read_manifest(path, name, v)
                    runtimes[v] = load_runtime(path, manifests[v], prefer=prefer)
                dirs[v] = path
            tasks = {manifest_task(m) for m in manifests.values()}
            if len(tasks) != 1:
                raise InvalidInputError(f"{name}: every arm must have the same task; got "
                                        f"{sorted(tasks)}")
            task = tasks.pop()
            for v in router.versions:
                kept = old.arms.get(v) if old is not None and old.task == task else None
                stats[v] = kept if kept is not None else ArmStats(name, v, task)
            dims = {(r.features, r.classes) for r in runtimes.values()}
            if len(dims) != 1:
                raise InvalidInputError(f"{name}: every arm must take the same features and "
                                        f"give the same classes; got {sorted(dims)}")
            features, classes = dims.pop()
            names = {io_names(m) for m in manifests.values()}
            if len(names) != 1:
                raise InvalidInputError(f"{name}: every arm must name its input and output "
                                        f"alike; got {sorted(names)}")
            input_name, output_name = names.pop()
            categories, clamps = from_manifests(name, manifests)
            for v, lengths in clamps.items():
                runtimes[v] = ClampedRuntime(runtimes[v], lengths)
            model = _Model(
                name=name,
                signature=ModelSignature(input_name, output_name, features, classes, task,
                                         categories),
                router=router, runtimes=runtimes, arms=stats, dirs=dirs,
                manifests=manifests, features=features, classes=classes,
                inline=max(r.row_latency_s for r in runtimes.values()) <= INLINE_MAX_S,
                counters=counters, prefer=prefer,
                finite_only=not all(_allows_non_finite(m) for m in manifests.values()),
                task=task,
                batching=manifest_policy(manifests[_primary(router).version]),
            )
            self._models = {**self._models, name: model}
            del old, runtimes  # a replaced session goes now, before the heap is trimmed
        trim_heap()
        logger.info("%s now serves %s", name,
                    ", ".join(f"v{a.version}{' (shadow)' if a.shadow else f' {a.weight:g}'}"
                              for a in router.arms))

    def set_sampling(self, name: str, rate: float) -> None:
        """Keep ``rate`` of ``name``'s requests that carry an id as candidate samples."""
        if not 0.0 <= rate <= 1.0:
            raise InvalidInputError(f"sample rate must be in [0, 1]; got {rate}")
        rates = {k: v for k, v in self._sampling.items() if k != name}
        if rate > 0:
            rates[name] = rate
        self._sampling = rates

    def remove_model(self, name: str) -> None:
        with self._set_lock:
            self._models = {k: m for k, m in self._models.items() if k != name}
            self._counters.pop(name, None)

    def signature(self, name: str) -> ModelSignature:
        return self._model(name).signature

    def ready(self, name: str | None = None, version: int | None = None) -> bool:
        """Whether ``name`` (and ``version``) is served; with no name, whether any model is."""
        if name is None:
            return bool(self._models)
        model = self._models.get(name)
        return model is not None and (version is None or version in model.runtimes)

    # ------------------------------------------------------------------ requests
    def infer(self, name: str, x: np.ndarray, *, request_id: str | None = None,
              routing_key: str | None = None, version: int | None = None,
              context: Mapping[str, str] | None = None) -> InferResult:
        model = self._model(name)
        x, version, shadows = self._route(model, x, request_id, routing_key, version)
        arm = model.arms[version]
        t0 = time.perf_counter()
        try:
            out = model.runtimes[version].predict(x)
        except Exception as exc:
            self._failed(model, version, time.perf_counter() - t0, len(x), exc)
            raise InferenceError(f"{name} v{version} failed: {exc}") from exc
        return self._answered(model, arm, x, out, time.perf_counter() - t0, request_id,
                              shadows, context)

    def _route(self, model: _Model, x: Any, request_id: str | None, routing_key: str | None,
               version: int | None) -> tuple[np.ndarray, int, tuple[int, ...]]:
        """Check a request and choose its version (the A/B router, or the one asked for)."""
        x = _check_rows(model, x)
        if ((request_id is not None and len(request_id) > MAX_REQUEST_ID_CHARS)
                or (routing_key is not None and len(routing_key) > MAX_ROUTING_KEY_CHARS)):
            model.counters.add("bad_requests")
            raise BadRequestError(f"a request id and a routing key have at most "
                                  f"{MAX_REQUEST_ID_CHARS} and {MAX_ROUTING_KEY_CHARS} "
                                  "characters")
        if version is None:
            version, shadows = model.router.choose(routing_key)
            return x, version, shadows
        if version in model.runtimes:
            return x, version, ()
        raise ModelNotFoundError(f"{model.name} v{version} is not served; versions: "
                                 f"{sorted(model.runtimes)}")

    def _failed(self, model: _Model, version: int, latency: float, rows: int,
                exc: Exception, executions: int = 1) -> None:
        model.arms[version].record(False, latency, rows, executions)
        if self._on_result is not None:
            self._on_result(model.name, version, False, latency)
        logger.warning("%s v%d failed on %d rows: %s", model.name, version, rows, exc)

    def _answered(self, model: _Model, arm: ArmStats, x: np.ndarray, out: np.ndarray,
                  latency: float, request_id: str | None, shadows: tuple[int, ...],
                  context: Mapping[str, str] | None, executions: int = 1) -> InferResult:
        """Everything a request's answer updates: the arm's numbers, the result hook, the
        feedback log, shadows and the prediction hook (the same with or without batching)."""
        arm.record(True, latency, len(x), executions)
        if self._on_result is not None:
            self._on_result(model.name, arm.version, True, latency)
        if request_id is not None or shadows or self._on_prediction is not None:
            self._after(model, arm, x, out, request_id, shadows, context)
        return InferResult(model.name, arm.version, out, request_id)

    async def ainfer(self, name: str, x: np.ndarray, *, request_id: str | None = None,
                     routing_key: str | None = None, version: int | None = None,
                     context: Mapping[str, str] | None = None) -> InferResult:
        """``infer`` for an event loop: inline for fast models and small batches, else on a
        thread pool (see ``INLINE_MAX_S``); with dynamic batching on for the model
        (``batching.py``), joined with other requests to the same version first."""
        model = self._models.get(name)
        policy = None if model is None else self._batching.get(name, model.batching)
        if model is not None and policy is not None and len(x) < policy.max_batch_size:
            x, chosen, shadows = self._route(model, x, request_id, routing_key, version)
            return await self._batcher.submit(model, chosen, x, policy, (request_id, shadows,
                                                                         context))
        if model is None or (model.inline and len(x) <= INLINE_MAX_ROWS):
            return self.infer(name, x, request_id=request_id, routing_key=routing_key,
                              version=version, context=context)
        call = functools.partial(self.infer, name, x, request_id=request_id,
                                 routing_key=routing_key, version=version, context=context)
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    def set_batching(self, name: str, policy: BatchPolicy | None) -> None:
        """Dynamic batching for ``name`` (the agent's config), over the manifest's runtime
        hint; None goes back to the manifest's (off when it has none)."""
        rules = {k: v for k, v in self._batching.items() if k != name}
        if policy is not None:
            rules[name] = policy
        self._batching = rules

    async def _run_batch(self, model: _Model, version: int, rows: np.ndarray) -> tuple[
            np.ndarray, float]:
        """One runtime call for a joined batch: (outputs, latency); inline when it is cheap."""
        runtime = model.runtimes[version]
        if model.inline and len(rows) <= INLINE_MAX_ROWS:
            t0 = time.perf_counter()
            out = runtime.predict(rows)
            return out, time.perf_counter() - t0

        def timed() -> tuple[np.ndarray, float]:
            t0 = time.perf_counter()
            out = runtime.predict(rows)
            return out, time.perf_counter() - t0

        return await asyncio.get_running_loop().run_in_executor(self._executor, timed)

    def note_bad_request(self, name: str) -> None:
        """Count a request to ``name`` that a front end refused before it reached ``infer``."""
        counters = self._counters.get(name)
        if counters is not None:
            counters.add("bad_requests")

    def feedback(self, name: str, request_id: str,
                 label: float | Sequence[float]) -> bool:
        """Score the answer to ``request_id`` against the true ``label`` (one per row): class
        indices, or finite numbers for a regression model.

        False when the id is unknown for ``name`` (never seen, already scored, or evicted).
        """
        if len(request_id) > MAX_REQUEST_ID_CHARS:
            raise BadRequestError(f"a request id has at most {MAX_REQUEST_ID_CHARS} characters; "
                                  f"got {len(request_id)}")
        labels = _check_labels(label, self._models.get(name))
        rows = self.log.peek_rows(request_id, name)
        if rows is None:
            return False
        if rows != len(labels):
            raise BadRequestError(f"request {shown(request_id)} had {rows} rows; got "
                                  f"{len(labels)} labels")
        pending = self.log.take(request_id, name)
        if pending is None:
            return False
        _score(pending.arm, pending.classes, labels)
        for arm, classes in (pending.shadows or {}).values():
            _score(arm, classes, labels)
        if pending.sample is not None and self._on_sample is not None:
            try:
                self._on_sample(name, pending.version, pending.sample[0], list(labels),
                                pending.sample[1])
            except Exception:
                logger.exception("on_sample hook failed for %s v%d", name, pending.version)
        return True

    # ------------------------------------------------------------------ introspection
    def models(self) -> dict[str, dict[str, Any]]:
        """Open Inference Protocol model metadata per model, plus its arms."""
        return {name: _metadata(model) for name, model in self._models.items()}

    def stats(self) -> dict[str, Any]:
        """Per model and arm numbers, JSON-ready (latencies in seconds)."""
        out: dict[str, Any] = {}
        for name, model in self._models.items():
            c = model.counters
            arms = {}
            for a in model.router.arms:
                arms[str(a.version)] = {
                    "shadow": a.shadow, "weight": a.weight, "share": model.router.share(a.version),
                    "runtime": model.runtimes[a.version].kind,
                    **runtime_facts(model.runtimes[a.version]),
                    **model.arms[a.version].snapshot(),
                }
            out[name] = {"task": model.task, "bad_requests": c.bad_requests,
                         "mirror_dropped": c.mirror_dropped,
                         "hook_dropped": c.hook_dropped, "arms": arms}
        return {"models": out, "feedback_log": {"size": len(self.log),
                                                "capacity": self.log.capacity,
                                                "bytes": self.log.bytes,
                                                "capacity_bytes": self.log.max_bytes,
                                                "evicted": self.log.evicted},
                "background_queue": len(self._background),
                "background_queue_bytes": self._background.bytes}

    def runtimes(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Per model and served version, what runs it (``runtime_facts``)."""
        return {name: {str(v): {"kind": r.kind, **runtime_facts(r)}
                       for v, r in sorted(model.runtimes.items())}
                for name, model in self._models.items()}

    def arm_stats(self) -> list[tuple[ArmStats, bool]]:
        """(stats, is_shadow) of every arm served now (for the metrics collector)."""
        return [(m.arms[a.version], a.shadow) for m in self._models.values()
                for a in m.router.arms]

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until shadow answers and hooks queued so far have run; False on timeout."""
        return self._background.flush(timeout)

    def close(self) -> None:
        self._background.close()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ internals
    def _model(self, name: str) -> _Model:
        model = self._models.get(name)
        if model is None:
            raise ModelNotFoundError(f"no model named {shown(name)} is served; serving: "
                                     f"{sorted(self._models)}")
        return model

    def _after(self, model: _Model, arm: ArmStats, x: np.ndarray, out: np.ndarray,
               request_id: str | None, shadows: tuple[int, ...],
               context: Mapping[str, str] | None = None) -> None:
        classes = _predicted(model, out)
        if request_id is not None:
            pending = Pending(model.name, arm.version, arm, as_classes(classes.tolist()))
            rate = self._sampling.get(model.name)
            if rate is not None and self._sample_rng.random() < rate:
                pending.sample = (x.copy(), dict(context or {}))
            self.log.put(request_id, pending)
        if not shadows and self._on_prediction is None:
            return
        rows = x.copy()  # the caller may reuse its array once we return
        if shadows and not self._background.submit(_Mirror(model, shadows, rows, request_id),
                                                   rows.nbytes):
            model.counters.add("mirror_dropped")
        if self._on_prediction is not None and not self._background.submit(
            _Seen(model.name, arm.version, rows, classes), rows.nbytes + classes.nbytes
        ):
            model.counters.add("hook_dropped")

    def _run_background(self, jobs: list[Any]) -> None:
        seen: dict[tuple[str, int], list[_Seen]] = {}
        for job in jobs:
            if isinstance(job, _Mirror):
                self._mirror(job)
            else:
                seen.setdefault((job.model, job.version), []).append(job)
        hook = self._on_prediction
        if hook is None:
            return
        for (name, version), group in seen.items():
            rows = group[0].rows if len(group) == 1 else np.concatenate([g.rows for g in group])
            classes = (group[0].classes if len(group) == 1
                       else np.concatenate([g.classes for g in group]))
            try:
                hook(name, version, rows, classes)
            except Exception:
                logger.exception("on_prediction hook failed for %s v%d", name, version)

    def _mirror(self, job: _Mirror) -> None:
        for version in job.versions:
            arm = job.model.arms[version]
            t0 = time.perf_counter()
            try:
                out = job.model.runtimes[version].predict(job.rows)
            except Exception as exc:
                arm.record(False, time.perf_counter() - t0)
                logger.warning("shadow %s v%d failed: %s", job.model.name, version, exc)
                continue
            arm.record(True, time.perf_counter() - t0, len(job.rows))
            if job.request_id is not None:
                self.log.add_shadow(job.request_id, job.model.name, arm,
                                    as_classes(_predicted(job.model, out).tolist()))


def _read_manifest(path: Path, name: str, version: int) -> dict[str, Any]:
    manifest = parse_manifest((path / MANIFEST).read_bytes())
    if manifest["name"] != name or manifest["version"] != version:
        raise InvalidInputError(f"{path}: expected the bundle of {name} v{version}; its "
                                f"manifest says {manifest['name']} v{manifest['version']}")
    return manifest


def _allows_non_finite(manifest: Mapping[str, Any]) -> bool:
    section = manifest.get("input")
    return isinstance(section, dict) and section.get("allow_non_finite") is True


def _check_rows(model: _Model, x: Any) -> np.ndarray:
    if (not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 2
            or x.shape[1] != model.features or x.shape[0] == 0):
        model.counters.add("bad_requests")
        got = f"{x.dtype} {list(x.shape)}" if isinstance(x, np.ndarray) else type(x).__name__
        raise BadRequestError(f"{model.name} expects float32 [n, {model.features}] with n >= 1; "
                              f"got {got}")
    if model.finite_only and not np.isfinite(x).all():
        model.counters.add("bad_requests")
        raise BadRequestError(f"{model.name} takes finite numbers only: the input holds NaN or "
                              "Inf (or a number beyond float32)")
    return x if x.flags.c_contiguous else np.ascontiguousarray(x)


def _predicted(model: _Model, out: np.ndarray) -> np.ndarray:
    """What an answer predicted, per row: class ids, or the values of a regression model."""
    if model.task == "regression":
        return out[:, 0].astype(np.float32)  # a copy: the hooks keep it
    return out.argmax(axis=1)


def _check_labels(label: object, model: _Model | None) -> Labels:
    if model is not None and model.task == "regression":
        return _check_values(label)
    limit = model.classes if model is not None else None
    if not isinstance(label, int | list | tuple):
        raise BadRequestError(f"labels must be class indices in [0, {limit}); got "
                              f"{shown(label)}")
    labels = [label] if isinstance(label, int) else list(label)
    for value in labels:
        if (not isinstance(value, int) or isinstance(value, bool) or value < 0
                or (limit is not None and value >= limit)):
            raise BadRequestError(f"labels must be class indices in [0, {limit}); got "
                                  f"{shown(value)}")
    if not labels:
        raise BadRequestError("feedback needs at least one label")
    return labels


def _check_values(label: object) -> list[float]:
    """A regression model's labels: one finite number per row (not a boolean, not a string)."""
    if isinstance(label, int | float) and not isinstance(label, bool):
        values: list[object] = [label]
    elif isinstance(label, list | tuple):
        values = list(label)
    else:
        raise BadRequestError(f"a regression label is a finite number (or one per row); got "
                              f"{shown(label)}")
    out: list[float] = []
    for value in values:
        if (isinstance(value, bool) or not isinstance(value, int | float)
                or not math.isfinite(value) or abs(value) > MAX_LABEL_MAGNITUDE):
            raise BadRequestError(f"regression labels must be finite numbers of magnitude at "
                                  f"most {MAX_LABEL_MAGNITUDE:g}; got {shown(value)}")
        out.append(float(value))
    if not out:
        raise BadRequestError("feedback needs at least one label")
    return out


def _score(arm: ArmStats, predicted: Predicted, labels: Labels) -> None:
    rows = predicted if isinstance(predicted, tuple) else (predicted,)
    if arm.regression:
        arm.score_errors(tuple(float(p) for p in rows), [float(y) for y in labels])
    else:
        arm.score(sum(1 for c, y in zip(rows, labels, strict=True) if c == y), len(rows))


def runtime_facts(runtime: Runtime) -> dict[str, Any]:
    """What the agent chose for this host (docs/serving.md, "Hardware fit"): the file (the
    variant), its precision, intra-op threads, graph optimisation, and what it measured."""
    facts: dict[str, Any] = {"row_latency_us": round(runtime.row_latency_s * 1e6, 2)}
    loaded = getattr(runtime, "inner", runtime)  # under a categorical model's clamp
    for key in ("file", "precision", "threads", "graph_optimization", "variants"):
        value = getattr(loaded, key, None)
        if value not in (None, "", {}):
            facts[key] = value
    return facts


def _primary(router: Router) -> RouterArm:
    return max(router.arms, key=lambda a: (not a.shadow, a.weight))


def _metadata(model: _Model) -> dict[str, Any]:
    primary = _primary(model.router)
    manifest = model.manifests[primary.version]
    sig = model.signature
    return {
        "name": model.name,
        "versions": [str(v) for v in sorted(model.runtimes)],
        "platform": _PLATFORMS[model.runtimes[primary.version].kind],
        "inputs": [{"name": sig.input_name, "datatype": "FP32", "shape": [-1, sig.features]}],
        "outputs": [{"name": sig.output_name, "datatype": "FP32", "shape": [-1, sig.classes]}],
        "task": model.task,
        "labels": list(manifest["output"].get("labels", [])),
        "arms": [{"version": a.version, "weight": a.weight, "shadow": a.shadow,
                  "runtime": model.runtimes[a.version].kind} for a in model.router.arms],
    }
