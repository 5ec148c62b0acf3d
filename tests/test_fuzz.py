"""Property-based tests (Hypothesis) for every parser of untrusted bytes: whatever arrives, the
parser returns a checked value or raises a typed error (``UntrustedInputError``), and a refusal
leaves persisted state as it was. Open Inference Protocol requests (HTTP bodies and gRPC
messages) are among them.

``make test`` runs a short pass (the ``ci`` profile); ``make fuzz`` a long one
(``EDGEFLEET_FUZZ=long``, many more examples and a per-example deadline that catches inputs
whose cost grows without bound). Inputs are both raw bytes and valid documents with one part
replaced by an arbitrary JSON value, which reaches far deeper into each parser.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from edgefleet.v1 import agent_pb2, common_pb2
from edgefleet.v1 import grpc_predict_v2_pb2 as pb
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from control_plane.api.convert import telemetry_from_proto
from control_plane.domain import telemetry_segment as seg
from control_plane.domain.records import TelemetryRecord
from control_plane.domain.telemetry import derive, screen
from edge_agent.install.release_trust import ReleaseTrust
from edge_agent.reporting.drift import parse_profile
from edge_agent.reporting.wire import decode_columns, encode_records, records_of
from edge_agent.serving.core import ModelSignature
from edge_agent.serving.grpc_server import rows_from_proto
from edge_agent.serving.http import parse_infer_request
from fleetcore import pki, signing, strict_json
from fleetcore import root as fleet_root
from fleetcore.bundle import parse_manifest
from fleetcore.errors import UntrustedInputError
from fleetcore.mqtt_wire import parse_message
from fleetcore.release import (
    Arm,
    ModelRelease,
    SignedRelease,
    encode_document,
    parse_document,
    sign_release,
)
from trainer.config import DataSettings
from trainer.ingest.follow import check_rows as check_stream_rows
from trainer.ingest.follow import parse_message as parse_stream_message
from trainer.profile import build_profile
from trainer.sources import load_source

settings.register_profile("ci", max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=3000, deadline=2000,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("long" if os.environ.get("EDGEFLEET_FUZZ") == "long" else "ci")

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner,
                                                                max_size=5),
    max_leaves=30,
)


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a JSON tree (dict keys and list indexes), the root included."""
    out = [prefix]
    if isinstance(doc, dict):
        for key, value in doc.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            out += _paths(value, (*prefix, i))
    return out


@st.composite
def mutated(draw: st.DrawFn, valid: Any) -> bytes:
    """``valid`` with one place replaced by any JSON value (or removed), as JSON bytes."""
    doc = copy.deepcopy(valid)
    path = draw(st.sampled_from(_paths(doc)))
    value = draw(JSON)
    if not path:
        doc = value
    else:
        parent = doc
        for step in path[:-1]:
            parent = parent[step]
        if isinstance(parent, dict) and draw(st.booleans()):
            del parent[path[-1]]
        else:
            parent[path[-1]] = value
    return json.dumps(doc).encode()


def bytes_or_mutation(valid: Any) -> st.SearchStrategy[bytes]:
    return st.binary(max_size=2048) | mutated(valid)


# ---------------------------------------------------------------- the shared JSON loader


@given(st.binary(max_size=4096) | st.text(max_size=2048).map(str.encode))
def test_strict_json_returns_or_refuses(data: bytes) -> None:
    with contextlib.suppress(UntrustedInputError):
        strict_json.loads(data, what="fuzz", max_bytes=4096)


# ---------------------------------------------------------------- release documents


_KEY = pki.generate_key()
_VALID_RELEASE = json.loads(encode_document(
    "dev-0123456789abcdef", 5, 1_000.0, 2_000.0,
    [ModelRelease("digits", (Arm(1, "sha256:" + "a" * 64, 100, 0.9),
                             Arm(2, "sha256:" + "b" * 64, 100, 0.1)), 0.05)]))


@given(bytes_or_mutation(_VALID_RELEASE))
def test_release_document_parser_returns_or_refuses(data: bytes) -> None:
    try:
        doc = parse_document(data)
    except UntrustedInputError:
        return
    assert doc.serial >= 0 and all(0 <= a.weight <= 1 for m in doc.models for a in m.arms)


@given(mutated(_VALID_RELEASE))
def test_a_refused_signed_release_leaves_the_trust_state_unchanged(tmp_path_factory: Any,
                                                                   data: bytes) -> None:
    state = tmp_path_factory.mktemp("trust") / "release.json"
    trust = ReleaseTrust(state, _KEY.public_key(), "dev-0123456789abcdef")
    trust.accept(sign_release(json.dumps(_VALID_RELEASE).encode(), _KEY), 1_500.0)
    before = state.read_bytes()
    try:
        trust.accept(SignedRelease(data, sign_release(data, _KEY).signature), 1_500.0)
    except UntrustedInputError:
        assert state.read_bytes() == before


# ---------------------------------------------------------------- roots of trust


_ROOT_KEYS = [pki.generate_key() for _ in range(2)]
_ROOT_V1 = fleet_root.verify_initial_root(fleet_root.sign_root(fleet_root.build_root(
    1, 1_000.0, 9_000.0, {"root": ([k.public_key() for k in _ROOT_KEYS], 2),
                          "release": ([_KEY.public_key()], 1),
                          "publisher": ([_KEY.public_key()], 1),
                          "audit": ([_ROOT_KEYS[0].public_key()], 1)}), _ROOT_KEYS))
_VALID_ROOT_DOC = json.loads(fleet_root.parse_envelope(_ROOT_V1.envelope).payload)
_VALID_ROOT_ENVELOPE = json.loads(_ROOT_V1.envelope)


@given(bytes_or_mutation(_VALID_ROOT_DOC))
def test_root_document_parser_returns_or_refuses(data: bytes) -> None:
    try:
        doc = fleet_root.parse_root(data)
    except UntrustedInputError:
        return
    assert all(1 <= r.threshold <= len(r.keyids) for r in doc.roles.values())


def _signed_by_the_root_keys(payload: bytes) -> bytes:
    """An envelope around any payload, validly signed by both root keys: reaches the parser
    behind the signature check."""
    return json.dumps({"payloadType": signing.PURPOSES["root"],
                       "payload": base64.b64encode(payload).decode(),
                       "signatures": [{"keyid": s.keyid, "sig": base64.b64encode(s.sig).decode()}
                                      for s in (signing.sign_with_id(k, "root", payload)
                                                for k in _ROOT_KEYS)]}).encode()


@given(bytes_or_mutation(_VALID_ROOT_ENVELOPE)
       | mutated(_VALID_ROOT_DOC).map(_signed_by_the_root_keys))
def test_a_hostile_root_envelope_is_refused_and_the_trusted_root_stays(data: bytes) -> None:
    try:
        result = fleet_root.verify_root_update(_ROOT_V1, data, 1_500.0)
    except UntrustedInputError:
        return
    # Only a properly signed next version (or the trusted root itself) gets through.
    assert result == _ROOT_V1 or result.version == 2


# ---------------------------------------------------------------- bundle manifests


_VALID_MANIFEST = {
    "format": "edgefleet.bundle/v1", "name": "digits", "version": 1,
    "created": "2026-12-04T00:00:00Z",
    "input": {"name": "input", "features": ["f0", "f1"], "dtype": "float32"},
    "output": {"name": "probabilities", "labels": ["0", "1"]},
    "metrics": {"accuracy": 0.9}, "lineage": {"snapshot": "sha256:" + "c" * 64},
    "compression": {}, "runtime": {"onnx": "model.onnx"},
    "smoke_test": {"inputs": [[0.0, 1.0]], "expected": [[0.5, 0.5]]},
}


@given(bytes_or_mutation(_VALID_MANIFEST))
def test_manifest_parser_returns_or_refuses(data: bytes) -> None:
    with contextlib.suppress(UntrustedInputError):
        parse_manifest(data)


# ---------------------------------------------------------------- drift profiles


_RNG = np.random.default_rng(7)
_VALID_PROFILE = build_profile(_RNG.normal(size=(200, 3)).astype(np.float32), ["a", "b", "c"],
                               _RNG.integers(0, 2, size=200), ["no", "yes"], bins=10,
                               sample_rows=32, seed=7)


@given(bytes_or_mutation(_VALID_PROFILE))
def test_drift_profile_parser_returns_or_refuses(data: bytes) -> None:
    with contextlib.suppress(UntrustedInputError):
        parse_profile(data)


# ---------------------------------------------------------------- telemetry payloads


_VALID_PAYLOADS = {
    "arm_stats": {"model": "digits", "version": 1, "requests": 10, "errors": 0, "p50_ms": 0.1,
                  "p95_ms": 0.2, "labelled": 5, "correct": 4},
    "drift": {"model": "digits", "version": 1, "start": 1.0, "end": 2.0, "rows": 200,
              "score": 0.1, "drifted": False, "prediction_psi": 0.0, "drifted_features": []},
    "sample": {"model": "digits", "version": 1, "features": [[0.0, 1.0]], "labels": [1],
               "pii": {"email": ["ab" * 16]}},
}


@given(st.sampled_from(sorted(_VALID_PAYLOADS)).flatmap(
    lambda kind: st.tuples(st.just(kind), bytes_or_mutation(_VALID_PAYLOADS[kind]))))
def test_telemetry_payloads_derive_rows_or_are_skipped(case: tuple[str, bytes]) -> None:
    kind, payload = case
    rows, problems = derive("dev-1", [TelemetryRecord(1, kind, 1.0, payload)])
    assert len(rows) + len(problems) <= 1


# ---------------------------------------------------------------- MQTT wire messages


@pytest.mark.parametrize("message", [agent_pb2.HeartbeatRequest, agent_pb2.TelemetryBatch,
                                     agent_pb2.FetchBundleRequest, common_pb2.SignedRelease])
@given(data=st.binary(max_size=2048))
def test_mqtt_messages_parse_or_are_refused(message: Any, data: bytes) -> None:
    with contextlib.suppress(UntrustedInputError):
        parse_message(message, data)


# ---------------------------------------------------------------- telemetry columns


def _column_bytes(width: int) -> st.SearchStrategy[bytes]:
    """Mostly whole columns of 0..8 entries (deeper into the checks), sometimes ragged."""
    whole = st.integers(0, 8).flatmap(lambda n: st.binary(min_size=n * width,
                                                          max_size=n * width))
    return whole | st.binary(max_size=40)


@given(seqs=_column_bytes(8), created=_column_bytes(8), index=_column_bytes(1),
       sizes=st.lists(st.integers(0, 12), max_size=8).map(lambda v: np.array(
           v, dtype="<u4").tobytes()) | _column_bytes(4),
       kinds=st.lists(st.sampled_from(["error", "drift", "x" * 300, ""]), max_size=4),
       payloads=st.binary(max_size=60))
def test_telemetry_columns_are_read_whole_or_refused(seqs: bytes, created: bytes,
                                                     index: bytes, sizes: bytes,
                                                     kinds: list[str], payloads: bytes) -> None:
    batch = agent_pb2.TelemetryBatch(columns=agent_pb2.TelemetryColumns(
        seqs=seqs, created_at=created, kinds=kinds, kind_index=index, payload_sizes=sizes,
        payloads=payloads))
    try:
        columns = telemetry_from_proto(parse_message(agent_pb2.TelemetryBatch,
                                                     batch.SerializeToString()))
    except UntrustedInputError:
        return
    records = columns.records()
    assert len(records) == len(seqs) // 8 == len(index)
    assert b"".join(r.payload for r in records) == payloads
    kept, refused = screen("dev-1", columns)
    assert len(kept) + len(refused) == len(records)
    assert seg.decode(seg.encode(kept)) == kept.records()


# ---------------------------------------------------------------- the agent's stored batches

_COLUMNS = encode_records([(1, "drift", 1.0, b'{"a":1}'), (2, "error", 2.0, b""),
                           (3, "drift", 3.0, b"xyz")])


@given(data=st.binary(max_size=1024), flips=st.lists(st.tuples(st.integers(0, 10**6),
                                                                 st.integers(0, 255)),
                                                       max_size=4),
       use_raw=st.booleans())
def test_stored_telemetry_columns_decode_checked_or_are_refused(
    data: bytes, flips: list[tuple[int, int]], use_raw: bool
) -> None:
    """The outbox's sealed batch bodies (edge_agent/reporting/wire.py), raw or a valid one
    with bytes changed: every column agrees with the others, or ``InvalidInputError``."""
    body = bytearray(data if use_raw else _COLUMNS)
    for at, value in flips:
        if body:
            body[at % len(body)] = value
    try:
        cols = decode_columns(bytes(body))
    except UntrustedInputError:
        return
    n = len(cols.seqs)
    assert len(cols.created_at) == len(cols.kind_index) == len(cols.sizes) == n
    assert all(i < len(cols.kinds) for i in cols.kind_index)
    assert sum(cols.sizes) == len(cols.payloads)
    assert len(records_of(cols)) == n


# ---------------------------------------------------------------- CSV sources


CSV_TEXT = st.lists(st.lists(st.text(st.characters(blacklist_categories=["Cs"]), max_size=8)
                             | st.floats(allow_nan=True).map(str), min_size=1, max_size=4),
                    max_size=12)


@given(rows=CSV_TEXT, raw=st.binary(max_size=512), use_raw=st.booleans())
def test_csv_source_loads_or_is_refused(tmp_path_factory: Any, rows: list[list[str]],
                                        raw: bytes, use_raw: bool) -> None:
    folder = tmp_path_factory.mktemp("csv")
    path = folder / "data.csv"
    header = "a,b,label\n"
    body = raw if use_raw else (header + "\n".join(",".join(r) for r in rows)).encode(
        "utf-8", "surrogatepass")
    path.write_bytes(body)
    try:
        table = load_source(f"csv:{path}", label="label", pii=[], base_dir=folder)
    except UntrustedInputError:
        return
    assert table.X.dtype == np.float32 and np.isfinite(table.X).all()
    assert len(table.y) == len(table.X)


def test_the_valid_documents_mutated_above_are_valid() -> None:
    """Otherwise every mutation would only ever reach the parsers' first refusal."""
    parse_manifest(json.dumps(_VALID_MANIFEST).encode())
    parse_profile(json.dumps(_VALID_PROFILE).encode())
    parse_document(json.dumps(_VALID_RELEASE).encode())
    assert parse_infer_request(json.dumps(_VALID_INFER).encode(), _SIGNATURE)[0].shape == (2, 4)
    binary = np.arange(8, dtype="<f4").tobytes()
    assert parse_infer_request(_BINARY_HEAD + binary, _SIGNATURE,
                               header_length=str(len(_BINARY_HEAD)).encode()).rows.shape == (2, 4)
    for kind, payload in _VALID_PAYLOADS.items():
        rows, problems = derive("dev-1", [TelemetryRecord(1, kind, 1.0,
                                                          json.dumps(payload).encode())])
        assert len(rows) == 1 and not problems
    assert len(decode_columns(_COLUMNS).seqs) == 3


def test_the_fuzz_profile_is_chosen_by_the_environment() -> None:
    assert settings().max_examples == (3000 if os.environ.get("EDGEFLEET_FUZZ") == "long"
                                       else 60)
    assert Path(__file__).name == "test_fuzz.py"


@pytest.mark.parametrize("text", ["1e999", "[-1e400]", '{"a": 1E309}'])
def test_numbers_that_overflow_to_infinity_are_refused(text: str) -> None:
    with pytest.raises(UntrustedInputError, match="finite"):
        strict_json.loads(text, what="fuzz")


# ---------------------------------------------------------------- Open Inference Protocol


_SIGNATURE = ModelSignature(input_name="input", output_name="probabilities", features=4,
                            classes=3)
_VALID_INFER = {"id": "r1", "inputs": [{"name": "input", "shape": [2, 4], "datatype": "FP32",
                                        "data": [0.5] * 8}],
                "parameters": {"routing_key": "user-7"}}


@given(bytes_or_mutation(_VALID_INFER))
def test_http_infer_bodies_parse_or_are_a_bad_request(data: bytes) -> None:
    try:
        rows = parse_infer_request(data, _SIGNATURE).rows
    except UntrustedInputError:
        return
    assert rows.dtype == np.float32 and rows.ndim == 2 and rows.shape[1] == 4


_BINARY_HEAD = json.dumps({"inputs": [{"name": "input", "shape": [2, 4], "datatype": "FP32",
                                       "parameters": {"binary_data_size": 32}}]}).encode()


@given(head=bytes_or_mutation(json.loads(_BINARY_HEAD)),
       binary=st.binary(max_size=80),
       declared=st.one_of(st.none(), st.integers(min_value=-10, max_value=400).map(str),
                          st.text(max_size=24)))
def test_binary_infer_bodies_parse_or_are_a_bad_request(head: bytes, binary: bytes,
                                                        declared: str | None) -> None:
    """The binary data extension: any JSON part, any bytes after it, any header value."""
    header = str(len(head)) if declared is None else declared
    try:
        request = parse_infer_request(head + binary, _SIGNATURE,
                                      header_length=header.encode("utf-8", "surrogatepass"))
    except UntrustedInputError:
        return
    rows = request.rows
    assert rows.dtype == np.float32 and rows.shape[1] == 4
    assert rows.nbytes <= len(head) + len(binary) or rows.nbytes == 0


@given(shape=st.lists(st.integers(min_value=-3, max_value=2**40), max_size=4),
       datatype=st.sampled_from(["FP32", "FP64", "INT64", "BYTES", "fp32", ""]),
       floats=st.lists(st.floats(width=32), max_size=16),
       raw=st.lists(st.binary(max_size=64), max_size=2),
       name=st.sampled_from(["input", "other", ""]))
def test_grpc_infer_requests_convert_or_are_a_bad_request(
    shape: list[int], datatype: str, floats: list[float], raw: list[bytes], name: str
) -> None:
    request = pb.ModelInferRequest(model_name="digits", raw_input_contents=raw)
    tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
    tensor.contents.fp32_contents.extend(floats)
    try:
        rows = rows_from_proto(request, _SIGNATURE)
    except UntrustedInputError:
        return
    assert rows.dtype == np.float32 and rows.ndim == 2 and rows.shape[1] == 4


# ---------------------------------------------------------------- trainer sources and raw rows

_CATEGORICAL_SIGNATURE = ModelSignature(
    input_name="input", output_name="probabilities", features=3, classes=2,
    categories=(None, {"harbour": 1, "station": 2}, None))
_VALID_RAW_INFER = {"inputs": [{"name": "input", "shape": [2, 3], "datatype": "BYTES",
                                "data": [[1.5, "harbour", "2"], [0, "airport", 3]]}]}


@given(bytes_or_mutation(_VALID_RAW_INFER))
def test_raw_rows_of_a_categorical_model_encode_or_are_a_bad_request(data: bytes) -> None:
    try:
        rows = parse_infer_request(data, _CATEGORICAL_SIGNATURE).rows
    except UntrustedInputError:
        return
    assert rows.dtype == np.float32 and rows.shape[1] == 3 and np.isfinite(rows).all()


_STREAM_DATA = DataSettings(source="nats://127.0.0.1:4222/rows", label="y", pii=["email"],
                            categorical=["shop"], impute={"a": "mean"})
_VALID_STREAM_MESSAGE = [{"a": 1.5, "b": 2, "shop": "x", "email": "p@example.com", "y": "yes"},
                         {"a": None, "b": "3", "shop": None, "email": None, "y": "no"}]


@given(bytes_or_mutation(_VALID_STREAM_MESSAGE))
def test_stream_messages_parse_and_check_or_are_counted_malformed(data: bytes) -> None:
    """What the follower does with each message: rows that would build the table, or an
    InvalidInputError (the message is then counted as malformed and skipped)."""
    try:
        rows = parse_stream_message(data, where="fuzz", max_columns=16)
        check_stream_rows(_STREAM_DATA, rows, "fuzz")
    except UntrustedInputError:
        return
    assert rows and all(isinstance(r, dict) for r in rows)
