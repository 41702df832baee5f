#!/usr/bin/env bash
# The given tests (default: the UDP interop tests, and the HMAC's) on the native modules built
# with AddressSanitizer and UndefinedBehaviorSanitizer: a memory error or undefined behaviour in
# relay/net/dataplane.c or relay/util/keyed_hmac.c aborts the process, and the test fails.
#     bash bench/asan.sh [PYTEST ARGS...]
# Each sanitized module is built beside the normal one under the interpreter's own suffix, which
# Python prefers to abi3; on exit, whatever was there before comes back.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$#" -gt 0 ] || set -- tests/e2e/test_coturn_clients.py tests/e2e/test_aioice_client.py \
    tests/e2e/test_native_dataplane.py tests/unit/test_keyed_hmac.py -k "not tcp and not tls"
suffix=$(.venv/bin/python -c "import importlib.machinery as m; print(m.EXTENSION_SUFFIXES[0])")
restore=()
trap 'for step in "${restore[@]}"; do eval "$step"; done' EXIT
for module in "relay/net/_dataplane$suffix" "relay/util/_keyed_hmac$suffix"; do
    if [ -e "$module" ]; then
        mv "$module" "$module.before-asan"
        restore+=("mv '$module.before-asan' '$module'")
    else
        restore+=("rm -f '$module'")
    fi
done
export TURNRELAY_NATIVE_CFLAGS="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g -O1"
.venv/bin/python relay/net/dataplane_build.py
.venv/bin/python relay/util/keyed_hmac_build.py
unset TURNRELAY_NATIVE_CFLAGS
# The ASan runtime must come first in the process (Python itself is not instrumented); leaks
# are the interpreter's, not ours, so leak checking is off.
LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)" \
ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
TURNRELAY_TEST_DATAPLANE=native .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
