#!/usr/bin/env bash
# Install turnrelay into .venv and run it in the foreground on its embedded defaults.
# Extra arguments go to `twistd turnrelay`, e.g. --user alice:secret --realm example.org
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/apt.sh
"$PYTHON3" -c "import ensurepip" 2>/dev/null || apt_install python3-venv
[ -x .venv/bin/python ] || "$PYTHON3" -m venv .venv
.venv/bin/python -m pip install -q .
exec .venv/bin/twistd -n --pidfile= turnrelay "$@"
