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
# Every start, when set: where retraining jobs run ([retrain] runner: local, kubernetes or argo)
# and the trainer image a cluster job runs (the overlay names both; unset leaves the config).
python - "${home}" "${EDGEFLEET_API_ADVERTISE:-}" "${EDGEFLEET_RETRAIN_RUNNER:-}" \
  "${EDGEFLEET_TRAINER_IMAGE:-}" <<'PY'
import dataclasses
import sys

from control_plane.config import RETRAIN_RUNNERS, ControlPlaneConfig, parse_hostport

home, advertise, runner, image = sys.argv[1:5]
cfg = ControlPlaneConfig.load(home)
before = cfg.to_toml()
if advertise:
    parse_hostport(advertise)
    cfg.api_advertise = advertise
if runner:
    if runner not in RETRAIN_RUNNERS:
        sys.exit(f"EDGEFLEET_RETRAIN_RUNNER must be one of {', '.join(RETRAIN_RUNNERS)}")
    cfg.retrain_runner = runner
if image:
    cfg.retrain_cluster = dataclasses.replace(cfg.retrain_cluster, image=image)
if cfg.to_toml() != before:
    cfg.save()
    ControlPlaneConfig.load(home)  # what was written reads back (bad values fail here)
    print(f"api_advertise = {cfg.api_advertise}; retrain.runner = {cfg.retrain_runner}")
PY
