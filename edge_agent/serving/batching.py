"""Dynamic batching: concurrent requests to one model version joined into one runtime call.

Off by default. On per model, from the manifest's runtime hint
(``"runtime": {"batching": {"max_batch_size": 32, "max_queue_delay_us": 500}}``, the primary
arm's manifest) or the agent's config (``[batching.MODEL]`` in agent.toml, which wins;
``ServingCore.set_batching``).

Rules:

* Only requests through an event loop (``ServingCore.ainfer``: HTTP and gRPC) are batched, and
  only those with fewer rows than ``max_batch_size``. Each request is checked and routed on its
  own first (A/B choice by its routing key, the version it asked for, its shadows), so joining
  changes no routing: requests join the open batch of the version they were routed to, on the
  snapshot's runtime they started with (a model switch leaves open batches on the old one).
* A batch runs when it holds ``max_batch_size`` rows, or ``max_queue_delay_us`` after its first
  request arrived (0: at the loop's next turn, joining what arrived meanwhile). A request that
  would overfill the open batch sends it and opens the next. While a batch runs, the next fills.
* One runtime call per batch (inline when the model is fast and the batch small, else on the
  thread pool, as for a lone request). Then every request is answered from its slice and
  counted exactly as alone (``ServingCore._answered``): its arm's requests, rows and latency
  (the batch's runtime latency), the result hook (probation), the feedback log, shadows, the
  drift and sampling hook. ``executions`` counts runtime calls: one per batch, so the
  statistics' ``execution_count`` shows the batching.
* A failed batch fails each of its requests (``InferenceError``, each counted as the arm's
  error). A request whose client went away still counts (the work was done).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from edge_agent.serving.errors import InferenceError
from fleetcore.errors import InvalidInputError


class _Core(Protocol):
    """What the batcher needs of ``ServingCore`` (which imports this module, not the reverse:
    tests/test_layering.py keeps the product free of import cycles)."""

    async def _run_batch(self, model: Any, version: int, rows: np.ndarray) -> tuple[
        np.ndarray, float]: ...

    def _failed(self, model: Any, version: int, latency: float, rows: int, exc: Exception,
                executions: int = 1) -> None: ...

    def _answered(self, model: Any, arm: Any, x: np.ndarray, out: np.ndarray, latency: float,
                  request_id: str | None, shadows: tuple[int, ...], context: Any,
                  executions: int = 1) -> Any: ...

__all__ = ["MAX_BATCH_ROWS", "MAX_QUEUE_DELAY_US", "BatchPolicy", "Batcher", "manifest_policy",
           "policy"]

logger = logging.getLogger(__name__)

MAX_BATCH_ROWS = 4096  # a larger max_batch_size is refused (config) or ignored (manifest)
MAX_QUEUE_DELAY_US = 1_000_000


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int  # rows per runtime call (>= 2)
    max_queue_delay_s: float


def policy(max_batch_size: object, max_queue_delay_us: object) -> BatchPolicy:
    """A checked policy, or ``InvalidInputError`` with what is wrong."""
    for name, value, low, high in (("max_batch_size", max_batch_size, 2, MAX_BATCH_ROWS),
                                   ("max_queue_delay_us", max_queue_delay_us, 0,
                                    MAX_QUEUE_DELAY_US)):
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise InvalidInputError(f"batching {name} must be an integer in [{low}, {high}]; "
                                    f"got {value!r}")
    assert isinstance(max_batch_size, int) and isinstance(max_queue_delay_us, int)
    return BatchPolicy(max_batch_size, max_queue_delay_us / 1e6)


def manifest_policy(manifest: dict[str, Any]) -> BatchPolicy | None:
    """The manifest's ``runtime.batching`` hint; None when absent or malformed (a hint: a bad
    one is logged and ignored, the model serves unbatched)."""
    runtime = manifest.get("runtime")
    section = runtime.get("batching") if isinstance(runtime, dict) else None
    if not isinstance(section, dict):
        return None
    try:
        return policy(section.get("max_batch_size"), section.get("max_queue_delay_us", 0))
    except InvalidInputError as exc:
        logger.warning("%s v%s: ignoring runtime.batching: %s", manifest.get("name"),
                       manifest.get("version"), exc)
        return None


@dataclass
class _Batch:
    model: Any  # core._Model: a snapshot of the model
    version: int
    items: list[tuple[np.ndarray, asyncio.Future[Any], Any]] = field(default_factory=list)
    rows: int = 0
    timer: asyncio.Handle | None = None


class Batcher:
    """The open batches of one ``ServingCore``, per (loop, model snapshot's runtime, version).
    Used from event loops only (no lock: each loop touches only its own batches)."""

    def __init__(self, core: _Core) -> None:
        self._core = core
        self._open: dict[tuple[int, int, int], _Batch] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, model: Any, version: int, x: np.ndarray, policy: BatchPolicy,
                     request: tuple[str | None, tuple[int, ...], Any]) -> Any:
        """Join ``x`` (checked, routed to ``version``) to its open batch; its answer."""
        loop = asyncio.get_running_loop()
        key = (id(loop), id(model.runtimes[version]), version)
        batch = self._open.get(key)
        if batch is not None and batch.rows + len(x) > policy.max_batch_size:
            self._send(key, batch)
            batch = None
        if batch is None:
            batch = _Batch(model, version)
            self._open[key] = batch
            if policy.max_queue_delay_s > 0:
                batch.timer = loop.call_later(policy.max_queue_delay_s, self._send, key, batch)
            else:
                batch.timer = loop.call_soon(self._send, key, batch)
        future: asyncio.Future[Any] = loop.create_future()
        batch.items.append((x, future, request))
        batch.rows += len(x)
        if batch.rows >= policy.max_batch_size:
            self._send(key, batch)
        return await future

    def _send(self, key: tuple[int, int, int], batch: _Batch) -> None:
        if self._open.get(key) is batch:
            del self._open[key]
        elif not batch.items or batch.timer is None:
            return  # already sent
        if batch.timer is not None:
            batch.timer.cancel()
            batch.timer = None
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: _Batch) -> None:
        model, version, items = batch.model, batch.version, batch.items
        rows = items[0][0] if len(items) == 1 else np.concatenate([x for x, _, _ in items])
        try:
            out, latency = await self._core._run_batch(model, version, rows)
        except Exception as exc:
            for i, (x, future, _) in enumerate(items):
                self._core._failed(model, version, 0.0, len(x), exc, executions=int(i == 0))
                if not future.done():
                    future.set_exception(InferenceError(f"{model.name} v{version} failed: "
                                                        f"{exc}"))
            return
        start = 0
        arm = model.arms[version]
        for i, (x, future, (request_id, shadows, context)) in enumerate(items):
            part = out[start:start + len(x)]
            start += len(x)
            try:
                result = self._core._answered(model, arm, x, part, latency, request_id, shadows,
                                              context, executions=int(i == 0))
            except Exception as exc:  # a hook's failure must not strand the other requests
                if not future.done():
                    future.set_exception(exc)
                continue
            if not future.done():
                future.set_result(result)
