"""The README's quick start, run as written inside a network namespace of its own, and then
what its start banner says to paste, as printed.

The quick start uses the embedded defaults (ports 3478 and 5349 on every address, relay
addresses found from the host's route, several workers, a first-run credential): in a fresh
network namespace those ports are free whatever else runs on the machine, and the namespace
gets one routable address (on a veth interface, with a default route through it) for the
relay to find, as a host would have.

`python -m support.quickstart README` must run inside that namespace (`unshare --net`); it
prints, as JSON, each client command's exit status and output (the README's, then the
banner's `relay test` and `new token` lines), what the banner's `browser test` URL showed in
headless Chromium, the number of log lines the start took, and the server's whole log.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from typing import Dict, List, Tuple

from support.chromium import CHROMIUM_FLAGS, chromium
from support.servers import ROOT, Server

BEGIN, END = "<!-- quick-start", "<!-- /quick-start -->"
SERVE = "bash scripts/serve.sh"
# An address no documentation or private range covers (the peer rules would refuse those), on
# loopback: the namespace's only interface, so nothing leaves it.
ADDRESS = "11.0.0.1"
# The start banner's first line, logged once every worker is ready; its last, on a first run.
READY = r"turnrelay \S+ ready: "
LAST = r"^\s+new token:"
PASTE = re.compile(r"^\s+(relay test|new token|browser test):\s+(.*)$")
BIN = os.path.dirname(sys.executable)


def commands(readme: str) -> Tuple[List[str], List[List[str]]]:
    """The server's arguments and the client commands of the README's quick start: every line
    of its `sh` blocks, comments removed."""
    text = readme.split(BEGIN, 1)[1].split(END, 1)[0]
    lines = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        lines += [shlex.split(line, comments=True) for line in block.splitlines()]
    lines = [line for line in lines if line]
    server = [line for line in lines if shlex.join(line).startswith(SERVE)]
    assert len(server) == 1, f"one `{SERVE}` line expected in the quick start: {lines}"
    return server[0][2:], [line for line in lines if line is not server[0]]


def serve_command(arguments: List[str]) -> List[str]:
    """What scripts/serve.sh runs once it has installed turnrelay into .venv (its install is
    the packaging test's part): its last line, checked here, with this suite's venv."""
    with open(os.path.join(ROOT, "scripts", "serve.sh")) as script:
        last = script.read().strip().splitlines()[-1]
    assert last == 'exec .venv/bin/twistd -n --pidfile= turnrelay "$@"', last
    return [os.path.join(BIN, "twistd"), "-n", "--pidfile=", "turnrelay", *arguments]


def client_command(argv: List[str]) -> List[str]:
    assert argv[0].startswith(".venv/bin/"), f"a quick start command outside .venv: {argv}"
    return [os.path.join(BIN, argv[0][len(".venv/bin/"):]), *argv[1:]]


def main(readme_path: str) -> None:
    # A veth pair, both ends here: an interface that is not loopback, as a host has (Chromium
    # gathers no candidates, so makes no TURN allocation, from loopback interfaces alone).
    for command in (["ip", "link", "set", "lo", "up"],
                    ["ip", "link", "add", "qs0", "type", "veth", "peer", "name", "qs1"],
                    ["ip", "addr", "add", f"{ADDRESS}/24", "dev", "qs0"],
                    ["ip", "link", "set", "qs0", "up"], ["ip", "link", "set", "qs1", "up"],
                    ["ip", "route", "add", "default", "dev", "qs0", "src", ADDRESS]):
        subprocess.run(command, check=True, timeout=30)
    with open(readme_path) as readme:
        arguments, clients = commands(readme.read())
    home = tempfile.mkdtemp(prefix="quickstart-home-")  # the default --state-dir is under $HOME
    env = dict(os.environ, HOME=home)
    process = subprocess.Popen(serve_command(arguments), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)
    server = Server(process, ADDRESS, 3478, 5349)
    results: List[Dict[str, object]] = []
    browser: Dict[str, object] = {}
    try:
        server.search(READY, timeout=60)
        server.search(LAST, timeout=10)
        start_lines = len(server.log)
        for argv in clients:
            results.append(run(client_command(argv), env))
        paste = {m.group(1): m.group(2) for m in map(PASTE.match, server.log) if m}
        for what in ("relay test", "new token"):
            results.append(run(shlex.split(paste[what]), env))
        browser = browse(paste["browser test"])
    finally:
        server.stop()
    json.dump({"clients": results, "browser": browser, "start_lines": start_lines,
               "log": "".join(server.log)}, sys.stdout)


def run(argv: List[str], env: Dict[str, str]) -> Dict[str, object]:
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    return {"command": argv, "status": done.returncode, "output": done.stdout + done.stderr}


def browse(url: str) -> Dict[str, object]:
    """The self-test page at `url` in headless Chromium: its status and result rows."""
    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), headless=True,
                                             args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            page.goto(url)
            page.wait_for_selector("body[data-done]", timeout=90_000)
            return {"status": page.text_content("#status"), "address": page.url,
                    "rows": page.eval_on_selector_all("#results tbody tr", """rows => rows.map(
                        row => ({transport: row.dataset.transport, ok: row.dataset.ok === "true",
                                 cells: [...row.cells].map(cell => cell.textContent)}))""")}
        finally:
            browser.close()


if __name__ == "__main__":
    main(sys.argv[1])
