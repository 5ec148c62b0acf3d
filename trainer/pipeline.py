"""The training pipeline: ingest → train → evaluate → compress → export → profile → bundle.

Each step records, in ``WORKDIR/.steps/<step>.json``, a key (the hash of its settings and of
its inputs' digests) and the digest of what it wrote. A step whose key and outputs are
unchanged is skipped; a changed setting changes that step's key, and its new outputs change
the keys of the steps after it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fleetcore import pki, regions, strict_json
from fleetcore.errors import EdgefleetError, InvalidInputError
from fleetcore.files import atomic_write, file_digest
from trainer import metrics
from trainer.config import Pipeline, settings_digest
from trainer.dist import DistContext
from trainer.ingest import urls
from trainer.kinds import Kind, kind_of
from trainer.samples import accept, load_samples
from trainer.sources import load_source, source_fingerprint
from trainer.store import FeatureStore, RegionNotAllowedError, Snapshot
from trainer.tracing import TrainerTracing
from trainer.workdir import Workdir

# torch, scikit-learn, onnx and onnxruntime are imported inside the steps that use them (and
# the helpers those steps call): a rerun with every step cached never imports them, and a
# preflight failure costs no import time.

__all__ = ["STEPS", "PreflightError", "Run", "Workdir"]

log = logging.getLogger(__name__)

# Bump when a step's code changes what it produces, so caches from older code are not reused.
CODE_VERSION = 2
STEPS = ("ingest", "train", "evaluate", "compress", "export", "profile", "bundle")
DEPS: dict[str, tuple[str, ...]] = {
    "ingest": (),
    "train": ("ingest",),
    "evaluate": ("ingest", "train"),
    "compress": ("ingest", "train"),
    "export": ("ingest", "train", "compress"),
    "profile": ("ingest", "export"),
    "bundle": ("ingest", "evaluate", "compress", "export", "profile"),
}
SECTIONS: dict[str, tuple[str, ...]] = {
    "ingest": ("data", "store"),
    "train": ("model", "train", "data"),
    "evaluate": (),
    "compress": ("compress", "train"),
    "export": ("export",),
    "profile": ("profile", "train"),
    "bundle": ("bundle",),
}


class PreflightError(InvalidInputError):
    """Something a run will need is missing or unusable; found before any step ran."""


# Workdir documents (step state, ingest/train/evaluate/profile/export records) are read back
# with the one strict loader, so they are written as strict JSON too: NaN or Infinity in one
# fails when it is written, not steps later when it is read.
WORKDIR_JSON_MAX_BYTES = 64 * 1024 * 1024


def _write_json(path: Path, doc: Any) -> None:
    try:
        text = json.dumps(doc, indent=2, sort_keys=True, allow_nan=False)
    except ValueError as exc:  # NaN or Infinity, e.g. the losses of a diverged training
        raise InvalidInputError(f"{path}: cannot record {exc}") from None
    atomic_write(path, text.encode())


def _read_json(path: Path) -> Any:
    return strict_json.loads(path.read_bytes(), what=f"{path}", max_bytes=WORKDIR_JSON_MAX_BYTES)


@dataclass
class Split:
    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    X_recent: np.ndarray  # held-out rows of the device samples (the drifted data); may be empty
    y_recent: np.ndarray


@dataclass
class Run:
    """One invocation of the pipeline (or of one step) on a workdir."""

    pipeline: Pipeline
    workdir: Workdir
    publisher_key: Path | None = None
    progress: Callable[[str], None] = field(default=lambda m: print(m, file=sys.stderr))
    samples: Path | None = None  # labelled rows from devices (trainer/samples.py)
    baseline: Path | None = None  # the current model's bundle, to beat on the recent data
    margin: float = 0.0
    alpha: float = 0.05  # significance of the paired acceptance test
    ctx: DistContext = field(default_factory=DistContext.from_env)
    outcomes: dict[str, str] = field(default_factory=dict)
    _snapshot: Snapshot | None = None
    _feature_store: FeatureStore | None = None

    # ------------------------------------------------------------------ kind and task
    @property
    def kind(self) -> Kind:
        return kind_of(self.pipeline.model.kind)

    @property
    def task(self) -> str:
        return self.pipeline.data.task

    write_json = staticmethod(_write_json)
    read_json = staticmethod(_read_json)

    def tolerances(self) -> dict[str, dict[str, float]]:
        """How closely an exported model must match what it was made from (see _compare)."""
        if self.task == "classification":
            return {"exact": EXACT, "quantized": QUANTIZED, "converted": CONVERTED}
        scale = max(1.0, float(np.abs(self.split().y_train).max()))
        std = float(np.std(self.split().y_train)) or 1.0
        exact = {"max_atol": max(1e-3, 1e-4 * scale), "mean_atol": max(1e-4, 1e-5 * scale)}
        # A tree's thresholds are float32 in ONNX, float64 in scikit-learn: a row whose
        # feature sits between the two may take the other branch. Most rows must match.
        converted = {"max_atol": std, "mean_atol": 0.01 * std,
                     "row_atol": exact["max_atol"], "min_rows_within": 0.99}
        return {"exact": exact, "quantized": {"max_atol": std, "mean_atol": 0.05 * std},
                "converted": converted}

    def compare(self, got: np.ndarray, want: np.ndarray,
                tolerance: dict[str, float]) -> dict[str, Any]:
        return _compare(got, want, tolerance, self.task)

    # ------------------------------------------------------------------ caching
    def _state(self, step: str) -> dict[str, Any] | None:
        path = self.workdir.step_state(step)
        return _read_json(path) if path.exists() else None

    def _key(self, step: str) -> str:
        upstream = {}
        for dep in DEPS[step]:
            state = self._state(dep)
            if state is None:
                raise InvalidInputError(
                    f"step {step!r} needs {dep!r} first: run `trainer {dep}` or `trainer run`"
                )
            upstream[dep] = state["digest"]
        sections = {s: self.pipeline.section(s) for s in SECTIONS[step]}
        extra: Any = self._source_digest() if step == "ingest" else None
        if step == "train":
            extra = self.kind.fingerprint(self.pipeline)
        if step == "ingest" and self.samples is not None:
            extra = [extra, file_digest(self.samples)]
        if step == "bundle":
            extra = self._publisher_public_digest()
        return settings_digest(CODE_VERSION, step, sections, upstream, extra)

    def _outputs(self, step: str) -> list[Path]:
        w = self.workdir
        return {
            "ingest": [w.ingest],
            "train": self.kind.train_outputs(self),
            "evaluate": [w.evaluate],
            "compress": self.kind.compress_outputs(self),
            "export": sorted(w.export_dir.glob("*")) if w.export_dir.exists() else [],
            "profile": [w.profile],
            "bundle": sorted(w.bundle.glob("*")) if w.bundle.exists() else [],
        }[step]

    def _digest(self, step: str) -> str:
        return settings_digest([(p.name, file_digest(p)) for p in self._outputs(step)])

    def run_step(self, step: str) -> str:
        """Run ``step`` unless its cache is valid; return "ran" or "cached"."""
        key = self._key(step)
        state = self._state(step)
        outputs = self._outputs(step)
        fresh = state is not None and state["key"] == key
        if fresh and outputs and all(p.exists() for p in outputs) and (
            state is not None and state["digest"] == self._digest(step)
        ):
            self.progress(f"[{step}] cached")
            self.outcomes[step] = "cached"
            return "cached"
        self.progress(f"[{step}] running")
        started = time.monotonic()
        getattr(self, f"_step_{step}")(key)
        self.progress(f"[{step}] done in {time.monotonic() - started:.1f}s")
        if self.ctx.is_main:
            _write_json(self.workdir.step_state(step), {"key": key, "digest": self._digest(step)})
        self.outcomes[step] = "ran"
        return "ran"

    def preflight(self, steps: Sequence[str] = STEPS) -> None:
        """Check, before the first step runs, everything ``steps`` will need that can be
        checked cheaply, so that a run does not train for minutes and then fail on a missing
        key: the pipeline's values, the publisher key (exists, loads), the device (CUDA
        present when asked for), the workdir and feature store (writable), the data source
        (the CSV file readable) and the other inputs named (samples file, baseline bundle),
        and the region against the store's policy. Writes nothing but the workdir itself;
        raises PreflightError naming what is wrong."""
        try:
            self.pipeline.validate()
            if "bundle" in steps:
                key = self._private_key()
                try:
                    pki.load_private_key(key.read_bytes())
                except (ValueError, TypeError, InvalidInputError) as exc:
                    raise PreflightError(
                        f"publisher key {key} is not a usable private key ({exc}); make one "
                        "with `trainer keygen --out DIR`"
                    ) from None
            if "train" in steps:
                self._check_device()
                self.kind.preflight(self.pipeline)
            self._check_writable(self.workdir.root, "workdir")
            if "ingest" in steps:
                self._check_writable(self._store_path(), "feature store [store] path")
                self._check_region()
                # Reads a CSV source under its limits; a sklearn source needs scikit-learn.
                self._source_digest()
                if self.samples is not None and not self.samples.is_file():
                    raise PreflightError(f"--samples {self.samples}: no such file")
            if self.baseline is not None and not (self.baseline / "model.onnx").is_file():
                raise PreflightError(
                    f"--baseline {self.baseline}: no model.onnx there; pass the current "
                    "model's bundle directory"
                )
        except PreflightError:
            raise
        except RegionNotAllowedError:
            raise
        except (EdgefleetError, OSError) as exc:
            raise PreflightError(f"preflight: {exc}") from None

    def _check_device(self) -> None:
        if self.pipeline.train.device != "cuda":
            return
        import torch  # only when CUDA is asked for: checking for it needs torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise PreflightError(
                f"{self.pipeline.path.name}: train.device = 'cuda' but no CUDA device is "
                "available here; set device = 'cpu' (or 'auto': CUDA when present) in [train]"
            )
        if self.ctx.local_rank >= count:
            raise PreflightError(
                f"LOCAL_RANK {self.ctx.local_rank} but only {count} CUDA device(s) here; run "
                "at most one process per GPU"
            )

    @staticmethod
    def _check_writable(path: Path, what: str) -> None:
        """``path`` (or, if it does not exist yet, the nearest folder above it) takes a file."""
        probe = path
        while not probe.exists() and probe.parent != probe:
            probe = probe.parent
        if not probe.is_dir():
            raise PreflightError(f"{what} {path}: {probe} is not a directory")
        try:
            with tempfile.TemporaryFile(dir=probe, prefix=".preflight-"):
                pass
        except OSError as exc:
            raise PreflightError(
                f"{what} {path} is not writable ({exc.strerror} in {probe})"
            ) from None

    def _check_region(self) -> None:
        store = self._store_path()
        policy_file = store / regions.POLICY_FILE
        if policy_file.exists():
            policy = regions.read_policy_file(policy_file)
        else:
            policy = self.pipeline.store.allowed_regions or [regions.ANY_REGION]
        region = self.pipeline.data.region
        if not regions.allows(policy, region):
            raise RegionNotAllowedError(
                f"{self.pipeline.path.name}: data.region = {region!r} is not allowed by the "
                f"feature store {store} (allowed_regions {policy}); the store's owner sets the "
                f"policy in {policy_file}"
            )

    def run_all(self) -> dict[str, Any]:
        tracing = TrainerTracing(self.pipeline.path.name)  # spans only where OTEL_* asks
        try:
            with tracing.run():
                self.preflight()
                for step in STEPS:
                    with tracing.step(step) as span:
                        outcome = self.run_step(step)
                        if span is not None:
                            span.set_attribute("edgefleet.outcome", outcome)
                if self.baseline is not None:
                    self.compare_with_baseline()
                return self.write_report()
        finally:
            self.close()

    def compare_with_baseline(self) -> dict[str, Any]:
        """Current model vs the new one on the recent (drifted) rows; acceptance.json."""
        assert self.baseline is not None
        split = self.split()
        if len(split.y_recent):
            X, y, data = split.X_recent, split.y_recent, "held-out device samples"
        else:
            X, y, data = split.X_test, split.y_test, "the base test split (no device samples)"
        result = accept(self.baseline / "model.onnx", self.workdir.export_dir / "model.onnx",
                        X, y, self.margin, data, task=self.task, alpha=self.alpha)
        self.progress(f"[accept] {result['summary']} ({data})")
        _write_json(self.workdir.acceptance, result)
        return result

    # ------------------------------------------------------------------ data
    def _store_path(self) -> Path:
        path = Path(self.pipeline.store.path)
        return path if path.is_absolute() else self.workdir.root / path

    def _store(self) -> FeatureStore:
        if self._feature_store is None:
            self._feature_store = FeatureStore(
                self._store_path(), allowed_regions=self.pipeline.store.allowed_regions
            )
        return self._feature_store

    def close(self) -> None:
        if self._feature_store is not None:
            self._feature_store.close()
            self._feature_store = None

    def _load_raw(self) -> Any:
        d = self.pipeline.data
        return load_source(d.source, label=d.label, pii=d.pii, base_dir=self.pipeline.base_dir,
                           task=d.task)

    def _source_digest(self) -> str:
        d = self.pipeline.data
        if urls.source_kind(d.source) not in ("sklearn", "csv"):
            # A database, an API, a folder or a stream may have new rows at any time: the
            # step always runs, and gives back the same snapshot when nothing is new (so
            # the steps after it stay cached).
            return f"live:{time.time_ns()}"
        return source_fingerprint(d.source, base_dir=self.pipeline.base_dir)

    def _source_key(self) -> str:
        from trainer.ingest.batch import source_key
        return source_key(self.pipeline.data)

    def snapshot(self) -> Snapshot:
        if self._snapshot is None:
            store = self._store()
            snap = store.get(_read_json(self.workdir.ingest)["snapshot"])
            store.check_region(snap)
            self._snapshot = snap
        return self._snapshot

    def sample_snapshots(self) -> list[Snapshot]:
        store = self._store()
        snaps = [store.get(i) for i in _read_json(self.workdir.ingest).get("samples", [])]
        for snap in snaps:
            store.check_region(snap)
        return snaps

    def _split_one(self, snap: Snapshot) -> tuple[np.ndarray, ...]:
        from sklearn.model_selection import train_test_split

        idx = np.arange(len(snap.y))
        if len(idx) < 2:
            return snap.X[idx], snap.y[idx], snap.X[:0], snap.y[:0]
        stratify = None
        if snap.task == "classification":  # stratified only where there are classes
            counts = np.bincount(snap.y)
            stratify = snap.y if counts[counts > 0].min() >= 2 else None
        try:
            train_idx, test_idx = train_test_split(
                idx, test_size=self.pipeline.data.test_fraction, stratify=stratify,
                random_state=self.pipeline.train.seed,
            )
        except ValueError:  # too few rows per class for a stratified split
            train_idx, test_idx = train_test_split(
                idx, test_size=self.pipeline.data.test_fraction,
                random_state=self.pipeline.train.seed,
            )
        return snap.X[train_idx], snap.y[train_idx], snap.X[test_idx], snap.y[test_idx]

    def split(self) -> Split:
        """Base data split as configured; device samples split alike and added to both sides.

        Samples are few next to the base data but are the new distribution: their training
        rows are repeated until they number at least half the base training rows.
        """
        Xtr, ytr, Xte, yte = self._split_one(self.snapshot())
        parts = [self._split_one(s) for s in self.sample_snapshots()]
        if not parts:
            return Split(Xtr, ytr, Xte, yte, Xte[:0], yte[:0])
        sXtr = np.concatenate([p[0] for p in parts])
        sytr = np.concatenate([p[1] for p in parts])
        sXte = np.concatenate([p[2] for p in parts])
        syte = np.concatenate([p[3] for p in parts])
        repeat = max(1, math.ceil(len(ytr) / (2 * max(1, len(sytr)))))
        return Split(np.concatenate([Xtr, *[sXtr] * repeat]),
                     np.concatenate([ytr, *[sytr] * repeat]),
                     np.concatenate([Xte, sXte]), np.concatenate([yte, syte]), sXte, syte)

    # ------------------------------------------------------------------ steps
    def _step_ingest(self, key: str) -> None:
        d = self.pipeline.data
        store = self._store()
        if urls.source_kind(d.source) in ("sklearn", "csv"):
            raw: Any = self._load_raw()
            snap = None
        else:
            from trainer.ingest.batch import ingest_source
            raw = None
            if self.samples is not None:  # checked against the current chain's columns
                found = store.cursor(self._source_key())
                raw = store.get(found[0]) if found else None
            snap = ingest_source(store, d, self.pipeline.base_dir, self.progress)
            raw = raw or snap
        # The samples file is read (strictly) before anything is ingested: a refused file
        # leaves the store as it was.
        groups = None if self.samples is None else load_samples(
            self.samples, feature_names=list(raw.feature_names), labels=list(raw.labels),
            pii=list(d.pii), image_shape=raw.image_shape, target=raw.target)
        if snap is None:
            snap = store.ingest(raw, region=d.region, pii_action=d.pii_action, parent=d.parent)
        self.progress(f"[ingest] snapshot {snap.id} ({len(snap.y)} rows, region {snap.region})")
        doc: dict[str, Any] = {"snapshot": snap.id, "store": str(store.path)}
        if groups is not None:
            doc["samples"], doc["refused_rows"] = [], {}
            for group in groups:
                allowed = store.allowed_regions
                if not regions.allows(allowed, group.region):
                    doc["refused_rows"][group.region] = len(group.table.y)
                    self.progress(f"[ingest] refused {len(group.table.y)} sample rows from "
                                  f"region {group.region!r} (store allows {allowed})")
                    continue
                sample = store.ingest(group.table, region=group.region,
                                      pii_action=d.pii_action, parent=snap.id,
                                      origin=group.origin)
                doc["samples"].append(sample.id)
                self.progress(f"[ingest] device samples {sample.id} ({len(sample.y)} rows, "
                              f"region {sample.region}, from {group.origin['devices']})")
        _write_json(self.workdir.ingest, doc)

    def _step_train(self, key: str) -> None:
        self.kind.train(self, key)

    def _step_evaluate(self, key: str) -> None:
        measured = self.kind.evaluate(self)
        rows = len(self.split().y_test)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in measured.items())
        self.progress(f"[evaluate] fp32 test {shown} on {rows} rows")
        _write_json(self.workdir.evaluate, {"fp32": {**measured, "rows": rows}})

    def _step_compress(self, key: str) -> None:
        self.kind.compress(self, key)

    def _step_export(self, key: str) -> None:
        from trainer import onnx_tools

        e = self.pipeline.export
        comp = self.workdir.compress_dir
        out = self.workdir.export_dir
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.iterdir():
            stale.unlink()
        split = self.split()
        rows = split.X_test[: e.check_rows]
        final = out / "model.onnx"
        final.write_bytes((comp / "compressed.onnx").read_bytes())
        checks = self.kind.export_checks(self, rows, final)
        failed = [name for name, c in checks.items() if not c["ok"]]
        if failed:
            raise InvalidInputError(f"export check failed for {failed}: {checks}")
        fp32_path = comp / "fp32.onnx"
        measured = {
            "fp32": metrics.measure(self.task, onnx_tools.run_onnx(fp32_path, split.X_test),
                                    split.y_test),
            "compressed": metrics.measure(self.task, onnx_tools.run_onnx(final, split.X_test),
                                          split.y_test),
        }
        latency = {
            name: {f"batch{b}": onnx_tools.latency_us(path, split.X_test, b) for b in (1, 64)}
            for name, path in (("fp32", fp32_path), ("compressed", final))
        }
        sizes = {"onnx_fp32": fp32_path.stat().st_size, "onnx_compressed": final.stat().st_size}
        if (out / "model.tflite").exists():
            sizes["tflite"] = (out / "model.tflite").stat().st_size
        size_ratio = sizes["onnx_compressed"] / sizes["onnx_fp32"]
        latency_ratio = latency["compressed"]["batch64"] / latency["fp32"]["batch64"]
        shown = ", ".join(f"{k} {v:.4f}" for k, v in measured["compressed"].items())
        self.progress(f"[export] compressed {shown}, size {size_ratio:.3f}x, batch-64 latency "
                      f"{latency_ratio:.3f}x")
        _write_json(out / "export.json", {"checks": checks, "metrics": measured,
                                          "latency_us": latency, "sizes": sizes,
                                          "latency_note": "median of 200 runs, 1 intra-op "
                                                          "thread, ONNX Runtime CPU"})

    def _step_profile(self, key: str) -> None:
        from trainer import onnx_tools
        from trainer.profile import build_profile, class_prediction, value_prediction

        p = self.pipeline.profile
        snap, split = self.snapshot(), self.split()
        output = onnx_tools.run_onnx(self.workdir.export_dir / "model.onnx", split.X_train)
        prediction = (class_prediction(output.argmax(1), snap.labels)
                      if self.task == "classification"
                      else value_prediction(metrics.values(output), p.bins))
        profile = build_profile(split.X_train, snap.feature_names, prediction=prediction,
                                bins=p.bins, sample_rows=p.sample_rows,
                                seed=self.pipeline.train.seed)
        profile["snapshot"] = snap.id
        _write_json(self.workdir.profile, profile)

    def _private_key(self) -> Path:
        candidates = [self.publisher_key,
                      Path(os.environ["EDGEFLEET_PUBLISHER_KEY"])
                      if os.environ.get("EDGEFLEET_PUBLISHER_KEY") else None]
        if self.pipeline.bundle.publisher_key:
            candidates.append(self.pipeline.base_dir / self.pipeline.bundle.publisher_key)
        for path in candidates:
            if path is not None:
                if not path.exists():
                    raise InvalidInputError(f"publisher key {path} does not exist")
                return path
        raise InvalidInputError(
            "no publisher key: set [bundle] publisher_key, pass --publisher-key, or set "
            "$EDGEFLEET_PUBLISHER_KEY"
        )

    def _publisher_public_digest(self) -> str:
        key = pki.load_private_key(self._private_key().read_bytes())
        return settings_digest(pki.public_key_pem(key).decode())

    def _step_bundle(self, key: str) -> None:
        from trainer import onnx_tools
        from trainer.bundle import build_bundle
        from trainer.tflite import INPUT_KEY as TFLITE_INPUT
        from trainer.tflite import OUTPUT_KEY as TFLITE_OUTPUT
        from trainer.tflite import SIGNATURES

        b = self.pipeline.bundle
        snap, split = self.snapshot(), self.split()
        export = _read_json(self.workdir.export_dir / "export.json")
        recipe = _read_json(self.workdir.compress_dir / "compress.json")
        final = self.workdir.export_dir / "model.onnx"
        smoke = split.X_test[: b.smoke_rows]
        expected = onnx_tools.run_onnx(final, smoke)
        tflite = self.workdir.export_dir / "model.tflite"
        manifest = {
            "name": b.name,
            "version": b.version,
            "task": self.task,
            "input": {
                "name": onnx_tools.INPUT_NAME, "dtype": "float32",
                "shape": [-1, len(snap.feature_names)],
                "features": _manifest_features(snap),
                "pii_columns": snap.schema.get("pii", []),
            },
            "output": self._manifest_output(snap),
            "metrics": {**export["metrics"], "latency_us": export["latency_us"],
                        "sizes": export["sizes"]},
            "lineage": {"snapshot": snap.id, "parent_snapshot": snap.lineage.get("parent"),
                        "source": snap.lineage.get("source"), "region": snap.region,
                        **_ingest_lineage(snap),
                        "pipeline": self.pipeline.path.name, "train_key": self._state("train")
                        and self._state("train")["key"],  # type: ignore[index]
                        **self.kind.lineage(self)},
            "compression": recipe,
            "runtime": {"onnx": {"file": "model.onnx", "intra_op_num_threads": 1},
                        "tflite": {"file": "model.tflite", "signatures": SIGNATURES,
                                   "input": TFLITE_INPUT, "output": TFLITE_OUTPUT}
                        if tflite.exists() else None,
                        "preferred": "onnx"},
            "smoke_test": {"file": "model.onnx",
                           "inputs": smoke.astype(float).tolist(),
                           "expected": expected.astype(float).tolist(),
                           **self._smoke_tolerance(export, recipe)},
        }
        build_bundle(self.workdir.bundle, manifest=manifest, onnx_model=final,
                     profile=_read_json(self.workdir.profile), private_key=self._private_key(),
                     tflite_model=tflite if tflite.exists() else None)
        self.progress(f"[bundle] signed {b.name} v{b.version} -> {self.workdir.bundle}")

    def _manifest_output(self, snap: Snapshot) -> dict[str, Any]:
        from trainer import onnx_tools

        if self.task == "classification":
            return {"name": onnx_tools.OUTPUT_NAME, "kind": "probabilities",
                    "labels": snap.labels}
        return {"name": onnx_tools.VALUE_OUTPUT_NAME, "kind": "value", "shape": [-1, 1],
                "dtype": "float32", "target": snap.target}

    def _smoke_tolerance(self, export: dict[str, Any], recipe: dict[str, Any]) -> dict[str, Any]:
        """Classification: probabilities within 0.02 and the same top class. Regression: an
        absolute tolerance, max(1e-3, 1e-4 * max|y_train|); a quantized model gets what export
        measured between it (ONNX, plus TFLite when there is one) and the model it was made
        from, bounded by 1% of max|y_train|."""
        if self.task == "classification":
            return {"atol": 0.02, "require_same_argmax": True}
        scale = float(np.abs(self.split().y_train).max())
        atol = max(1e-3, 1e-4 * scale)
        if recipe.get("quantize", {}).get("mode", "none") != "none":
            # Both runtimes' distance from the model they were made from, so a TFLite answer
            # also passes against the ONNX model's expected values.
            checks = export["checks"]
            measured = sum(float(checks[c]["max_abs_diff"]) for c in ("onnx_compressed", "tflite")
                           if c in checks)
            atol = min(max(atol, measured), max(atol, 0.01 * scale))
        return {"atol": atol, "require_same_argmax": False}

    # ------------------------------------------------------------------ report
    def write_report(self) -> dict[str, Any]:
        w = self.workdir
        snap = self.snapshot()
        export = _read_json(w.export_dir / "export.json")
        recipe = _read_json(w.compress_dir / "compress.json")
        evaluate = _read_json(w.evaluate)
        m, lat, sizes = export["metrics"], export["latency_us"], export["sizes"]
        report = {
            "pipeline": str(self.pipeline.path),
            "dataset": {"snapshot": snap.id, "region": snap.region, "rows": len(snap.y),
                        "features": len(snap.feature_names), "lineage": snap.lineage},
            "task": self.task,
            "model": self.kind.describe(self),
            "metrics": self._report_metrics(m, evaluate),
            "sizes": {**sizes, "ratio": sizes["onnx_compressed"] / sizes["onnx_fp32"]},
            "latency_us": {**lat, "ratio_batch64": lat["compressed"]["batch64"]
                           / lat["fp32"]["batch64"],
                           "ratio_batch1": lat["compressed"]["batch1"] / lat["fp32"]["batch1"]},
            "compression": recipe,
            "checks": export["checks"],
            "bundle": {"path": str(w.bundle), "digest": settings_digest(
                [(p.name, file_digest(p)) for p in sorted(w.bundle.iterdir())])},
            "steps": self.outcomes,
            "samples": [{"snapshot": s.id, "rows": len(s.y), "region": s.region,
                         "origin": s.lineage.get("origin")} for s in self.sample_snapshots()],
        }
        if self.workdir.acceptance.exists() and self.baseline is not None:
            report["acceptance"] = _read_json(self.workdir.acceptance)
        _write_json(w.report, report)
        return report

    def _report_metrics(self, m: dict[str, Any], evaluate: dict[str, Any]) -> dict[str, Any]:
        framework = {k: v for k, v in evaluate["fp32"].items() if k != "rows"}
        if self.task == "classification":
            fp32 = {"accuracy": m["fp32"]["accuracy"], "framework": framework}
            if self.pipeline.model.kind in ("mlp", "cnn", "torch"):
                fp32["torch_accuracy"] = framework["accuracy"]
            return {
                "fp32": fp32,
                "compressed": {"accuracy": m["compressed"]["accuracy"]},
                "accuracy_drop_points": 100 * (m["fp32"]["accuracy"]
                                               - m["compressed"]["accuracy"]),
            }
        return {"fp32": {**m["fp32"], "framework": framework}, "compressed": m["compressed"],
                "mae_increase": m["compressed"]["mae"] - m["fp32"]["mae"]}


def _manifest_features(snap: Snapshot) -> list[dict[str, Any]]:
    """The model's input columns; a categorical one carries its vocabulary (code k is the
    k-th category, 0 is missing or unseen): the agent encodes raw values with it."""
    categories = (snap.encoding or {}).get("categories", {})
    out: list[dict[str, Any]] = []
    for name in snap.feature_names:
        feature: dict[str, Any] = {"name": name, "dtype": "float32", "pii": False}
        if name in categories:
            feature["categories"] = list(categories[name])
        out.append(feature)
    return out


def _ingest_lineage(snap: Snapshot) -> dict[str, Any]:
    """What the ingest recorded about where the rows came from (no credentials: sources are
    recorded redacted), without per-file lists."""
    origin = snap.lineage.get("origin") or {}
    if origin.get("kind") not in ("sql", "parquet", "http", "stream"):
        return {}
    summary = {k: v for k, v in origin.items() if k != "files"}
    if "files" in origin:
        summary["files_read"] = len(origin["files"])
    return {"ingest": summary}


# An fp32 export must match PyTorch to float rounding. An int8 export legitimately moves
# probabilities near a decision boundary, so it is held to top-1 agreement and a mean bound.
# A skl2onnx conversion of a tree ensemble compares float32 thresholds where scikit-learn
# compares float64 ones, so a rare row near a threshold may differ: held to top-1 agreement
# on 99% of rows and a mean bound.
EXACT = {"max_atol": 1e-4, "mean_atol": 1e-5, "min_agreement": 1.0}
QUANTIZED = {"max_atol": 1.0, "mean_atol": 0.02, "min_agreement": 0.97}
CONVERTED = {"max_atol": 1.0, "mean_atol": 0.01, "min_agreement": 0.99}


def _compare(got: np.ndarray, want: np.ndarray, tolerance: dict[str, float],
             task: str = "classification") -> dict[str, Any]:
    got = np.asarray(got, dtype=np.float64).reshape(len(got), -1)
    want = np.asarray(want, dtype=np.float64).reshape(len(want), -1)
    if got.shape != want.shape:
        return {"ok": False, "shape": [list(got.shape), list(want.shape)], "rows": len(want),
                **tolerance}
    diff = np.abs(got - want)
    out: dict[str, Any] = {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
                           "rows": len(want), **tolerance}
    ok = (out["max_abs_diff"] <= tolerance["max_atol"]
          and out["mean_abs_diff"] <= tolerance["mean_atol"])
    if task == "classification":
        agreement = float((got.argmax(1) == want.argmax(1)).mean())
        out["argmax_agreement"] = agreement
        ok = ok and agreement >= tolerance["min_agreement"]
    elif "min_rows_within" in tolerance:
        within = float((diff.max(1) <= tolerance["row_atol"]).mean())
        out["rows_within_row_atol"] = within
        ok = ok and within >= tolerance["min_rows_within"]
    out["ok"] = bool(ok)
    return out
