"""Security tests of the signed release document, named after the attacks they stop.

An in-memory ``ReleaseSimulator`` plays the control plane (it holds the release key and signs
on demand, python-tuf's RepositorySimulator style). After each refused attack the agent's trust
state must not have moved: the mark, the current document and the bytes of ``release.json``,
also as seen by a ``ReleaseTrust`` re-opened from disk. Time is always passed in.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from edge_agent.install import release_trust
from edge_agent.install.release_trust import ReleaseTrust
from fleetcore import release
from fleetcore.errors import (
    BadSignatureError,
    ExpiredError,
    InvalidInputError,
    ReplayError,
    RollbackError,
    UntrustedInputError,
    WrongDeviceError,
)
from fleetcore.pki import generate_key
from fleetcore.release import (
    MAX_BUNDLE_BYTES,
    MAX_DOCUMENT_BYTES,
    MAX_SIGNATURE_BYTES,
    RELEASE_FORMAT,
    Arm,
    ModelRelease,
    ReleaseDocument,
    SignedRelease,
    TrustedMark,
    encode_document,
    parse_document,
    sign_release,
    verify_release,
)

NOW = 1_750_000_000.0  # the reference time of every test; nothing reads the clock
DEVICE = "edge-01"
HOUR = 3600.0


def digest_of(tag: str) -> str:
    return "sha256:" + hashlib.sha256(tag.encode()).hexdigest()


def models_for(serial: int) -> tuple[ModelRelease, ...]:
    """Distinct content per serial: a 90/10 split plus a shadow arm."""
    return (
        ModelRelease(
            name="churn",
            arms=(
                Arm(version=serial, digest=digest_of(f"churn-{serial}"), length=1000, weight=0.9),
                Arm(version=serial + 100, digest=digest_of("churn-b"), length=2000, weight=0.1),
                Arm(version=serial + 200, digest=digest_of("churn-s"), length=3000, weight=0.0,
                    shadow=True),
            ),
        ),
    )


class ReleaseSimulator:
    """The control plane's side: a release key, a device id and a serial counter."""

    def __init__(self, device_id: str = DEVICE, now: float = NOW) -> None:
        self.key = generate_key()
        self.device_id = device_id
        self.now = now
        self.serial = 0

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self.key.public_key()

    def publish(
        self,
        *,
        models: Sequence[ModelRelease] | None = None,
        expires_in: float = HOUR,
        serial: int | None = None,
        device_id: str | None = None,
        key: ec.EllipticCurvePrivateKey | None = None,
    ) -> SignedRelease:
        if serial is None:
            self.serial += 1
            serial = self.serial
        document = encode_document(
            device_id if device_id is not None else self.device_id,
            serial,
            self.now,
            self.now + expires_in,
            models if models is not None else models_for(serial),
        )
        return sign_release(document, key if key is not None else self.key)

    def sign_raw(self, document: bytes) -> SignedRelease:
        """Sign arbitrary bytes with the real release key (a compromised encoder)."""
        return sign_release(document, self.key)


@dataclass
class World:
    sim: ReleaseSimulator
    path: Path

    def open(self) -> ReleaseTrust:
        return ReleaseTrust(self.path, self.sim.public_key, self.sim.device_id)


@dataclass(frozen=True)
class Snapshot:
    mark: TrustedMark | None
    current: ReleaseDocument | None
    file_bytes: bytes | None


def snapshot(world: World, trust: ReleaseTrust) -> Snapshot:
    data = world.path.read_bytes() if world.path.exists() else None
    return Snapshot(mark=trust.mark, current=trust.current, file_bytes=data)


def assert_unmoved(world: World, trust: ReleaseTrust, before: Snapshot) -> None:
    assert snapshot(world, trust) == before
    reopened = world.open()
    assert (reopened.mark, reopened.current) == (before.mark, before.current)


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(sim=ReleaseSimulator(), path=tmp_path / "state" / "release.json")


def flip(data: bytes, index: int) -> bytes:
    index %= len(data)
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1:]


# --- the happy path ----------------------------------------------------------------------


def test_valid_release_is_accepted_and_persisted(world: World) -> None:
    trust = world.open()
    assert (trust.mark, trust.current) == (None, None)

    signed = world.sim.publish()
    doc, changed = trust.accept(signed, NOW)

    assert changed
    assert doc.device_id == DEVICE and doc.serial == 1
    assert doc.digest == digest_of_bytes(signed.document)
    assert doc.models == models_for(1)
    churn = doc.model("churn")
    assert churn is not None and churn.arms[2].shadow
    assert doc.model("absent") is None
    assert trust.mark == TrustedMark(serial=1, digest=doc.digest)
    assert trust.current == doc
    reopened = world.open()
    assert (reopened.mark, reopened.current) == (trust.mark, doc)

    world.sim.serial = 9  # serials may skip; they only have to increase
    newer, changed = trust.accept(world.sim.publish(), NOW + 10)
    assert changed and newer.serial == 10 and trust.mark == TrustedMark(10, newer.digest)


def digest_of_bytes(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_encoding_is_canonical() -> None:
    models = models_for(3)
    data = encode_document(DEVICE, 3, NOW, NOW + HOUR, models)
    record = json.loads(data)
    assert record["format"] == RELEASE_FORMAT
    assert data == json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
    # Whole-number times written as ints or floats give the same bytes.
    assert encode_document(DEVICE, 3, int(NOW), int(NOW + HOUR), models) == data
    doc = parse_document(data)
    assert (doc.device_id, doc.serial, doc.issued_at, doc.expires_at) == (
        DEVICE, 3, NOW, NOW + HOUR
    )
    assert doc.models == models


def test_verify_release_pure_core_with_no_trusted_mark() -> None:
    sim = ReleaseSimulator()
    signed = sim.publish(serial=7)
    doc = verify_release(signed, public_key=sim.public_key, device_id=DEVICE, now=NOW,
                         trusted=None)
    assert doc.serial == 7
    again = verify_release(signed, public_key=sim.public_key, device_id=DEVICE, now=NOW,
                           trusted=TrustedMark(7, doc.digest))
    assert again == doc


# --- attacks -----------------------------------------------------------------------------


def test_rollback_attack_older_serial_refused(world: World) -> None:
    trust = world.open()
    oldest = world.sim.publish()
    older = world.sim.publish()
    trust.accept(world.sim.publish(), NOW)
    before = snapshot(world, trust)

    with pytest.raises(RollbackError, match="release serial 1 is older than the trusted serial 3"):
        trust.accept(oldest, NOW)
    with pytest.raises(RollbackError, match="serial 2 is older"):
        trust.accept(older, NOW)
    assert_unmoved(world, trust, before)


def test_replay_attack_same_serial_other_content_refused(world: World) -> None:
    trust = world.open()
    trust.accept(world.sim.publish(serial=4), NOW)
    before = snapshot(world, trust)

    forged = world.sim.publish(serial=4, models=models_for(99))
    with pytest.raises(ReplayError, match="release serial 4 has digest"):
        trust.accept(forged, NOW)
    assert_unmoved(world, trust, before)


def test_freeze_attack_expired_document_refused(world: World) -> None:
    trust = world.open()
    first = world.sim.publish(expires_in=HOUR)
    withheld = world.sim.publish(expires_in=60.0)
    # A fresh agent refuses an expired document too.
    with pytest.raises(ExpiredError, match="expired at"):
        trust.accept(withheld, NOW + 60.0)
    trust.accept(first, NOW)
    before = snapshot(world, trust)

    # The attacker withholds a document until it expires; expires_at == now counts as expired.
    for late in (NOW + 60.0, NOW + 86_400.0):
        with pytest.raises(ExpiredError, match="release serial 2 expired at"):
            trust.accept(withheld, late)
    # ... and keeps re-sending the trusted one after it expired.
    with pytest.raises(ExpiredError, match="release serial 1 expired at"):
        trust.accept(first, NOW + HOUR)
    assert_unmoved(world, trust, before)


def test_mix_and_match_other_devices_document_refused(world: World) -> None:
    trust = world.open()
    trust.accept(world.sim.publish(), NOW)
    before = snapshot(world, trust)

    # Validly signed by the real release key, newer serial, but for another device.
    other = world.sim.publish(device_id="edge-02")
    with pytest.raises(WrongDeviceError, match="for device 'edge-02'; this device is 'edge-01'"):
        trust.accept(other, NOW)
    assert_unmoved(world, trust, before)


def test_wrong_release_key_refused(world: World) -> None:
    trust = world.open()
    trust.accept(world.sim.publish(), NOW)
    before = snapshot(world, trust)

    forged = world.sim.publish(key=generate_key())
    with pytest.raises(BadSignatureError, match="does not verify with the pinned release key"):
        trust.accept(forged, NOW)
    assert_unmoved(world, trust, before)


def test_flipped_byte_in_document_refused(world: World) -> None:
    trust = world.open()
    trust.accept(world.sim.publish(), NOW)
    before = snapshot(world, trust)

    signed = world.sim.publish()
    n = len(signed.document)
    for index in (0, n // 2, n - 1):
        tampered = SignedRelease(flip(signed.document, index), signed.signature)
        with pytest.raises(BadSignatureError):
            trust.accept(tampered, NOW)
    bad_signature = SignedRelease(signed.document, flip(signed.signature, -1))
    with pytest.raises(BadSignatureError):
        trust.accept(bad_signature, NOW)
    assert_unmoved(world, trust, before)


def test_truncated_and_oversized_documents_refused(world: World) -> None:
    trust = world.open()
    trust.accept(world.sim.publish(), NOW)
    before = snapshot(world, trust)

    signed = world.sim.publish()
    oversized = world.sim.sign_raw(signed.document + b" " * MAX_DOCUMENT_BYTES)
    attacks: list[tuple[SignedRelease, type[UntrustedInputError], str]] = [
        (SignedRelease(signed.document[:-1], signed.signature), BadSignatureError, "verify"),
        (SignedRelease(signed.document[: len(signed.document) // 2], signed.signature),
         BadSignatureError, "verify"),
        (SignedRelease(signed.document, signed.signature[:-4]), BadSignatureError, "verify"),
        (SignedRelease(b"", signed.signature), InvalidInputError, "got 0"),
        (SignedRelease(signed.document, b""), InvalidInputError, "got 0"),
        (oversized, InvalidInputError, f"1..{MAX_DOCUMENT_BYTES} bytes; got"),
        (SignedRelease(signed.document, signed.signature + b"\0" * MAX_SIGNATURE_BYTES),
         InvalidInputError, f"1..{MAX_SIGNATURE_BYTES} bytes; got"),
    ]
    for attack, error, message in attacks:
        with pytest.raises(error, match=message):
            trust.accept(attack, NOW)
    with pytest.raises(InvalidInputError, match="the limit is"):
        parse_document(oversized.document)
    assert_unmoved(world, trust, before)


def test_unsigned_garbage_is_not_parsed(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    trust = world.open()
    trust.accept(world.sim.publish(), NOW)
    before = snapshot(world, trust)
    some_signature = world.sim.publish().signature

    def must_not_parse(document: bytes) -> ReleaseDocument:
        raise AssertionError(f"parsed unauthenticated bytes: {document[:20]!r}")

    monkeypatch.setattr(release, "parse_document", must_not_parse)
    garbage = [b"{not json", b"\xff\xfe\x00\x01", b"[" * 100_000, b'{"serial": 1e999}']
    for document in garbage:
        for signature in (some_signature, b"\x30\x06\x02\x01\x01\x02\x01\x01", b"junk"):
            with pytest.raises(BadSignatureError):
                trust.accept(SignedRelease(document, signature), NOW)
    monkeypatch.undo()

    # The same garbage, validly signed, does reach the parser and is refused there.
    with pytest.raises(InvalidInputError, match="not valid JSON"):
        trust.accept(world.sim.sign_raw(b"{not json"), NOW)
    assert_unmoved(world, trust, before)


def test_high_water_mark_survives_restart(world: World) -> None:
    trust = world.open()
    old = world.sim.publish()
    trust.accept(old, NOW)
    newest = world.sim.publish(expires_in=60.0)
    doc, _ = trust.accept(newest, NOW)

    # A restart long after the release expired: still trusted and served, older still refused.
    restarted = world.open()
    assert restarted.mark == TrustedMark(serial=2, digest=doc.digest)
    assert restarted.current == doc
    before = snapshot(world, restarted)
    with pytest.raises(RollbackError, match="serial 1 is older than the trusted serial 2"):
        restarted.accept(old, NOW)
    assert_unmoved(world, restarted, before)

    world.sim.now = NOW + 86_400.0
    later, changed = restarted.accept(world.sim.publish(), NOW + 86_400.0)
    assert changed and later.serial == 3
    assert world.open().mark == TrustedMark(serial=3, digest=later.digest)


def test_same_document_redelivered_is_idempotent(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    trust = world.open()
    signed = world.sim.publish()
    doc, changed = trust.accept(signed, NOW)
    assert changed
    before = snapshot(world, trust)

    def no_write(path: Path, data: bytes, *, mode: int = 0o644) -> None:
        raise AssertionError("a re-delivery must not rewrite the trust file")

    monkeypatch.setattr(release_trust, "atomic_write", no_write)
    # Byte-identical, and re-signed (ECDSA signatures differ each time; the document does not).
    resigned = sign_release(signed.document, world.sim.key)
    assert resigned.signature != signed.signature
    for delivery in (signed, resigned):
        again, changed = trust.accept(delivery, NOW + 5)
        assert (again, changed) == (doc, False)
        again, changed = world.open().accept(delivery, NOW + 5)
        assert (again, changed) == (doc, False)
    monkeypatch.undo()
    assert_unmoved(world, trust, before)


def test_failed_persist_leaves_trust_unchanged(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    trust = world.open()
    trust.accept(world.sim.publish(), NOW)
    before = snapshot(world, trust)

    def disk_full(path: Path, data: bytes, *, mode: int = 0o644) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(release_trust, "atomic_write", disk_full)
    with pytest.raises(OSError, match="No space"):
        trust.accept(world.sim.publish(), NOW)
    monkeypatch.undo()
    assert_unmoved(world, trust, before)


# --- a tampered trust file ---------------------------------------------------------------


@dataclass(frozen=True)
class Tamper:
    id: str
    edit: Callable[[World, dict[str, Any]], object]  # returns the new JSON value, or raw bytes
    message: str


def _set(key: str, value: object) -> Callable[[World, dict[str, Any]], object]:
    def edit(world: World, record: dict[str, Any]) -> object:
        record[key] = value
        return record

    return edit


def _flip_document(world: World, record: dict[str, Any]) -> object:
    document = base64.b64decode(record["document"])
    record["document"] = base64.b64encode(flip(document, len(document) // 2)).decode()
    return record


def _swap_signed(**publish: Any) -> Callable[[World, dict[str, Any]], object]:
    def edit(world: World, record: dict[str, Any]) -> object:
        signed = world.sim.publish(serial=record["serial"], **publish)
        record["document"] = base64.b64encode(signed.document).decode()
        record["signature"] = base64.b64encode(signed.signature).decode()
        record["digest"] = digest_of_bytes(signed.document)
        return record

    return edit


TAMPERS = [
    Tamper("empty-file", lambda w, r: b"", "not valid JSON"),
    Tamper("not-json", lambda w, r: b"{release", "not valid JSON"),
    Tamper("json-array", lambda w, r: [r], "expected a JSON object"),
    Tamper("unknown-key", lambda w, r: {**r, "extra": 1}, "expected a JSON object with keys"),
    Tamper("wrong-format", _set("format", "edgefleet.release-trust/v0"), "format must be"),
    Tamper("bad-base64", _set("signature", "!!!"), "not valid base64"),
    Tamper("flipped-document-byte", _flip_document, "does not verify"),
    Tamper("signed-by-other-key", _swap_signed(key=generate_key()), "does not verify"),
    Tamper("other-devices-document", _swap_signed(device_id="edge-02"), "this device is"),
    Tamper("serial-lowered", _set("serial", 1), "records serial 1"),
    Tamper("serial-as-bool", _set("serial", True), "serial must be an integer"),
    Tamper("digest-edited", _set("digest", digest_of("other")), "records serial 3 and digest"),
]


@pytest.mark.parametrize("tamper", TAMPERS, ids=[t.id for t in TAMPERS])
def test_tampered_trust_file_is_refused(world: World, tamper: Tamper) -> None:
    trust = world.open()
    for _ in range(3):
        trust.accept(world.sim.publish(), NOW)
    record = json.loads(world.path.read_bytes())
    edited = tamper.edit(world, record)
    data = edited if isinstance(edited, bytes) else json.dumps(edited).encode()
    world.path.write_bytes(data)

    with pytest.raises(InvalidInputError, match=tamper.message):
        world.open()
    assert world.path.read_bytes() == data  # loading never rewrites or resets the file


# --- document validation scenarios -------------------------------------------------------


def valid_record() -> dict[str, Any]:
    """A valid document as JSON data; each scenario breaks one rule of it."""
    return {
        "format": RELEASE_FORMAT,
        "device_id": DEVICE,
        "serial": 5,
        "issued_at": NOW,
        "expires_at": NOW + HOUR,
        "models": [
            {
                "name": "churn",
                "arms": [
                    {"version": 1, "digest": digest_of("a"), "length": 10, "weight": 0.75,
                     "shadow": False},
                    {"version": 2, "digest": digest_of("b"), "length": 20, "weight": 0.25,
                     "shadow": False},
                    {"version": 3, "digest": digest_of("c"), "length": 30, "weight": 0.0,
                     "shadow": True},
                ],
            },
            {
                "name": "fraud",
                "arms": [
                    {"version": 7, "digest": digest_of("f"), "length": 70, "weight": 1,
                     "shadow": False},
                ],
            },
        ],
    }


@dataclass(frozen=True)
class BadDocument:
    id: str
    edit: Callable[[dict[str, Any]], object]  # returns the JSON value to encode, or raw bytes
    message: str  # a regex that the error message must match


def put(*path: str | int, value: object) -> Callable[[dict[str, Any]], object]:
    def edit(record: dict[str, Any]) -> object:
        target: Any = record
        for step in path[:-1]:
            target = target[step]
        target[path[-1]] = value
        return record

    return edit


def drop(*path: str | int) -> Callable[[dict[str, Any]], object]:
    def edit(record: dict[str, Any]) -> object:
        target: Any = record
        for step in path[:-1]:
            target = target[step]
        del target[path[-1]]
        return record

    return edit


ARM0 = ("models", 0, "arms", 0)
_ARM = {"version": 1, "digest": digest_of("x"), "length": 1, "weight": 0.0, "shadow": True}
_DUPLICATE_KEY = json.dumps(valid_record()).replace("{", '{"serial": 6, ', 1).encode()

BAD_DOCUMENTS = [
    BadDocument("weights-sum-below-1", put(*ARM0, "weight", value=0.5), "sum to 1; got 0.75"),
    BadDocument("weights-sum-above-1", put(*ARM0, "weight", value=0.9), "sum to 1; got 1.15"),
    BadDocument("weight-negative", put(*ARM0, "weight", value=-0.25), r"in \[0, 1\]; got -0.25"),
    BadDocument("weight-above-1", put("models", 1, "arms", 0, "weight", value=1.5),
                r"in \[0, 1\]; got 1.5"),
    BadDocument("weight-nan", put(*ARM0, "weight", value=float("nan")),
                "NaN is not a JSON number"),
    BadDocument("shadow-arm-with-weight", put("models", 0, "arms", 2, "weight", value=0.1),
                "shadow arm must have weight 0"),
    BadDocument("duplicate-arm-versions", put("models", 0, "arms", 1, "version", value=1),
                "arm versions must be unique; got 1 twice"),
    BadDocument("duplicate-model-names", put("models", 1, "name", value="churn"),
                "model names must be unique; got 'churn' twice"),
    BadDocument("digest-uppercase-hex", put(*ARM0, "digest", value=digest_of("a").upper()),
                "64 lowercase hex"),
    BadDocument("digest-other-algorithm", put(*ARM0, "digest", value="md5:" + "0" * 32),
                "64 lowercase hex"),
    BadDocument("digest-too-short", put(*ARM0, "digest", value=digest_of("a")[:-1]),
                "64 lowercase hex"),
    BadDocument("length-zero", put(*ARM0, "length", value=0),
                f"length must be in 1..{MAX_BUNDLE_BYTES}; got 0"),
    BadDocument("length-huge", put(*ARM0, "length", value=MAX_BUNDLE_BYTES + 1),
                f"length must be in 1..{MAX_BUNDLE_BYTES}; got {MAX_BUNDLE_BYTES + 1}"),
    BadDocument("no-arms", put("models", 0, "arms", value=[]), "must have 1..8 entries; got 0"),
    BadDocument("too-many-arms", put("models", 0, "arms", value=[_ARM] * 9),
                "must have 1..8 entries; got 9"),
    BadDocument("too-many-models", put("models", value=[valid_record()["models"][1]] * 65),
                "models must have 0..64 entries; got 65"),
    BadDocument("unknown-top-level-key", put("extra", value=1), r"got unknown \['extra'\]"),
    BadDocument("unknown-arm-key", put(*ARM0, "canary", value=True), r"unknown \['canary'\]"),
    BadDocument("missing-key", drop(*ARM0, "shadow"), r"missing \['shadow'\]"),
    BadDocument("duplicate-json-key", lambda r: _DUPLICATE_KEY, "duplicate key 'serial'"),
    BadDocument("bool-as-serial", put("serial", value=True), "serial must be an integer; got bool"),
    BadDocument("bool-as-version", put(*ARM0, "version", value=True), "an integer; got bool"),
    BadDocument("bool-as-length", put(*ARM0, "length", value=False), "an integer; got bool"),
    BadDocument("bool-as-weight", put(*ARM0, "weight", value=True), "a number; got bool"),
    BadDocument("float-as-serial", put("serial", value=5.0), "an integer; got float"),
    BadDocument("string-as-weight", put(*ARM0, "weight", value="0.75"), "a number; got str"),
    BadDocument("int-as-shadow", put(*ARM0, "shadow", value=0), "a boolean; got int"),
    BadDocument("serial-zero", put("serial", value=0), "serial must be in 1.."),
    BadDocument("version-zero", put(*ARM0, "version", value=0), "version must be in 1.."),
    BadDocument("bad-device-id", put("device_id", value="Edge 01"), "device_id must be"),
    BadDocument("bad-model-name", put("models", 0, "name", value=""), "name must be"),
    BadDocument("non-object-json-array", lambda r: [r], "must be a JSON object; got list"),
    BadDocument("non-object-json-null", lambda r: None, "must be a JSON object; got NoneType"),
    BadDocument("non-object-json-string", lambda r: "release", "a JSON object; got str"),
    BadDocument("invalid-json", lambda r: b'{"format":', "not valid JSON"),
    BadDocument("not-utf8", lambda r: b'{"format": "\xff"}', "not UTF-8"),
    BadDocument("wrong-format-string", put("format", value="edgefleet.release/v2"),
                "format must be 'edgefleet.release/v1'; got 'edgefleet.release/v2'"),
    BadDocument("expires-before-issued", put("expires_at", value=NOW - 1),
                "expires_at must be after issued_at"),
    BadDocument("expires-when-issued", put("expires_at", value=NOW),
                "expires_at must be after issued_at"),
    BadDocument("time-infinite", lambda r: json.dumps(r).replace(str(NOW + HOUR), "Infinity")
                .encode(), "Infinity is not a JSON number"),
]


def encode_scenario(row: BadDocument) -> bytes:
    edited = row.edit(valid_record())
    return edited if isinstance(edited, bytes) else json.dumps(edited).encode()


def test_scenario_base_record_is_valid(world: World) -> None:
    data = json.dumps(valid_record()).encode()
    doc = parse_document(data)
    assert doc.serial == 5 and [m.name for m in doc.models] == ["churn", "fraud"]
    assert world.open().accept(world.sim.sign_raw(data), NOW) == (doc, True)


@pytest.mark.parametrize("row", BAD_DOCUMENTS, ids=[row.id for row in BAD_DOCUMENTS])
def test_invalid_document_refused(world: World, row: BadDocument) -> None:
    data = encode_scenario(row)
    with pytest.raises(InvalidInputError, match=row.message):
        parse_document(data)

    # Validly signed by the real key, the document is still refused and changes nothing.
    trust = world.open()
    trust.accept(world.sim.publish(), NOW)
    before = snapshot(world, trust)
    with pytest.raises(InvalidInputError, match=row.message):
        trust.accept(world.sim.sign_raw(data), NOW)
    assert_unmoved(world, trust, before)


def _arm(version: int, weight: float, shadow: bool = False) -> Arm:
    return Arm(version=version, digest=digest_of(str(version)), length=1, weight=weight,
               shadow=shadow)


@pytest.mark.parametrize(
    ("serial", "issued_at", "models", "message"),
    [
        (1, NOW, [ModelRelease("m", (_arm(1, 0.5),))], "sum to 1"),
        (1, NOW, [ModelRelease("m", (_arm(1, 1.0), _arm(2, 0.5, shadow=True)))], "shadow"),
        (1, NOW, [ModelRelease("m", (_arm(1, 1.0),))] * 2, "model names must be unique"),
        (True, NOW, [], "serial must be an integer; got bool"),
        (1, float("nan"), [], "cannot be encoded"),
    ],
    ids=["weights", "shadow-weight", "duplicate-names", "bool-serial", "nan-time"],
)
def test_encode_refuses_what_the_parser_refuses(
    serial: int, issued_at: float, models: list[ModelRelease], message: str
) -> None:
    with pytest.raises(InvalidInputError, match=message):
        encode_document(DEVICE, serial, issued_at, NOW + HOUR, models)
