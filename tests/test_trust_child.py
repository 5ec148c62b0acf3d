"""The agent's trust decisions in a short-lived child (issue 19, footprint): the keeper in the
serving process holds what the child verified, raises the child's refusals as the same errors,
trusts nothing from a child that failed, and never loads ``cryptography`` itself. A real
enrolled agent's state directory, the real control plane's release key, real child processes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_agent.identity import load_credentials
from edge_agent.install.release_trust import ReleaseTrust
from edge_agent.install.root_trust import RootTrust
from edge_agent.install.trust_keeper import TrustKeeper
from edge_agent.state import AgentConfig, StateDir
from fleetcore import pki
from fleetcore.errors import BadSignatureError, RollbackError, WrongDeviceError
from fleetcore.release import Arm, ModelRelease, SignedRelease, encode_document, sign_release
from tests.support import RunningControlPlane

REPO = Path(__file__).resolve().parent.parent


def _release(cp: RunningControlPlane, device_id: str, serial: int,
             key_file: str = "release.key") -> SignedRelease:
    now = time.time()
    doc = encode_document(device_id, serial, now, now + 3600, [ModelRelease("digits", (
        Arm(1, "sha256:" + "a" * 64, 1000, 1.0),))])
    return sign_release(doc, pki.load_private_key((cp.home / "keys" / key_file).read_bytes()))


def _files(state: StateDir) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (state.release, state.root_file, state.cert,
                                              state.key, state.ca) if p.exists()}


def test_the_keeper_holds_what_the_child_verified_and_refusals_change_nothing(
        cp: RunningControlPlane, tmp_path: Path) -> None:
    cp.enroll_agent(tmp_path / "a")
    state = StateDir(tmp_path / "a")
    device_id = AgentConfig.load(state).device_id
    keeper = TrustKeeper(state, device_id)
    creds = load_credentials(state)  # in this process, with cryptography
    assert (keeper.creds.serial, keeper.creds.not_after) == (creds.serial, creds.not_after)
    assert keeper.creds.cert_pem == state.cert.read_bytes()
    roots = RootTrust(state.root_file)
    assert keeper.root is not None and keeper.root.version == roots.version == 1
    assert keeper.trust.current is None and keeper.trust.mark is None

    doc, changed = keeper.trust.accept(_release(cp, device_id, 5), time.time())
    assert changed and doc.serial == 5 and keeper.trust.mark is not None
    assert keeper.trust.mark.serial == 5 and keeper.trust.current == doc
    # Persisted by the child as the in-process shell reads it.
    on_disk = ReleaseTrust(state.release, roots.release_keys() or pki.load_public_key(
        state.release_pub.read_bytes()), device_id)
    assert on_disk.mark == keeper.trust.mark
    # A second keeper (a restarted agent) loads the same state.
    assert TrustKeeper(state, device_id).trust.mark == keeper.trust.mark

    before = _files(state)
    refusals = [
        (_release(cp, "someone-else", 6), WrongDeviceError),
        (_release(cp, device_id, 4), RollbackError),
        (SignedRelease(_release(cp, device_id, 7).document, b"\x30\x06\x02\x01\x01\x02\x01\x01"),
         BadSignatureError),
    ]
    for signed, error in refusals:
        with pytest.raises(error):
            keeper.trust.accept(signed, time.time())
        assert keeper.trust.mark is not None and keeper.trust.mark.serial == 5
        assert _files(state) == before


def test_a_child_that_fails_is_a_refusal(cp: RunningControlPlane, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    cp.enroll_agent(tmp_path / "a")
    state = StateDir(tmp_path / "a")
    device_id = AgentConfig.load(state).device_id
    keeper = TrustKeeper(state, device_id)
    signed = _release(cp, device_id, 3)
    before = _files(state)
    crash = tmp_path / "crash.py"  # an interpreter that answers nothing and fails
    crash.write_text("#!/bin/sh\necho 'Traceback: boom' >&2\nexit 3\n")
    crash.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(crash))
    with pytest.raises(BadSignatureError, match="exit 3"):
        keeper.trust.accept(signed, time.time())
    assert keeper.trust.mark is None and _files(state) == before
    monkeypatch.undo()
    assert keeper.trust.accept(signed, time.time())[1] is True


_SERVING = """
import json, sys, time
from pathlib import Path
from edge_agent.install.trust_keeper import TrustKeeper
from edge_agent.state import AgentConfig, StateDir
import edge_agent.daemon, edge_agent.cli, edge_agent.transport.mqtt, edge_agent.transport.grpc
from fleetcore.release_doc import SignedRelease
from fleetcore.signatures import KeySignature
state = StateDir(Path(sys.argv[1]))
keeper = TrustKeeper(state, AgentConfig.load(state).device_id)
signed = json.loads(sys.argv[2])
doc, changed = keeper.trust.accept(SignedRelease(
    bytes.fromhex(signed["document"]), b"",
    signatures=tuple(KeySignature(k, bytes.fromhex(s)) for k, s in signed["signatures"])),
    time.time())
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"cryptography", "dns", "tarfile",
                                                          "prometheus_client", "model_signing"})
print(json.dumps({"serial": doc.serial, "changed": changed, "heavy": heavy}))
"""


def test_the_serving_process_never_loads_cryptography(cp: RunningControlPlane,
                                                      tmp_path: Path) -> None:
    cp.enroll_agent(tmp_path / "a")
    state = StateDir(tmp_path / "a")
    signed = _release(cp, AgentConfig.load(state).device_id, 9)
    arg = json.dumps({"document": signed.document.hex(),
                      "signatures": [[s.keyid, s.sig.hex()] for s in signed.signatures]})
    run = subprocess.run([sys.executable, "-c", _SERVING, str(state.root), arg], cwd=REPO,
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out == {"serial": 9, "changed": True, "heavy": []}
