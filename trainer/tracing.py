"""The trainer's spans (OpenTelemetry, off unless the OTEL_* variables turn it on): one
``trainer run`` span per pipeline run, continuing ``$TRACEPARENT`` when the caller (a
retraining job) passes one, with a child span per pipeline step (ingest, train, evaluate,
compress, export, profile, bundle) that says whether it ran or was cached."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from fleetcore import otel as otel_setup

__all__ = ["TrainerTracing"]


class TrainerTracing:
    def __init__(self, pipeline: str) -> None:
        self.otel = otel_setup.start(otel_setup.OtelSettings.load({}, os.environ),
                                     "edgefleet-trainer", {"edgefleet.pipeline": pipeline})
        self._run: Any = None

    @contextlib.contextmanager
    def run(self) -> Iterator[None]:
        if self.otel is None:
            yield
            return
        parent = {"traceparent": os.environ.get("TRACEPARENT", "")}
        try:
            with self.otel.span("trainer run", parent if parent["traceparent"] else None):
                yield
        finally:
            self.otel.shutdown()  # flushes the spans before the process ends
            self.otel = None

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[Any]:
        if self.otel is None:
            yield None
            return
        with self.otel.span(f"step {name}", attributes={"edgefleet.step": name}) as span:
            yield span
