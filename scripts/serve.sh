#!/usr/bin/env bash
# Install turnrelay into .venv and run it in the foreground on its embedded defaults.
# Extra arguments go to `twistd turnrelay`, e.g. --user alice:secret --realm example.org
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
if ! python3 -c "import ensurepip" 2>/dev/null; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q .
exec .venv/bin/twistd -n --pidfile= turnrelay "$@"
