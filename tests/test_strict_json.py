"""Untrusted JSON is read by one strict loader (``fleetcore.strict_json``) everywhere.

Duplicate keys (two parsers could read two different values), NaN/Infinity, nesting past the
parser's recursion limit and oversized input are refused with an ``InvalidInputError`` that
names what was being read; a bundle whose signed manifest is refused never reaches the model
store's pointer or its kept versions.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edge_agent.install.lifecycle import InstallState
from edge_agent.install.model_store import ModelStore
from edge_agent.reporting.drift import parse_profile
from fleetcore import strict_json
from fleetcore.bundle import MANIFEST, MAX_MANIFEST_BYTES, parse_manifest
from fleetcore.bundle_verify import verify_bundle_dir
from fleetcore.errors import InvalidInputError
from fleetcore.release import parse_document
from tests.test_bundle_security import Publisher, make_publisher, manifest_for, snapshot
from tests.test_install_lifecycle import NAME, _write_bundle
from trainer.bundle import sign_bundle


def _manifest_text(**overrides: Any) -> str:
    return json.dumps(manifest_for(Path("."), files={}, **overrides), sort_keys=True)


def _with_duplicate(text: str, key: str, value: str) -> bytes:
    """``text`` with ``key`` given a second time, last, at the top level."""
    assert text.endswith("}")
    return (text[:-1] + f', "{key}": {value}}}').encode()


# --- the loader -------------------------------------------------------------------------------


@pytest.mark.parametrize(("data", "needle"), [
    (b'{"a": 1, "a": 2}', "duplicate key 'a'"),
    (b'{"a": {"b": 1, "b": 1}}', "duplicate key 'b'"),  # nested, even with equal values
    (b'{"a": NaN}', "NaN is not a JSON number"),
    (b'{"a": Infinity}', "Infinity is not a JSON number"),
    (b'{"a": -Infinity}', "-Infinity is not a JSON number"),
    (b"[" * 100_000 + b"]" * 100_000, "recursion depth"),
    (b'{"a": "\xff"}', "not UTF-8"),
    (b"x" * 65, "65 bytes; the limit is 64"),
], ids=["duplicate", "nested-duplicate", "nan", "infinity", "minus-infinity", "too-deep",
        "not-utf8", "too-large"])
def test_strict_loader_refuses(data: bytes, needle: str) -> None:
    with pytest.raises(InvalidInputError, match=f"^thing .*{needle}"):
        strict_json.loads(data, what="thing", max_bytes=64 if needle.startswith("65") else 10**7)


def test_strict_loader_reads_ordinary_json() -> None:
    assert strict_json.loads('{"a": [1, 2.5, null, true], "b": {"c": "d"}}', what="x") == {
        "a": [1, 2.5, None, True], "b": {"c": "d"}}


# --- the manifest -----------------------------------------------------------------------------


def test_manifest_with_a_duplicate_key_is_refused() -> None:
    text = _manifest_text(version=2)
    assert parse_manifest(text.encode())["version"] == 2
    with pytest.raises(InvalidInputError, match=r"^manifest is not valid JSON: duplicate key "
                                                r"'version'"):
        parse_manifest(_with_duplicate(text, "version", "3"))


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_manifest_with_nan_or_infinity_is_refused(constant: str) -> None:
    text = _manifest_text(smoke_test={"inputs": [[0.0]], "expected": [0], "atol": 0.5})
    doctored = text.replace('"atol": 0.5', f'"atol": {constant}')
    assert doctored != text
    with pytest.raises(InvalidInputError, match=f"{constant} is not a JSON number"):
        parse_manifest(doctored.encode())


def test_manifest_nested_too_deep_or_too_large_is_refused() -> None:
    deep = _manifest_text(lineage={"x": 0}).replace('{"x": 0}', "[" * 50_000 + "]" * 50_000)
    with pytest.raises(InvalidInputError, match=r"^manifest is not valid JSON: .*recursion"):
        parse_manifest(deep.encode())
    large = _manifest_text(lineage={"pad": "x" * MAX_MANIFEST_BYTES})
    with pytest.raises(InvalidInputError, match=f"^manifest is .* bytes; the limit is "
                                                f"{MAX_MANIFEST_BYTES}$"):
        parse_manifest(large.encode())


# --- the other untrusted documents go through the same loader --------------------------------


@pytest.mark.parametrize(("parse", "what"), [
    (parse_document, "release document"),
    (parse_profile, "profile"),
    (parse_manifest, "manifest"),
], ids=["release", "profile", "manifest"])
def test_every_parser_refuses_duplicate_keys_the_same_way(
    parse: Callable[[bytes], Any], what: str
) -> None:
    with pytest.raises(InvalidInputError, match=f"^{what} is not valid JSON: duplicate key 'k'"):
        parse(b'{"k": 1, "k": 2}')


# --- the agent: a refused manifest changes nothing that serves -------------------------------


def _signed(out: Path, version: int, publisher: Publisher,
            doctor: Callable[[str], bytes] | None = None) -> Path:
    """A real bundle (ONNX model, smoke test) with a full manifest, signed by ``publisher``;
    ``doctor`` rewrites the manifest text before signing (so the signature covers it)."""
    _write_bundle(out, version, seed=version)
    (out / "model.sig").unlink()
    manifest = json.loads((out / MANIFEST).read_text())
    manifest.update(created="2025-06-15T12:00:00Z", metrics={}, lineage={}, compression={},
                    runtime={})
    text = json.dumps(manifest, sort_keys=True)
    (out / MANIFEST).write_bytes(doctor(text) if doctor else text.encode())
    sign_bundle(out, publisher.private_key)
    return out


def test_refused_manifest_leaves_the_model_store_unchanged(tmp_path: Path) -> None:
    publisher = make_publisher(tmp_path / "keys", "publisher")
    root = tmp_path / "models"
    store = ModelStore(root, verify=lambda path: verify_bundle_dir(path, [publisher.public_pem]))
    store.begin(NAME, 1, "sha256:" + "1" * 64, 1)
    assert store.install_from_dir(NAME, 1, _signed(tmp_path / "v1", 1, publisher)).state \
        is InstallState.ACTIVE
    store.commit(NAME, 1)
    serving = {k: v for k, v in snapshot(root).items() if not k.endswith("installs.json")}

    # Signed by the trusted publisher, but the manifest names two versions: refused.
    bad = _signed(tmp_path / "v2", 2, publisher,
                  lambda text: _with_duplicate(text, "version", "1"))
    store.begin(NAME, 2, "sha256:" + "2" * 64, 1)
    outcome = store.install_from_dir(NAME, 2, bad)
    assert outcome.state is InstallState.FAILED
    assert "duplicate key 'version'" in outcome.reason
    assert store.active(NAME) == (1, root / NAME / "versions" / "1")
    after = {k: v for k, v in snapshot(root).items() if not k.endswith("installs.json")}
    assert after == serving  # pointer, kept versions and staging as they were
    assert {r["version"]: r["state"] for r in store.status()} == {1: "committed", 2: "failed"}
