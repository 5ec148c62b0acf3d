"""fleetcore.operator_config: the fleet.toml that `control-plane init` and `fleet operators
create` write and `fleet --config` reads, and how strictly it is read."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from fleetcore import operator_config
from fleetcore.errors import InvalidInputError
from fleetcore.operator_config import OperatorConfig


def _write(folder: Path, api: str = "cp.example.com:7443") -> Path:
    return operator_config.write(folder, api=api, key_pem=b"KEY", cert_pem=b"CERT",
                                 ca_pem=b"CA")


def _rewrite(path: Path, text: str) -> None:
    path.write_text(text)


def test_round_trip_resolves_paths_against_the_config_folder(tmp_path: Path) -> None:
    path = _write(tmp_path / "op")
    assert path == tmp_path / "op" / "fleet.toml"
    assert operator_config.load(path) == OperatorConfig(
        api="cp.example.com:7443", cert=tmp_path / "op" / "operator.pem",
        key=tmp_path / "op" / "operator.key", ca=tmp_path / "op" / "ca.pem")
    assert (tmp_path / "op" / "operator.key").read_bytes() == b"KEY"
    assert stat.S_IMODE(os.stat(tmp_path / "op" / "operator.key").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "op").st_mode) == 0o700


def test_the_folder_can_move(tmp_path: Path) -> None:
    _write(tmp_path / "op")
    (tmp_path / "op").rename(tmp_path / "moved")
    cfg = operator_config.load(tmp_path / "moved" / "fleet.toml")
    assert cfg.cert == tmp_path / "moved" / "operator.pem"


def test_absolute_paths_are_kept(tmp_path: Path) -> None:
    path = _write(tmp_path / "op")
    elsewhere = tmp_path / "ca-elsewhere.pem"
    elsewhere.write_bytes(b"CA")
    _rewrite(path, f'api = "[::1]:7443"\ncert = "operator.pem"\nkey = "operator.key"\n'
                   f'ca = "{elsewhere}"\n')
    cfg = operator_config.load(path)
    assert (cfg.api, cfg.ca) == ("[::1]:7443", elsewhere)


def test_a_missing_config_names_where_one_comes_from(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match=r"does not exist; .*control-plane init"):
        operator_config.load(tmp_path / "nope.toml")


@pytest.mark.parametrize(("text", "message"), [
    ('cert = "operator.pem"\nkey = "operator.key"\nca = "ca.pem"\n', r"missing key 'api'"),
    ('api = "h:1"\nkey = "operator.key"\nca = "ca.pem"\n', r"missing key 'cert'"),
    ('api = 7443\ncert = "operator.pem"\nkey = "operator.key"\nca = "ca.pem"\n',
     r"api must be a non-empty string, got int 7443"),
    ('api = "h:1"\ncert = ["operator.pem"]\nkey = "operator.key"\nca = "ca.pem"\n',
     r"cert must be a non-empty string, got list"),
    ('api = "h:1"\ncert = ""\nkey = "operator.key"\nca = "ca.pem"\n',
     r"cert must be a non-empty string"),
    ('api = "h:1"\ncert = "operator.pem"\nkey = "operator.key"\nca = "ca.pem"\ncaa = "x"\n',
     r"unknown key 'caa'; an operator config has exactly api, cert, key, ca"),
    ('api = "h:1"\ncert = "operator.pem"\nkey = "operator.key"\nca = "ca.pem"\n[tls]\n',
     r"unknown key 'tls'"),
    ('api = "no-port"\ncert = "operator.pem"\nkey = "operator.key"\nca = "ca.pem"\n',
     r"api: expected HOST:PORT, got 'no-port'"),
    ('api = "h:1"\ncert = "gone.pem"\nkey = "operator.key"\nca = "ca.pem"\n',
     r"cert file .*gone.pem does not exist"),
    ('api = "h:1\n', r"not valid TOML"),
])
def test_loading_is_strict(tmp_path: Path, text: str, message: str) -> None:
    path = _write(tmp_path)
    _rewrite(path, text)
    with pytest.raises(InvalidInputError, match=message) as caught:
        operator_config.load(path)
    assert str(path) in str(caught.value)


def test_fleet_reports_a_bad_config_as_one_error_line(tmp_path: Path) -> None:
    path = _write(tmp_path)
    _rewrite(path, 'api = "h:1"\ncert = "operator.pem"\nkey = "operator.key"\nca = "ca.pem"\n'
                   'insecure = true\n')
    r = subprocess.run([sys.executable, "-m", "fleet", "--config", str(path), "devices", "list"],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 1
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "unknown key 'insecure'" in r.stderr
