"""The agent's trust decisions, in a short-lived child process (docs/serving.md, "Agent footprint").

Checking signatures and certificates needs ``cryptography`` (~13 MiB resident in the process
that imports it, and Python never unloads a module). The agent's serving process holds the
results as plain data (``trust_keeper.py``); this child loads the persisted trust state from
the state directory, does one operation with the unchanged shells around the pure cores
(``release_trust.ReleaseTrust``, ``root_trust.RootTrust``, ``edge_agent.identity``), writes
what that operation persists (atomically, as those shells always did), answers one line of
JSON and exits, which gives the memory back.

Operations (the request is one JSON object on stdin: ``op``, ``state``, ``device_id`` and the
operation's fields; bytes travel as base64):

* ``load``: finish or discard an interrupted certificate renewal, then re-verify the stored
  root chain and release (as the agent did at start-up in its own process);
* ``accept``: verify a delivered release and persist it if it is newer (``signed``, ``now``);
* ``roots``: verify and persist delivered roots, then move the release trust to the new
  release keys (``envelopes``, ``now``); a refused root is answered as ``root_error``;
* ``csr``: a new device key and a CSR for it (``key_pem``, ``csr_pem``);
* ``renewed``: check a renewed certificate against that key, the device id and the CA
  bundle sent with it, then swap them in (``key_pem``, ``cert_pem``, ``ca_pem``, ``now``).

Every answer but ``csr``'s carries the snapshot the parent keeps: the certificate's facts, the
current root's version, expiry and publisher keys, and the accepted release document. A
refusal is ``{"error": [class names, most derived first], "message": ...}``; the parent raises
the first of those it knows (``trust_keeper.py``).
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path
from typing import Any

from edge_agent import identity
from edge_agent.install.release_trust import ReleaseTrust
from edge_agent.install.root_trust import RootTrust
from edge_agent.state import StateDir
from fleetcore import pki
from fleetcore import root as fleet_root
from fleetcore.errors import EdgefleetError, UntrustedInputError
from fleetcore.release import SignedRelease
from fleetcore.signing import KeySignature

__all__ = ["main"]


def _b64(value: str) -> bytes:
    return base64.b64decode(value.encode("ascii"), validate=True)


def _text(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


class _Trust:
    """The persisted trust state of one device, loaded as the agent used to load it."""

    def __init__(self, state: StateDir, device_id: str) -> None:
        self.state, self.device_id = state, device_id
        self.pinned_release_key = pki.load_public_key(state.release_pub.read_bytes())
        self.roots = RootTrust(state.root_file)
        self.releases = ReleaseTrust(state.release,
                                     self.roots.release_keys() or self.pinned_release_key,
                                     device_id, retired=self.roots.retired_release_keys())

    def snapshot(self) -> dict[str, Any]:
        creds = identity.load_credentials(self.state)
        current = self.roots.current
        release = self.releases.current
        return {
            "cert": {"serial": creds.serial, "not_before": creds.not_before,
                     "not_after": creds.not_after},
            "root": None if current is None else {
                "version": current.version, "expires_at": current.root.expires_at,
                "publisher_pems": [p.decode("ascii") for p in self.roots.publisher_pems() or []],
                "publisher_threshold": self.roots.publisher_threshold()},
            "release": None if release is None else {
                "document": _text(self.releases.current_document or b"")},
        }

    def accept(self, request: dict[str, Any]) -> dict[str, Any]:
        signed = request["signed"]
        release = SignedRelease(
            document=_b64(signed["document"]), signature=_b64(signed["signature"]),
            signatures=tuple(KeySignature(keyid, _b64(sig))
                             for keyid, sig in signed["signatures"]))
        _, changed = self.releases.accept(release, float(request["now"]))
        return {"changed": changed}

    def adopt_roots(self, request: dict[str, Any]) -> dict[str, Any]:
        """What the agent did in its own process before: pin a first root (an agent enrolled
        before roots), take the updates, move the release trust to new release keys."""
        envelopes = [_b64(e) for e in request["envelopes"]]
        before = self.roots.release_keys()
        error: Exception | None = None
        try:
            if self.roots.current is None and envelopes:
                ordered = sorted(envelopes, key=fleet_root.envelope_version)
                self.roots.pin(ordered[0], pinned_release_key=self.pinned_release_key)
                envelopes = ordered[1:]
            if envelopes:
                error = self.roots.update(envelopes, float(request["now"])).error
        except UntrustedInputError as exc:
            error = exc
        after = self.roots.release_keys()
        if after is not None and (before is None or set(after.keys) != set(before.keys)
                                  or after.threshold != before.threshold):
            self.releases.use_keys(after, forget=before is not None
                                   or self.pinned_release_key not in after.keys.values())
        return {"root_error": None if error is None else str(error)}


def _csr() -> dict[str, Any]:
    key = pki.generate_key()
    return {"key_pem": _text(pki.private_key_pem(key)), "csr_pem": _text(pki.make_csr(key))}


def run(request: dict[str, Any]) -> dict[str, Any]:
    op = request["op"]
    if op == "csr":
        return _csr()
    state, device_id = StateDir(Path(request["state"])), str(request["device_id"])
    if op == "renewed":
        identity.install_renewed(state, _b64(request["key_pem"]), _b64(request["cert_pem"]),
                                 device_id, float(request["now"]),
                                 ca_pem=_b64(request["ca_pem"]))
    trust = _Trust(state, device_id)  # its snapshot finishes an interrupted renewal first
    answer: dict[str, Any] = {}
    if op == "accept":
        answer = trust.accept(request)
    elif op == "roots":
        answer = trust.adopt_roots(request)
    elif op not in ("load", "renewed"):
        raise ValueError(f"unknown trust operation {op!r}")
    return {**answer, "snapshot": trust.snapshot()}


def main() -> int:
    request = json.loads(sys.stdin.buffer.read())
    try:
        answer = run(request)
    except (EdgefleetError, ValueError, OSError) as exc:
        answer = {"error": [c.__name__ for c in type(exc).__mro__], "message": str(exc)}
    sys.stdout.write(json.dumps(answer) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
