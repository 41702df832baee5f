"""Debian's Chromium, driven by Playwright (no browser download): where it is and its flags."""
import os

CHROMIUM_PATHS = ("/usr/lib/chromium/chromium", "/usr/bin/chromium")
# No sandbox (root in a container), nothing phoning home on a closed network.
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync"]


def chromium() -> str:
    """Chromium's executable; AssertionError (a failure, never a skip) when it is missing."""
    for path in CHROMIUM_PATHS:
        if os.access(path, os.X_OK):
            return path
    raise AssertionError("Chromium not found: run `bash scripts/test.sh`, which installs "
                         "Debian's chromium")
