"""Chromium following a full relay's redirect, run inside a network namespace of its own.

libwebrtc refuses a redirect to a loopback address (Chromium bug 649118) and gathers no
candidate from a loopback interface, so the relays need other addresses: in a fresh namespace
(`unshare --net`) a veth interface gets NEAR and FAR, that no documentation or private range
covers (the peer rules would refuse those), and nothing leaves the namespace.  Two relays,
each in its default configuration (two workers at least) and sharing a nonce key as a fleet
does: us-east on NEAR, full at --total-quota 1, and eu-west on FAR, the one serving region of
us-east's --regions-file.  Chromium makes a relay-only call through us-east's `turn:` URI.
`python -m support.redirect_browser DIR` prints, as JSON, the call's result (the self-test
page's loopbackCall) and both relays' logs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import resources

from support.accounting import HeldSession
from support.chromium import CHROMIUM_FLAGS, chromium, served_page
from support.servers import PASSWORD, USER, start_server

NEAR, FAR = "11.0.0.1", "11.0.0.2"


def main(directory: str) -> None:
    # A veth pair, both ends here: Chromium gathers no candidate from loopback interfaces.
    for command in (["ip", "link", "set", "lo", "up"],
                    ["ip", "link", "add", "rd0", "type", "veth", "peer", "name", "rd1"],
                    ["ip", "address", "add", f"{NEAR}/24", "dev", "rd0"],
                    ["ip", "address", "add", f"{FAR}/24", "dev", "rd0"],
                    ["ip", "link", "set", "rd0", "up"], ["ip", "link", "set", "rd1", "up"],
                    ["ip", "route", "add", "default", "dev", "rd0", "src", NEAR]):
        subprocess.run(command, check=True, timeout=30)
    # One fleet, one nonce key: the login a client made with us-east's nonce holds on eu-west
    # (libwebrtc keeps the nonce through a redirect, and gives up on 438 Stale Nonce).
    secret = os.path.join(directory, "nonce.key")
    with open(secret, "w") as f:
        f.write(os.urandom(32).hex() + "\n")
    far = start_server("--region", "eu-west", "--nonce-secret-file", secret, host=FAR,
                       state_dir=os.path.join(directory, "far"))
    regions = os.path.join(directory, "regions.toml")
    with open(regions, "w") as f:
        f.write(f'[regions.eu-west]\nhost = "{FAR}"\nport = {far.port}\n')
    full = start_server("--region", "us-east", "--regions-file", regions, "--total-quota", "1",
                        "--nonce-secret-file", secret, host=NEAR, state_dir=os.path.join(directory, "full"))
    try:
        full.read_everywhere(f"redirects beyond this region, nearest first: {FAR}:{far.port}")
        held = HeldSession(full)  # the one allocation --total-quota allows
        result = call(f"turn:{NEAR}:{full.port}?transport=udp")
        held.close()
    finally:
        logs = {"far": far.stop(), "full": full.stop()}
    json.dump({"result": result, **logs}, sys.stdout)


def call(url: str) -> dict:
    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    from playwright.sync_api import sync_playwright

    page_html = resources.files("relay.web").joinpath("test_page.html").read_bytes()
    with served_page(page_html) as port, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), headless=True,
                                             args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/test")
            return page.evaluate("([server, options]) => loopbackCall(server, options)",
                                 [{"urls": url, "username": USER, "credential": PASSWORD},
                                  {"messages": 10, "size": 500}])
        finally:
            browser.close()


if __name__ == "__main__":
    main(sys.argv[1])
