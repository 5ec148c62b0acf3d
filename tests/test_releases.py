"""Release documents on the control plane: issued on change, renewed before expiry."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import pytest

from control_plane.domain.records import ModelVersionRecord, ReleaseRecord
from control_plane.services.releases import ReleaseIssuer
from control_plane.storage import Store, open_store
from fleetcore import pki
from fleetcore.release import SignedRelease, verify_release
from tests.store_support import pg_database, store, store_url

__all__ = ["pg_database", "store", "store_url"]  # fixtures (tests/store_support.py)


def _prepare(store: Store) -> Store:
    """On both backends (tests/store_support.py)."""
    # a device without going through enrollment
    with store._tx() as c:  # type: ignore[attr-defined]
        c.execute("INSERT INTO devices(id, labels, enrolled_at) VALUES ('dev-1', '{}', 0)")
    for version in (1, 2):
        store.add_model_version(ModelVersionRecord(
            "digits", version, "sha256:" + f"{version:x}" * 64, 1000 + version, 0.0, "t", "k",
            "{}"))
    return store


def test_release_is_issued_on_change_and_renewed_before_expiry(store: Store) -> None:
    store = _prepare(store)
    key = pki.generate_key()
    changed: list[str] = []
    issuer = ReleaseIssuer(store, key, ttl_seconds=100, on_change=changed.append)
    assert issuer.current("dev-1", now=0) is None  # nothing assigned: no document
    store.start_rollout("digits", 1, {}, ["dev-1"], 0, "test")
    first = issuer.current("dev-1", now=10)
    assert first is not None and first.serial == 1 and changed == ["dev-1"]
    assert issuer.current("dev-1", now=50) == first  # more than half its life left
    renewed = issuer.current("dev-1", now=61)  # less than half left: renewed, same content
    assert renewed is not None and renewed.serial == 2 and renewed.expires_at == 161
    assert changed == ["dev-1"]  # a renewal is not a change
    store.start_rollout("digits", 2, {}, ["dev-1"], 70, "test")
    new = issuer.current("dev-1", now=70)
    assert new is not None and new.serial == 3 and changed == ["dev-1", "dev-1"]
    doc = verify_release(SignedRelease(new.document, new.signature), public_key=key.public_key(),
                         device_id="dev-1", now=70, trusted=None)
    assert [(a.version, a.length, a.weight) for a in doc.models[0].arms] == [(2, 1002, 1.0)]


def test_a_device_holding_a_release_we_did_not_issue_gets_one_above_it(store: Store) -> None:
    """After a restore from an older backup, devices hold serials the control plane forgot."""
    store = _prepare(store)
    key = pki.generate_key()
    changed: list[str] = []
    issuer = ReleaseIssuer(store, key, ttl_seconds=100, on_change=changed.append)
    store.start_rollout("digits", 1, {}, ["dev-1"], 0, "test")
    ours = issuer.current("dev-1", now=10)
    assert ours is not None and ours.serial == 1
    digest = "sha256:" + hashlib.sha256(ours.document).hexdigest()
    assert issuer.current("dev-1", now=11, have=(1, digest)) == ours  # it holds ours
    assert issuer.current("dev-1", now=11, have=(1, "")) == ours  # digest unknown: trust ours
    assert issuer.current("dev-1", now=11, have=(2**62, "")) == ours  # absurd claims ignored
    above = issuer.current("dev-1", now=12, have=(7, "sha256:" + "0" * 64))
    assert above is not None and above.serial == 8 and changed == ["dev-1", "dev-1"]
    same = issuer.current("dev-1", now=13, have=(8, "sha256:" + "1" * 64))  # same serial,
    assert same is not None and same.serial == 9  # another document: ours goes above it too
    assert issuer.current("dev-1", now=14, have=(9, "")) == same


def test_two_replicas_issuing_one_devices_release_at_once_both_answer_with_it(
    store_url: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Replicas on one database issue a device's release at once (an operator's rollout on one,
    the device's heartbeat on another): the one whose write comes second looks again instead of
    failing the operator's command (and the rest of its push) on the serial the other took."""
    ours, theirs = open_store(store_url), open_store(store_url)  # two replicas' connections
    try:
        _prepare(ours)
        key = pki.generate_key()
        told_ours: list[str] = []
        told_theirs: list[str] = []
        issuer = ReleaseIssuer(ours, key, ttl_seconds=100, on_change=told_ours.append)
        other = ReleaseIssuer(theirs, key, ttl_seconds=100, on_change=told_theirs.append)
        ours.start_rollout("digits", 1, {}, ["dev-1"], 0, "test")
        read = ours.get_release

        def raced(device_id: str) -> ReleaseRecord | None:
            """Our read, and the other replica's issuance right after it."""
            seen = read(device_id)
            if not told_theirs:
                other.current(device_id, now=10)
            return seen

        monkeypatch.setattr(ours, "get_release", raced)
        got = issuer.current("dev-1", now=10)
        assert got is not None and got == theirs.get_release("dev-1")
        assert got.serial == 1 and told_theirs == ["dev-1"]
        assert told_ours == []  # the other replica announced the change

        # A change that races a renewal still goes out, above the renewal's serial.
        ours.start_rollout("digits", 2, {}, ["dev-1"], 70, "test")
        told_theirs.clear()

        def renewed_meanwhile(device_id: str) -> ReleaseRecord | None:
            seen = read(device_id)
            if seen is not None and seen.serial == 1:
                theirs.put_release(replace(seen, serial=2, issued_at=65, expires_at=165))
            return seen

        monkeypatch.setattr(ours, "get_release", renewed_meanwhile)
        new = issuer.current("dev-1", now=70)
        assert new is not None and new.serial == 3 and told_ours == ["dev-1"]
        assert theirs.get_release("dev-1") == new
    finally:
        ours.close()
        theirs.close()
