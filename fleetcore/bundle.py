"""The model bundle: file names, the manifest format, and a bounded manifest parser.

A bundle is a directory: ``manifest.json``, ``model.onnx`` (what agents serve), optionally
``model.tflite``, ``profile.json`` (the drift reference) and ``model.sig`` (the OpenSSF
model-signing signature over every other file, made with the publisher key). A fleet whose
root asks for k-of-n publisher signatures takes co-signatures beside it: ``model.sig.2`` ..
``model.sig.8`` (``trainer cosign``), each over the same files, none over another signature.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fleetcore import strict_json
from fleetcore.errors import InvalidInputError

__all__ = [
    "BUNDLE_FORMAT",
    "MANIFEST",
    "MAX_BUNDLE_SIGNATURES",
    "MAX_MANIFEST_BYTES",
    "MODEL_ONNX",
    "MODEL_TFLITE",
    "PROFILE",
    "SIGNATURE",
    "TASKS",
    "manifest_task",
    "parse_manifest",
    "signature_names",
]

BUNDLE_FORMAT = "edgefleet.bundle/v1"
MANIFEST = "manifest.json"
MODEL_ONNX = "model.onnx"
MODEL_TFLITE = "model.tflite"
PROFILE = "profile.json"
SIGNATURE = "model.sig"
MAX_BUNDLE_SIGNATURES = 8  # model.sig and model.sig.2 .. model.sig.8
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
# What a model predicts: a class (``output.labels``, probabilities ``[n, classes]``) or a number
# (``output.kind == "value"``, float32 ``[n, 1]``). A manifest without ``task`` is a classifier.
TASKS = ("classification", "regression")

_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "format": str,
    "name": str,
    "version": int,
    "created": str,
    "input": dict,
    "output": dict,
    "metrics": dict,
    "lineage": dict,
    "compression": dict,
    "runtime": dict,
    "smoke_test": dict,
}


def parse_manifest(data: bytes) -> dict[str, Any]:
    """Parse and check a manifest from untrusted bytes (strict JSON, size-limited, typed fields:
    duplicate keys, NaN/Infinity and deep nesting are refused by ``fleetcore.strict_json``)."""
    doc = strict_json.loads(data, what="manifest", max_bytes=MAX_MANIFEST_BYTES)
    if not isinstance(doc, dict):
        raise InvalidInputError("manifest must be a JSON object")
    for key, kind in _REQUIRED.items():
        if not isinstance(doc.get(key), kind) or isinstance(doc.get(key), bool):
            raise InvalidInputError(f"manifest field {key!r} is missing or not a {kind}")
    if doc["format"] != BUNDLE_FORMAT:
        raise InvalidInputError(
            f"manifest format must be {BUNDLE_FORMAT!r}; got {doc['format']!r}"
        )
    if doc["version"] <= 0:
        raise InvalidInputError(f"manifest version must be > 0; got {doc['version']}")
    features = doc["input"].get("features")
    if not isinstance(features, list) or not features:
        raise InvalidInputError("manifest input.features must be a non-empty list")
    task = doc.get("task", "classification")
    if task not in TASKS:
        raise InvalidInputError(
            f"manifest task must be 'classification' or 'regression'; got {task!r}")
    if task == "regression":
        out = doc["output"]
        if out.get("kind") != "value" or not isinstance(out.get("name"), str) or not out["name"]:
            raise InvalidInputError(
                "manifest output of a regression model must be {\"kind\": \"value\", "
                "\"name\": ...}")
        return doc
    labels = doc["output"].get("labels")
    if not isinstance(labels, list) or not labels:
        raise InvalidInputError("manifest output.labels must be a non-empty list")
    return doc


def manifest_task(doc: dict[str, Any]) -> str:
    """The task of a manifest ``parse_manifest`` accepted: "classification" or "regression"."""
    return "regression" if doc.get("task") == "regression" else "classification"


def signature_names(files: Iterable[str]) -> list[str]:
    """The signature files among a bundle's ``files`` (top-level names), ``model.sig`` first.

    A name that looks like a signature but is not one of ``model.sig.2`` ..
    ``model.sig.<MAX_BUNDLE_SIGNATURES>`` is refused rather than treated as data.
    """
    names = set(files)
    found = [SIGNATURE] if SIGNATURE in names else []
    allowed = {f"{SIGNATURE}.{n}": n for n in range(2, MAX_BUNDLE_SIGNATURES + 1)}
    for name in sorted(names):
        if name.startswith(SIGNATURE + "."):
            if name not in allowed:
                raise InvalidInputError(
                    f"bundle file {name!r} looks like a signature but is not one of "
                    f"{SIGNATURE}.2 .. {SIGNATURE}.{MAX_BUNDLE_SIGNATURES}")
            found.append(name)
    return sorted(found, key=lambda n: allowed.get(n, 1))
