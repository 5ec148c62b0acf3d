#!/usr/bin/env bash
# Install the Edgefleet edge agent on an SMB host (Debian/Ubuntu or any systemd distribution
# with Python >= 3.11). Idempotent: running it again upgrades the package in place and leaves
# the agent's enrollment and models alone.
#
#   sudo packaging/install-agent.sh [--source PATH_OR_WHEEL] [--python python3.11]
#                                   [--enroll-server HOST:PORT --token TOKEN --ca CA.pem
#                                    [--label K=V ...]]
#
# What it does:
#   1. creates the system user and group `edge-agent` (no login, no home),
#   2. creates a virtual environment in /opt/edgefleet/venv and installs the package with the
#      `agent` extra only (from --source: this checkout by default, or a built wheel),
#   3. installs packaging/systemd/edge-agent.service and enables it,
#   4. enrolls the host when a token is given (as the service user, so the device key is
#      created 0600 and owned by it), else prints the command to run, and starts the agent
#      once it is enrolled.
# Environment overrides (for tests and unusual layouts): PREFIX (/opt/edgefleet),
# STATE_DIR (/var/lib/edge-agent), UNIT_DIR (/etc/systemd/system), AGENT_USER (edge-agent).
set -euo pipefail

PREFIX="${PREFIX:-/opt/edgefleet}"
STATE_DIR="${STATE_DIR:-/var/lib/edge-agent}"
UNIT_DIR="${UNIT_DIR:-/etc/systemd/system}"
AGENT_USER="${AGENT_USER:-edge-agent}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SOURCE="$(dirname "${HERE}")"
PYTHON="python3"
ENROLL_SERVER=""
TOKEN=""
CA=""
LABELS=()

die() { echo "install-agent: error: $*" >&2; exit 1; }
say() { echo "install-agent: $*"; }

usage() {
  sed -n '2,/^set -euo pipefail/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
}

while [ "$#" -gt 0 ]; do
  case "$1" in
    --source) SOURCE="${2:?--source needs a value}"; shift 2 ;;
    --python) PYTHON="${2:?--python needs a value}"; shift 2 ;;
    --enroll-server) ENROLL_SERVER="${2:?--enroll-server needs HOST:PORT}"; shift 2 ;;
    --token) TOKEN="${2:?--token needs a value}"; shift 2 ;;
    --ca) CA="${2:?--ca needs a file}"; shift 2 ;;
    --label) LABELS+=("--label" "${2:?--label needs K=V}"); shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done

[ "$(id -u)" -eq 0 ] || die "run as root (it creates a system user and a systemd unit)"
command -v "${PYTHON}" >/dev/null 2>&1 || die "${PYTHON} not found; install Python >= 3.11"
"${PYTHON}" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || die "${PYTHON} is older than 3.11"
if [ -n "${TOKEN}" ] && { [ -z "${ENROLL_SERVER}" ] || [ -z "${CA}" ]; }; then
  die "--token needs --enroll-server HOST:PORT and --ca CA.pem"
fi

# 1. The service user: a system account without a shell or a home directory.
if ! getent group "${AGENT_USER}" >/dev/null; then
  groupadd --system "${AGENT_USER}"
fi
if ! id -u "${AGENT_USER}" >/dev/null 2>&1; then
  useradd --system --gid "${AGENT_USER}" --no-create-home --home-dir "${STATE_DIR}" \
    --shell /usr/sbin/nologin "${AGENT_USER}"
  say "created system user ${AGENT_USER}"
fi

# 2. The virtual environment, owned by root: the agent cannot rewrite its own code.
install -d -m 0755 "${PREFIX}"
if [ ! -x "${PREFIX}/venv/bin/python" ]; then
  "${PYTHON}" -m venv "${PREFIX}/venv"
fi
"${PREFIX}/venv/bin/pip" install --quiet --disable-pip-version-check --upgrade pip
# A directory (this checkout) or a built wheel; pip takes the extra on either.
"${PREFIX}/venv/bin/pip" install --quiet --disable-pip-version-check --upgrade "${SOURCE}[agent]"
"${PREFIX}/venv/bin/edge-agent" --help >/dev/null || die "the installed edge-agent does not start"
say "installed $("${PREFIX}/venv/bin/pip" show edgefleet | sed -n 's/^Version: /edgefleet /p') in ${PREFIX}/venv"

# 3. State directory (systemd's StateDirectory= also creates it) and the unit.
install -d -m 0700 -o "${AGENT_USER}" -g "${AGENT_USER}" "${STATE_DIR}"
install -d -m 0755 "${UNIT_DIR}"
sed -e "s#/opt/edgefleet/venv#${PREFIX}/venv#g" -e "s#/var/lib/edge-agent#${STATE_DIR}#g" \
  "${HERE}/systemd/edge-agent.service" > "${UNIT_DIR}/edge-agent.service.tmp"
chmod 0644 "${UNIT_DIR}/edge-agent.service.tmp"
mv -f "${UNIT_DIR}/edge-agent.service.tmp" "${UNIT_DIR}/edge-agent.service"
have_systemd=0
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
  have_systemd=1
  systemctl daemon-reload
  systemctl enable edge-agent.service >/dev/null
  say "installed and enabled edge-agent.service"
else
  say "no running systemd: installed ${UNIT_DIR}/edge-agent.service but did not enable it"
fi

# 4. Enrollment: once per host; a second run keeps the existing identity.
run_as_agent() {
  if command -v runuser >/dev/null 2>&1; then
    runuser -u "${AGENT_USER}" -- "$@"
  else
    su -s /bin/sh "${AGENT_USER}" -c "$(printf '%q ' "$@")"
  fi
}
if [ -f "${STATE_DIR}/agent.toml" ]; then
  say "already enrolled (${STATE_DIR}/agent.toml); to re-enroll: edge-agent enroll ... --force"
elif [ -n "${TOKEN}" ]; then
  install -m 0644 "${CA}" "${STATE_DIR}/enroll-ca.pem"
  run_as_agent "${PREFIX}/venv/bin/edge-agent" enroll --server "${ENROLL_SERVER}" \
    --token "${TOKEN}" --ca "${STATE_DIR}/enroll-ca.pem" --state-dir "${STATE_DIR}" \
    ${LABELS[@]+"${LABELS[@]}"}
  rm -f "${STATE_DIR}/enroll-ca.pem"
  say "enrolled"
else
  cat <<MSG
install-agent: not enrolled yet. Get a one-time token from an admin
  (fleet tokens create --label site=NAME) and the fleet CA (HOME/pki/ca.pem), then run:
    sudo runuser -u ${AGENT_USER} -- ${PREFIX}/venv/bin/edge-agent enroll \\
      --server CONTROL_PLANE:7444 --token TOKEN --ca ca.pem --state-dir ${STATE_DIR}
    sudo systemctl start edge-agent
  or run this script again with --enroll-server, --token and --ca.
MSG
fi

if [ "${have_systemd}" -eq 1 ] && [ -f "${STATE_DIR}/agent.toml" ]; then
  systemctl restart edge-agent.service
  say "edge-agent is $(systemctl is-active edge-agent.service || true)"
fi
