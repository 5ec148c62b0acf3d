#!/bin/sh
# Runs as the control plane's init container before every start.
# First start: `control-plane init` creates the home on the persistent volume (fleet CA,
# server certificate for the names in EDGEFLEET_SANS, release key, database, admin operator).
# Every start: the address that enrollment gives agents ([server] api_advertise) is set from
# EDGEFLEET_API_ADVERTISE, so the overlay stays the one place that names it.
set -eu
home="${EDGEFLEET_HOME:?EDGEFLEET_HOME is not set}"
if [ ! -f "${home}/config.toml" ]; then
  set --
  for san in ${EDGEFLEET_SANS:-}; do
    set -- "$@" --san "${san}"
  done
  control-plane init --home "${home}" "$@"
fi
if [ -n "${EDGEFLEET_API_ADVERTISE:-}" ]; then
  python - "${home}" "${EDGEFLEET_API_ADVERTISE}" <<'PY'
import sys

from control_plane.config import ControlPlaneConfig, parse_hostport

home, advertise = sys.argv[1], sys.argv[2]
parse_hostport(advertise)
cfg = ControlPlaneConfig.load(home)
if cfg.api_advertise != advertise:
    cfg.api_advertise = advertise
    cfg.save()
    print(f"api_advertise = {advertise}")
PY
fi
