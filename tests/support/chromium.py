"""Debian's Chromium, driven by Playwright (no browser download): where it is and its flags,
and a page to open in it, served by the test."""
import contextlib
import http.server
import os
import threading
from typing import Iterator

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


@contextlib.contextmanager
def served_page(body: bytes) -> Iterator[int]:
    """An HTML page at every path of 127.0.0.1:PORT, a plain HTTP server of the test's own,
    for as long as the context lasts; its port (the page's origin is http://127.0.0.1:PORT)."""
    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("content-type", "text/html; charset=utf-8")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
