#!/usr/bin/env bash
# Install everything the test suite needs, Debian packages included, then run the whole suite.
# Idempotent: a second run installs nothing new. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/apt.sh
packages=()
command -v turnutils_uclient >/dev/null || packages+=(coturn)   # turnutils_* client tools
command -v openssl >/dev/null || packages+=(openssl)           # test certificates
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || packages+=(postgresql)  # throwaway servers
"$PYTHON3" -c "import ensurepip" 2>/dev/null || packages+=(python3-venv)
command -v haproxy >/dev/null || packages+=(haproxy)           # the PROXY protocol tests
command -v curl >/dev/null || packages+=(curl)                 # HTTPS on the shared TURN port
[ -x /usr/lib/chromium/chromium ] || packages+=(chromium)     # the browser WebRTC tests
command -v ip >/dev/null || packages+=(iproute2)              # the quick start test's network namespace
command -v unshare >/dev/null || packages+=(util-linux)
# The native modules (relay/net/dataplane.c, relay/util/keyed_hmac.c) are compiled by `pip
# install`: a C compiler, the headers of the interpreters they build for (PyPy's too) and of
# OpenSSL, and clang for the data plane's fuzz target.
command -v gcc >/dev/null || packages+=(gcc)
for package in libffi-dev libssl-dev python3-dev pypy3-dev clang libclang-rt-14-dev; do
    dpkg -s "$package" >/dev/null 2>&1 || packages+=("$package")
done
apt_install "${packages[@]}"

# The operator tests' Kubernetes cluster (control plane, node, Helm) and the images the node runs:
# built once, then cached outside the checkout (only what changed is rebuilt).
bash scripts/k8s-tools.sh >/dev/null
bash scripts/images.sh >/dev/null

# Playwright drives Debian's Chromium: never let it download a browser of its own.
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1
[ -x .venv/bin/python ] || "$PYTHON3" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# editable_mode=compat: a plain editable install hides twisted/plugins from twistd.
.venv/bin/python -m pip install -q -e '.[test]' --config-settings editable_mode=compat
# Lint and import order everywhere, types on the sans-IO layers (configured in pyproject.toml).
.venv/bin/ruff check .
.venv/bin/mypy
status=0
.venv/bin/python -m pytest "$@" || status=$?
if [ "$#" -eq 0 ]; then
    # The suite ran on the default, the native data plane: the UDP interop tests once more on
    # the pure-Python reference path (--dataplane python), then on a build of the native one
    # with AddressSanitizer and UndefinedBehaviorSanitizer.
    # (What a data plane changes: relaying, counting, limits, relays between allocations; the
    # workers' and drain's mechanics are the same on both.)
    TURNRELAY_TEST_DATAPLANE=python .venv/bin/python -m pytest -q tests/e2e/test_coturn_clients.py \
        tests/e2e/test_aioice_client.py tests/e2e/test_accounting.py tests/e2e/test_limits.py \
        tests/e2e/test_own_allocations.py -k "not tcp and not tls" || status=$?
    bash bench/asan.sh || status=$?
fi
exit "$status"
