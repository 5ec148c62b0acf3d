"""An operator's client config: ``fleet.toml`` beside the operator's key, certificate and CA.

``control-plane init`` writes one for the admin (``HOME/operators/admin/``) and ``fleet
operators create`` one per new operator; ``fleet --config`` reads it. The file names the API
address and three PEM files; relative paths are resolved against the folder of ``fleet.toml``
(so the folder can be copied or mounted anywhere)::

    api = "127.0.0.1:7443"
    cert = "operator.pem"
    key = "operator.key"
    ca = "ca.pem"

Loading is strict: an unknown key, a missing key, a value that is not a string, an address
that is not ``HOST:PORT`` or a PEM file that is not there is one ``InvalidInputError`` naming
the file and what to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fleetcore import tomlfile
from fleetcore.addresses import parse_hostport
from fleetcore.errors import InvalidInputError
from fleetcore.files import atomic_write, ensure_private_dir

__all__ = ["CA_FILE", "CERT_FILE", "CONFIG_FILE", "KEY_FILE", "OperatorConfig", "load", "write"]

CONFIG_FILE = "fleet.toml"
KEY_FILE = "operator.key"
CERT_FILE = "operator.pem"
CA_FILE = "ca.pem"
_KEYS = ("api", "cert", "key", "ca")
_HINT = ("it is the fleet.toml that `control-plane init` (HOME/operators/admin/) or "
         "`fleet operators create --out DIR` wrote")


@dataclass(frozen=True)
class OperatorConfig:
    """Where the control-plane API is, and the operator's mTLS credentials."""

    api: str
    cert: Path
    key: Path
    ca: Path


def write(out_dir: Path, *, api: str, key_pem: bytes, cert_pem: bytes, ca_pem: bytes) -> Path:
    """Write ``out_dir/fleet.toml`` and the three PEM files it names (the key 0600, the
    folder 0700); return the path of ``fleet.toml``."""
    out_dir = ensure_private_dir(Path(out_dir))
    atomic_write(out_dir / KEY_FILE, key_pem, mode=0o600)
    atomic_write(out_dir / CERT_FILE, cert_pem)
    atomic_write(out_dir / CA_FILE, ca_pem)
    path = out_dir / CONFIG_FILE
    tomlfile.write(path, {"api": api, "cert": CERT_FILE, "key": KEY_FILE, "ca": CA_FILE})
    return path


def load(path: Path) -> OperatorConfig:
    """Read and check a ``fleet.toml``; the PEM paths come back resolved and existing."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"operator config {path} does not exist; {_HINT}")
    doc = tomlfile.load(path)
    unknown = sorted(set(doc) - set(_KEYS))
    if unknown:
        raise InvalidInputError(f"{path}: unknown key {unknown[0]!r}; an operator config has "
                                f"exactly {', '.join(_KEYS)}")
    values: dict[str, str] = {}
    for key in _KEYS:
        if key not in doc:
            raise InvalidInputError(f"{path}: missing key {key!r}; {_HINT}")
        value = doc[key]
        if not isinstance(value, str) or not value:
            raise InvalidInputError(f"{path}: {key} must be a non-empty string, got "
                                    f"{type(value).__name__} {value!r}")
        values[key] = value
    try:
        parse_hostport(values["api"])
    except InvalidInputError as exc:
        raise InvalidInputError(f"{path}: api: {exc}") from None
    files = {key: path.parent / values[key] for key in ("cert", "key", "ca")}
    for key, file in files.items():
        if not file.is_file():
            raise InvalidInputError(f"{path}: {key} file {file} does not exist; keep the "
                                    f"config beside its {CERT_FILE}, {KEY_FILE} and {CA_FILE}")
    return OperatorConfig(api=values["api"], **files)
