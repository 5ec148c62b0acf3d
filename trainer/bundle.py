"""Assemble and sign the model bundle (docs/design.md §4a) in the OpenSSF model-signing format."""

from __future__ import annotations

import datetime as dt
import importlib
import json
import shutil
from pathlib import Path
from typing import Any

from fleetcore.bundle import (
    BUNDLE_FORMAT,
    MANIFEST,
    MAX_BUNDLE_SIGNATURES,
    MODEL_ONNX,
    MODEL_TFLITE,
    PROFILE,
    SIGNATURE,
    parse_manifest,
    signature_names,
)
from fleetcore.errors import InvalidInputError
from fleetcore.files import file_digest

__all__ = ["build_bundle", "cosign_bundle", "sign_bundle"]


def sign_bundle(bundle: Path, private_key: Path) -> Path:
    """Sign every file of ``bundle`` into ``bundle/model.sig`` (Sigstore bundle v0.3, DSSE).
    Signing again starts over: co-signatures (``model.sig.N``) are removed with it."""
    signature = bundle / SIGNATURE
    for name in signature_names(p.name for p in bundle.iterdir()):
        (bundle / name).unlink()
    # Imported here: training workers (torchrun, a GPU image) never sign, and the library with
    # its dependencies is heavy; only the bundle step needs it.
    model_signing = importlib.import_module("model_signing")
    model_signing.signing.Config().use_elliptic_key_signer(private_key=private_key).sign(
        bundle, signature
    )
    return signature


def cosign_bundle(bundle: Path, private_key: Path) -> Path:
    """Add a co-signature (``model.sig.N``, the next free N) by another publisher key over the
    same files as ``model.sig`` (a fleet whose root asks for k-of-n publisher signatures)."""
    present = signature_names(p.name for p in bundle.iterdir())
    if SIGNATURE not in present:
        raise InvalidInputError(f"bundle {bundle} has no {SIGNATURE} yet; sign it first")
    free = [n for n in range(2, MAX_BUNDLE_SIGNATURES + 1) if f"{SIGNATURE}.{n}" not in present]
    if not free:
        raise InvalidInputError(
            f"bundle {bundle} already carries {MAX_BUNDLE_SIGNATURES} signatures")
    signature = bundle / f"{SIGNATURE}.{free[0]}"
    model_signing = importlib.import_module("model_signing")
    hashing = model_signing.hashing.Config().set_ignored_paths(paths=present)
    model_signing.signing.Config().use_elliptic_key_signer(
        private_key=private_key).set_hashing_config(hashing).sign(bundle, signature)
    return signature


def build_bundle(
    out: Path,
    *,
    manifest: dict[str, Any],
    onnx_model: Path,
    profile: dict[str, Any],
    private_key: Path,
    tflite_model: Path | None = None,
    now: dt.datetime | None = None,
) -> Path:
    """Write a signed bundle to ``out`` (built beside it, then renamed into place)."""
    staging = out.with_name(out.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    shutil.copyfile(onnx_model, staging / MODEL_ONNX)
    if tflite_model is not None:
        shutil.copyfile(tflite_model, staging / MODEL_TFLITE)
    (staging / PROFILE).write_text(json.dumps(profile, separators=(",", ":")))
    doc = {
        "format": BUNDLE_FORMAT,
        "created": (now or dt.datetime.now(dt.UTC)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        **manifest,
    }
    doc["files"] = {
        p.name: {"sha256": file_digest(p).removeprefix("sha256:"), "size": p.stat().st_size}
        for p in sorted(staging.iterdir())
    }
    data = json.dumps(doc, indent=2, sort_keys=True).encode()
    parse_manifest(data)  # what we write must be what agents accept
    (staging / MANIFEST).write_bytes(data)
    sign_bundle(staging, private_key)
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out
