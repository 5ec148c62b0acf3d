"""The pure trust cores: purpose-carrying signatures (fleetcore/signing.py), the signed root of
trust and its updates (fleetcore/root.py), releases and audit checkpoints signed per purpose.

Attack tests are named after the attack; each checks the trusted root it started from is what
remains trusted (the pure core returns a new root only on success)."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Sequence

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from control_plane.domain.audit_chain import check_checkpoint, entry_hash, make_checkpoint
from control_plane.domain.records import AuditRecord
from fleetcore import root as rootmod
from fleetcore import signing
from fleetcore.errors import (
    BadSignatureError,
    InvalidInputError,
    ReplayError,
    RollbackError,
)
from fleetcore.release import (
    Arm,
    ModelRelease,
    SignedRelease,
    encode_document,
    reverify_release,
    sign_release,
    verify_release,
)
from fleetcore.root import (
    SignedRoot,
    VersionSkipError,
    build_root,
    sign_root,
    update_chain,
    verify_initial_root,
    verify_root_update,
)
from fleetcore.signing import KeySignature, TrustedKeys

NOW = 1_000_000.0
YEAR = 365 * 86400.0
DEVICE = "dev-1"


def _keys(n: int) -> list[ec.EllipticCurvePrivateKey]:
    return [ec.generate_private_key(ec.SECP256R1()) for _ in range(n)]


ROOT_KEYS = _keys(4)
RELEASE, RELEASE2, PUBLISHER, AUDIT = _keys(4)


def _root(version: int, root_keys: Sequence[ec.EllipticCurvePrivateKey], k: int = 2,
          release: ec.EllipticCurvePrivateKey = RELEASE, expires: float = NOW + YEAR
          ) -> rootmod.RootDocument:
    return build_root(version, NOW - 10, expires, {
        "root": ([key.public_key() for key in root_keys], k),
        "release": ([release.public_key()], 1),
        "publisher": ([PUBLISHER.public_key()], 1),
        "audit": ([AUDIT.public_key()], 1),
    })


@pytest.fixture
def v1() -> SignedRoot:
    return verify_initial_root(sign_root(_root(1, ROOT_KEYS[:3]), ROOT_KEYS[:2]))


def _release_document(serial: int = 1) -> bytes:
    arm = Arm(version=1, digest="sha256:" + "a" * 64, length=10, weight=1.0)
    return encode_document(DEVICE, serial, NOW - 1, NOW + 3600,
                           [ModelRelease("m", (arm,))])


# --- signing ------------------------------------------------------------------------------


def test_pae_is_dsse_v1() -> None:
    assert signing.pae("a/b", b"hello") == b"DSSEv1 3 a/b 5 hello"


def test_a_signature_verifies_only_for_its_own_purpose() -> None:
    sig = signing.sign(RELEASE, "release", b"payload")
    signing.verify(RELEASE.public_key(), "release", b"payload", sig)
    for other in ("root", "audit-checkpoint"):
        with pytest.raises(BadSignatureError):
            signing.verify(RELEASE.public_key(), other, b"payload", sig)
    with pytest.raises(InvalidInputError, match="unknown signature purpose"):
        signing.sign(RELEASE, "nonsense", b"payload")


def test_key_ids_are_the_sha256_of_the_spki_der() -> None:
    der = RELEASE.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    assert signing.keyid(RELEASE.public_key()) == hashlib.sha256(der).hexdigest()


def test_each_key_counts_once_towards_a_threshold() -> None:
    a, b = ROOT_KEYS[:2]
    trusted = TrustedKeys({signing.keyid(k.public_key()): k.public_key() for k in (a, b)}, 2)
    one = signing.sign_with_id(a, "root", b"x")
    with pytest.raises(BadSignatureError, match="1 of the trusted"):
        signing.verify_threshold(trusted, "root", b"x", [one, one, KeySignature("", one.sig)])
    # The same key under a second id (compressed point: another DER, another id) adds nothing.
    compressed = a.public_key().public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)
    twice = TrustedKeys({one.keyid: a.public_key(), "f" * 64: a.public_key()}, 2)
    with pytest.raises(BadSignatureError):
        signing.verify_threshold(twice, "root", b"x", [one, KeySignature("f" * 64, one.sig)])
    assert signing.verify_threshold(trusted, "root", b"x",
                                    [one, signing.sign_with_id(b, "root", b"x")])
    point = a.public_key().public_bytes(serialization.Encoding.X962,
                                        serialization.PublicFormat.CompressedPoint)
    algorithm = compressed[2:23]  # the SEQUENCE naming id-ecPublicKey and P-256
    spki = b"\x30\x39" + algorithm + b"\x03\x22\x00" + point
    assert serialization.load_der_public_key(spki) == a.public_key()
    with pytest.raises(InvalidInputError, match="uncompressed"):
        signing.load_public_der(spki)


# --- releases and checkpoints: domain separation ---------------------------------------------


def _chain(n: int) -> list[AuditRecord]:
    records, prev = [], "0" * 64
    for seq in range(1, n + 1):
        h = entry_hash(prev, seq, float(seq), "admin", "admin", "x", "t", "allowed", "{}")
        records.append(AuditRecord(seq=seq, time=float(seq), actor="admin", role="admin",
                                   action="x", target="t", outcome="allowed", detail="{}",
                                   prev_hash=prev, hash=h))
        prev = h
    return records


def test_a_release_signature_is_not_accepted_as_a_checkpoint() -> None:
    records = _chain(3)
    document, _ = make_checkpoint(records, NOW, AUDIT)
    # One key holding both roles, and a release signature over the checkpoint's exact bytes.
    replayed = signing.sign(AUDIT, "release", document)
    ok, reason = check_checkpoint(document, replayed, [AUDIT.public_key()], records)
    assert not ok and "does not verify" in reason
    # A release the control plane signed, presented as a checkpoint, is refused too.
    signed = sign_release(_release_document(), AUDIT)
    ok, _ = check_checkpoint(signed.document, signed.signature, [AUDIT.public_key()], records)
    assert not ok


def test_a_checkpoint_signature_is_replayed_as_a_release_and_refused() -> None:
    document = _release_document()
    replayed = signing.sign(RELEASE, "audit-checkpoint", document)
    with pytest.raises(BadSignatureError):
        verify_release(SignedRelease(document, replayed), public_key=RELEASE.public_key(),
                       device_id=DEVICE, now=NOW, trusted=None)
    # A bare signature over the document (no purpose) is refused for a new delivery.
    bare = RELEASE.sign(document, ec.ECDSA(hashes.SHA256()))
    with pytest.raises(BadSignatureError):
        verify_release(SignedRelease(document, bare), public_key=RELEASE.public_key(),
                       device_id=DEVICE, now=NOW, trusted=None)
    # ...but a release stored before signatures had purposes still reloads (legacy=True).
    assert reverify_release(SignedRelease(document, bare), public_key=RELEASE.public_key(),
                            device_id=DEVICE, legacy=True).serial == 1


def test_a_checkpoint_made_before_an_audit_key_rotation_still_verifies() -> None:
    records = _chain(2)
    new_audit = _keys(1)[0]
    document, sig = make_checkpoint(records, NOW, AUDIT)
    both = [AUDIT.public_key(), new_audit.public_key()]
    assert check_checkpoint(document, sig, both, records + _chain(3)[2:])[0]
    assert not check_checkpoint(document, sig, [new_audit.public_key()], records)[0]


def test_releases_verify_against_a_threshold_of_release_keys() -> None:
    document = _release_document()
    trusted = TrustedKeys({signing.keyid(k.public_key()): k.public_key()
                           for k in (RELEASE, RELEASE2)}, 2)
    both = sign_release(document, [RELEASE, RELEASE2])
    assert verify_release(both, public_key=trusted, device_id=DEVICE, now=NOW,
                          trusted=None).serial == 1
    one = sign_release(document, RELEASE)
    with pytest.raises(BadSignatureError, match="1 of the trusted release keys"):
        verify_release(one, public_key=trusted, device_id=DEVICE, now=NOW, trusted=None)
    doubled = SignedRelease(document, one.signature, signatures=one.signatures * 2)
    with pytest.raises(BadSignatureError):
        verify_release(doubled, public_key=trusted, device_id=DEVICE, now=NOW, trusted=None)


# --- the root of trust ------------------------------------------------------------------------


def test_the_first_root_is_verified_against_its_own_keys() -> None:
    doc = _root(1, ROOT_KEYS[:3])
    signed = verify_initial_root(sign_root(doc, ROOT_KEYS[:2]))
    assert signed.version == 1
    assert rootmod.role_keys(signed.root, "publisher")[0] == PUBLISHER.public_key()
    assert rootmod.threshold(signed.root, "root") == 2
    with pytest.raises(BadSignatureError, match="1 of the trusted"):
        verify_initial_root(sign_root(doc, ROOT_KEYS[:1]))


def test_a_root_update_needs_both_thresholds(v1: SignedRoot) -> None:
    # v2 replaces two of the three root keys: old keys 0,1 and new keys 2,3 must sign.
    v2 = _root(2, [ROOT_KEYS[2], ROOT_KEYS[3]], k=2)
    good = verify_root_update(v1, sign_root(v2, ROOT_KEYS), NOW)
    assert good.version == 2
    # Only the old keys: the new root's own threshold is not met.
    with pytest.raises(BadSignatureError, match="its own root keys"):
        verify_root_update(v1, sign_root(v2, ROOT_KEYS[:2]), NOW)
    # Only the new keys (what a thief of new keys alone could make).
    with pytest.raises(BadSignatureError, match="trusted v1"):
        verify_root_update(v1, sign_root(v2, ROOT_KEYS[3:]), NOW)


def test_a_root_signed_by_too_few_keys_is_refused(v1: SignedRoot) -> None:
    v2 = _root(2, ROOT_KEYS[:3], release=RELEASE2)
    before = v1
    envelope = sign_root(v2, ROOT_KEYS[:1])
    with pytest.raises(BadSignatureError):
        verify_root_update(v1, envelope, NOW)
    # The same signature twice, or under an empty-looking duplicate, still counts once.
    env = json.loads(envelope)
    env["signatures"] = env["signatures"] * 2
    with pytest.raises(BadSignatureError, match="1 of the trusted"):
        verify_root_update(v1, json.dumps(env).encode(), NOW)
    assert update_chain(v1, [envelope], NOW).current == before


def test_a_root_version_skip_is_refused(v1: SignedRoot) -> None:
    v3 = sign_root(_root(3, ROOT_KEYS[:3]), ROOT_KEYS[:3])
    with pytest.raises(VersionSkipError, match="next one must be version 2"):
        verify_root_update(v1, v3, NOW)
    result = update_chain(v1, [v3], NOW)
    assert result.current == v1 and result.accepted == ()
    assert isinstance(result.error, VersionSkipError)


def test_a_rollback_to_an_old_root_is_refused(v1: SignedRoot) -> None:
    v2 = verify_root_update(v1, sign_root(_root(2, ROOT_KEYS[:3]), ROOT_KEYS[:2]), NOW)
    with pytest.raises(RollbackError):
        verify_root_update(v2, v1.envelope, NOW)
    assert update_chain(v2, [v1.envelope], NOW).current == v2
    # Re-delivery of the trusted root is not an error; another v2 is.
    assert verify_root_update(v2, v2.envelope, NOW) == v2
    other = sign_root(_root(2, ROOT_KEYS[:3], release=RELEASE2), ROOT_KEYS[:2])
    with pytest.raises(ReplayError):
        verify_root_update(v2, other, NOW)


def test_a_chain_of_roots_is_walked_in_order_even_when_expired_in_between(
        v1: SignedRoot) -> None:
    v2 = sign_root(_root(2, ROOT_KEYS[:3], expires=NOW - 1), ROOT_KEYS[:2])
    v3 = sign_root(_root(3, ROOT_KEYS[1:4], release=RELEASE2), ROOT_KEYS[:4])
    result = update_chain(v1, [v3, v1.envelope, v2], NOW)
    assert result.error is None
    assert [r.version for r in result.accepted] == [2, 3]
    rootmod.check_current(result.current.root, NOW)
    assert rootmod.role_keys(result.current.root, "release") == [RELEASE2.public_key()]
    expired = update_chain(v1, [v2], NOW).current
    with pytest.raises(Exception, match="expired"):
        rootmod.check_current(expired.root, NOW)


def test_a_chain_stops_at_the_first_bad_root_and_keeps_the_good_ones(v1: SignedRoot) -> None:
    v2 = sign_root(_root(2, ROOT_KEYS[:3]), ROOT_KEYS[:2])
    bad_v3 = sign_root(_root(3, ROOT_KEYS[:3]), ROOT_KEYS[:1])
    result = update_chain(v1, [v2, bad_v3], NOW)
    assert result.current.version == 2 and isinstance(result.error, BadSignatureError)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(version=0), "root version must be in"),
    (lambda d: d.update(version=True), "must be an integer"),
    (lambda d: d.update(expires_at=d["issued_at"]), "after issued_at"),
    (lambda d: d.update(extra=1), "exactly the keys"),
    (lambda d: d["roles"].pop("audit"), "exactly the keys"),
    (lambda d: d["roles"]["root"].update(threshold=4), "threshold must be in 1..3"),
    (lambda d: d["roles"]["root"].update(threshold=0), "threshold must be in 1..3"),
    (lambda d: d["roles"]["release"].update(keyids=["0" * 64]), "not in keys"),
    (lambda d: d["roles"]["root"]["keyids"].append(d["roles"]["root"]["keyids"][0]), "twice"),
    (lambda d: d["keys"].update({"a" * 64: next(iter(d["keys"].values()))}), "not the SHA-256"),
    (lambda d: d.update(format="edgefleet.root/v2"), "format must be"),
])
def test_hostile_root_documents_are_refused(mutate, message) -> None:
    doc = json.loads(rootmod.encode_root(_root(1, ROOT_KEYS[:3])))
    mutate(doc)
    payload = json.dumps(doc).encode()
    with pytest.raises(InvalidInputError, match=message):
        rootmod.parse_root(payload)


@pytest.mark.parametrize("envelope, message", [
    (b"[]", "must be a JSON object"),
    (b'{"payloadType":"application/vnd.edgefleet.release+json","payload":"e30=",'
     b'"signatures":[]}', "payloadType must be"),
    (b'{"payloadType":"application/vnd.edgefleet.root+json","payload":"!!",'
     b'"signatures":[]}', "not valid base64"),
    (b" " * (rootmod.MAX_ENVELOPE_BYTES + 1), "the limit is"),
    (b'{"a":' * 100 + b"1" + b"}" * 100, "nests deeper"),
])
def test_hostile_root_envelopes_are_refused(envelope: bytes, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        verify_initial_root(envelope)


def test_too_many_signatures_are_refused(v1: SignedRoot) -> None:
    env = json.loads(v1.envelope)
    sig = env["signatures"][0]
    env["signatures"] = [sig] * (rootmod.MAX_SIGNATURES + 1)
    with pytest.raises(InvalidInputError, match="signatures must have"):
        verify_initial_root(json.dumps(env).encode())
    env["signatures"] = [{"keyid": sig["keyid"], "sig": base64.b64encode(b"x" * 600).decode()}]
    with pytest.raises(InvalidInputError, match="longer than"):
        verify_initial_root(json.dumps(env).encode())


def test_staged_roots_collect_signatures_until_both_thresholds_hold(v1: SignedRoot) -> None:
    v2 = _root(2, ROOT_KEYS[:3])
    partial = sign_root(v2, ROOT_KEYS[:1])
    with pytest.raises(BadSignatureError):
        verify_root_update(v1, partial, NOW)
    full = rootmod.add_signatures(partial, [ROOT_KEYS[0], ROOT_KEYS[1]])
    assert len(json.loads(full)["signatures"]) == 2
    assert verify_root_update(v1, full, NOW).version == 2
