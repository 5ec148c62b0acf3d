"""Where the control plane's event loop spends a telemetry batch: ``python -m scripts.bench_mqtt
--loop-steps`` runs the telemetry path of ``scripts/bench_mqtt.py`` with the bridge's steps
wrapped in timers (the CPU clock of the calling thread and the wall clock around each call),
and prints both per batch. The timers add a few µs to each call timed; nested steps are
counted in their callers too (``bridge: a group of batches`` holds the store's write and the
checks). Patched only in this process, for the run: nothing of this is in the product's code.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from typing import Any

# (label, owner module or class path, attribute): the steps of a batch on the control plane's
# loop, in the order they happen.
STEPS = [
    ("TLS: the socket read, decrypted and delivered", "asyncio.sslproto.SSLProtocol",
     "buffer_updated"),
    ("MQTT: framing and decoding the packets", "fleetcore.mqtt_client._Protocol",
     "data_received"),
    ("bridge: a group of batches (all below)", "control_plane.api.mqtt_bridge.MqttBridge",
     "_telemetry_group"),
    ("  identity check (once a device a group)", "control_plane.api.agent_calls.AgentCalls",
     "device_by_id"),
    ("  protobuf -> columns", "control_plane.api.agent_calls", "telemetry_from_proto"),
    ("  checks (quota, screening, derivation, rules)",
     "control_plane.services.telemetry.TelemetryService", "_vetted"),
    ("  store: the group's transaction", "control_plane.storage.sqlite.SqliteStore",
     "ingest_telemetry_many"),
    ("    of which the rows written (before the commit)",
     "control_plane.storage.sqlite.SqliteStore", "_write_telemetry"),
    ("  answers", "control_plane.api.mqtt_bridge.MqttBridge", "_publish"),
]


def _resolve(path: str) -> Any:
    """The object a dotted path names: the longest importable module, then attributes."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for part in parts[i:]:
            obj = getattr(obj, part)
        return obj
    raise ImportError(f"nothing to import in {path}")


@contextlib.contextmanager
def timed() -> Iterator[dict[str, tuple[int, float, float]]]:
    """Wrap ``STEPS`` for the ``with`` block; the dict it yields is filled at its end with
    label -> (calls, CPU seconds, wall seconds)."""
    cpu: defaultdict[str, float] = defaultdict(float)
    wall: defaultdict[str, float] = defaultdict(float)
    calls: Counter[str] = Counter()
    undo: list[Callable[[], None]] = []
    for label, owner_path, attr in STEPS:
        owner = _resolve(owner_path)
        original = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)
        if isinstance(original, staticmethod):
            raise TypeError(f"{owner_path}.{attr}: static methods are not timed")
        undo.append(functools.partial(setattr, owner, attr, original))
        setattr(owner, attr, _timer(original, label, cpu, wall, calls))
    out: dict[str, tuple[int, float, float]] = {}
    try:
        yield out
    finally:
        for restore in reversed(undo):
            restore()
        out.update({label: (calls[label], cpu[label], wall[label]) for label, _, _ in STEPS})


def _timer(fn: Callable[..., Any], label: str, cpu: defaultdict[str, float],
           wall: defaultdict[str, float], calls: Counter[str]) -> Callable[..., Any]:
    if asyncio.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def timed_async(*args: Any, **kwargs: Any) -> Any:
            c0, w0 = time.thread_time(), time.perf_counter()
            try:
                return await fn(*args, **kwargs)
            finally:  # a coroutine that suspends counts the CPU of what ran meanwhile too
                cpu[label] += time.thread_time() - c0
                wall[label] += time.perf_counter() - w0
                calls[label] += 1
        return timed_async

    @functools.wraps(fn)
    def timed_sync(*args: Any, **kwargs: Any) -> Any:
        c0, w0 = time.thread_time(), time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            cpu[label] += time.thread_time() - c0
            wall[label] += time.perf_counter() - w0
            calls[label] += 1
    return timed_sync


def rows(steps: dict[str, tuple[int, float, float]], batches: int) -> list[dict[str, Any]]:
    """``scripts.bench`` rows: µs of CPU per batch, the wall time in the baseline column."""
    return [{"name": f"loop, per batch: {label}", "figure": round(c / batches * 1e6, 1),
             "baseline": round(w / batches * 1e6, 1), "unit": "us", "ratio": "-",
             "baseline_name": "wall time", "target": "-", "pass": None,
             "note": f"{n} calls"}
            for label, (n, c, w) in steps.items()]
