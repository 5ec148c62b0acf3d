"""What the agent's serving process knows of its trust state, kept without ``cryptography``.

Every decision (verify a release, adopt a root, check a renewed certificate) runs in the trust
child (``trust_child.py``), one short-lived process per decision, which persists what it
accepted and answers a snapshot: the certificate's facts, the current root's version, expiry
and publisher keys, and the accepted release document. This module holds that snapshot and
parses the release document again with the pure parser (``fleetcore.release_doc``): the child
verified its signature, this process only reads it.

A refusal in the child is raised here as the same ``fleetcore.errors`` class (the first of the
child's exception's classes that this module knows; ``ValueError`` and ``OSError`` as such).
A child that crashes, times out or answers anything else raises ``BadSignatureError``: nothing
is trusted without a positive answer, and the child changed nothing it did not finish
(its writes are atomic). Cost: a process start per decision (~0.2 s idle, up to ~2 s on a
busy 2-core host), at start-up, per delivered release and per root or certificate renewal.
"""

from __future__ import annotations

import base64
import json
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from edge_agent.credentials import Credentials
from edge_agent.install.child_call import answer as child_answer
from edge_agent.install.child_call import run_child
from edge_agent.state import StateDir
from fleetcore import errors
from fleetcore.release_doc import ReleaseDocument, SignedRelease, TrustedMark, parse_document

__all__ = ["TRUST_TIMEOUT_S", "ReleaseView", "RootView", "TrustKeeper"]

TRUST_TIMEOUT_S = 120.0
_MAX_ANSWER_BYTES = 4 * 1024 * 1024  # a release document is at most 256 KiB, roots 64 KiB


@dataclass(frozen=True)
class RootView:
    """The current root of trust, as the serving process needs it."""

    version: int
    expires_at: float
    publisher_pems: tuple[bytes, ...]
    publisher_threshold: int


class ReleaseView:
    """The accepted release (``current``) and its high-water ``mark``; ``accept`` asks the
    child (the interface of ``release_trust.ReleaseTrust``)."""

    def __init__(self, keeper: TrustKeeper) -> None:
        self._keeper = keeper

    @property
    def current(self) -> ReleaseDocument | None:
        return self._keeper.release

    @property
    def mark(self) -> TrustedMark | None:
        doc = self._keeper.release
        return TrustedMark(serial=doc.serial, digest=doc.digest) if doc is not None else None

    def accept(self, signed: SignedRelease, now: float) -> tuple[ReleaseDocument, bool]:
        return self._keeper.accept(signed, now)


class TrustKeeper:
    """The trust state of the device in ``state``: loaded (and re-verified) by the child."""

    def __init__(self, state: StateDir, device_id: str, *,
                 timeout_s: float = TRUST_TIMEOUT_S) -> None:
        self._state, self._device_id, self._timeout_s = state, device_id, timeout_s
        self._lock = threading.Lock()
        self.release: ReleaseDocument | None = None
        self.root: RootView | None = None
        self.creds: Credentials
        self.trust = ReleaseView(self)
        self._take(self._call({"op": "load"}))

    # ------------------------------------------------------------------ decisions
    def accept(self, signed: SignedRelease, now: float) -> tuple[ReleaseDocument, bool]:
        """Verify ``signed`` at ``now``; the child persists it if it is newer."""
        with self._lock:
            answer = self._call({"op": "accept", "now": now, "signed": {
                "document": _text(signed.document), "signature": _text(signed.signature),
                "signatures": [[s.keyid, _text(s.sig)] for s in signed.signatures]}})
            self._take(answer)
            doc = parse_document(signed.document)
        return doc, bool(answer.get("changed"))

    def adopt_roots(self, envelopes: Sequence[bytes], now: float) -> str | None:
        """Verify and persist delivered roots; the refusal that stopped them, if any."""
        with self._lock:
            answer = self._call({"op": "roots", "now": now,
                                 "envelopes": [_text(e) for e in envelopes]})
            self._take(answer)
        error = answer.get("root_error")
        return error if isinstance(error, str) else None

    def new_key_and_csr(self) -> tuple[bytes, bytes]:
        """A fresh device key and a CSR for it (PEM)."""
        answer = self._call({"op": "csr"})
        return _bytes(answer, "key_pem"), _bytes(answer, "csr_pem")

    def install_renewed(self, key_pem: bytes, cert_pem: bytes, ca_pem: bytes,
                        now: float) -> None:
        """Check the renewed certificate (our key, our id, the CA bundle) and swap it in."""
        with self._lock:
            self._take(self._call({"op": "renewed", "now": now, "key_pem": _text(key_pem),
                                   "cert_pem": _text(cert_pem), "ca_pem": _text(ca_pem)}))

    # ------------------------------------------------------------------ the child
    def _call(self, request: dict[str, Any]) -> dict[str, Any]:
        request = {**request, "state": str(self._state.root), "device_id": self._device_id}
        try:
            proc = run_child("edge_agent.install.trust_child", json.dumps(request).encode(),
                             self._timeout_s)
        except subprocess.TimeoutExpired:
            raise errors.BadSignatureError(
                f"the trust check ({request['op']}) took over {self._timeout_s:g} s") from None
        answer = child_answer(proc.stdout, "trust answer", _MAX_ANSWER_BYTES)
        if "error" in answer:
            raise _error(answer)
        if not answer or (request["op"] != "csr" and not isinstance(answer.get("snapshot"),
                                                                     dict)):
            tail = proc.stderr.decode("utf-8", "replace").strip().splitlines()[-1:]
            raise errors.BadSignatureError(
                f"the trust check ({request['op']}) failed (exit {proc.returncode}): "
                f"{(tail or ['no answer'])[0][:300]}")
        return answer

    def _take(self, answer: dict[str, Any]) -> None:
        snap = answer["snapshot"]
        cert = snap["cert"]
        self.creds = Credentials(
            key_pem=self._state.key.read_bytes(), cert_pem=self._state.cert.read_bytes(),
            ca_pem=self._state.ca.read_bytes(), serial=str(cert["serial"]),
            not_before=float(cert["not_before"]), not_after=float(cert["not_after"]))
        root = snap.get("root")
        self.root = None if root is None else RootView(
            version=int(root["version"]), expires_at=float(root["expires_at"]),
            publisher_pems=tuple(p.encode("ascii") for p in root["publisher_pems"]),
            publisher_threshold=int(root["publisher_threshold"]))
        release = snap.get("release")
        self.release = None if release is None else parse_document(
            _b64(release["document"]))


def _text(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


def _b64(value: object) -> bytes:
    if not isinstance(value, str):
        raise errors.BadSignatureError("the trust check answered a malformed snapshot")
    return base64.b64decode(value.encode("ascii"), validate=True)


def _bytes(answer: dict[str, Any], key: str) -> bytes:
    return _b64(answer.get(key))


def _error(answer: dict[str, Any]) -> Exception:
    names, message = answer.get("error"), str(answer.get("message", ""))
    for name in names if isinstance(names, list) else []:
        kind = getattr(errors, str(name), None)
        if isinstance(kind, type) and issubclass(kind, errors.EdgefleetError):
            return kind(message)
        if name in ("ValueError", "OSError"):
            return ValueError(message) if name == "ValueError" else OSError(message)
    return errors.BadSignatureError(f"the trust check refused: {message}")
