"""KeyWatch: the serving control plane notices rotated key files and loads them only whole."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from control_plane.ops.home import init_home
from control_plane.services.keywatch import KeyWatch
from fleetcore import pki
from fleetcore.files import atomic_write


def _new_server_pair(home: Path) -> tuple[bytes, bytes]:
    ca_key = pki.load_private_key((home / "pki" / "ca.key").read_bytes())
    ca_cert = pki.load_certificate((home / "pki" / "ca.pem").read_bytes())
    key = pki.generate_key()
    cert = pki.issue_server_certificate(ca_key, ca_cert, key, ["localhost"],
                                        dt.datetime.now(dt.UTC), dt.timedelta(days=1))
    return pki.certificate_pem(cert), pki.private_key_pem(key)


def test_unchanged_files_load_nothing_and_a_whole_rotation_loads(tmp_path: Path) -> None:
    cfg = init_home(tmp_path / "home")
    watch = KeyWatch(cfg)
    assert watch.poll() is None
    cert_pem, key_pem = _new_server_pair(cfg.home)
    atomic_write(cfg.layout.server_cert, cert_pem)
    # Half-way: the new certificate beside the old key is not loaded (and not forgotten).
    assert watch.poll() is None
    atomic_write(cfg.layout.server_key, key_pem, mode=0o600)
    loaded = watch.poll()
    assert loaded is not None and loaded.server_cert_pem == cert_pem
    assert watch.poll() is None


def test_a_release_key_without_its_public_half_is_not_loaded(tmp_path: Path) -> None:
    cfg = init_home(tmp_path / "home")
    watch = KeyWatch(cfg)
    atomic_write(cfg.layout.release_key, pki.private_key_pem(pki.generate_key()), mode=0o600)
    assert watch.poll() is None
    os.utime(cfg.layout.release_key)
    assert watch.poll() is None
