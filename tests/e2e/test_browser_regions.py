"""/v1/ice.js in a real browser: headless Chromium (Debian's, driven by Playwright) on a page of
an origin a browser key lists, against two real relays (their default workers), one of them
further away: behind a path that delays each direction by DELAY (support.delay_proxy).

The tokens API, on the far relay, names its own region first (no GeoIP database: the default
region); the module measures both regions from the browser and must put the near one first,
with times that reflect the delay, remember it, and give the page ICE servers that relay."""
from __future__ import annotations

import json
import os
from typing import Iterator, NamedTuple

import pytest

from support.chromium import CHROMIUM_FLAGS, chromium, served_page
from support.cli import run_cli
from support.db import create_accounts
from support.delay_proxy import DelayProxy
from support.servers import Server, free_port, start_server

DELAY = 0.2  # seconds, each way, in front of the far relay
PAGE = b"<!doctype html><meta charset=utf-8><title>an application</title>"
NEAR_ONLY = """
[regions.near]
host = "127.0.0.1"
port = {near.port}
tls-port = {near.tls_port}
"""
FAR = """
[regions.far]
host = "127.0.0.1"
port = {port}
tls-port = {tls_port}
"""
CALL = """async ([api, key, options]) => {
  const ice = await import(api + "/v1/ice.js");
  try {
    return await ice.nearestIceServers({api, key, ...options});
  } catch (e) {
    return {error: e.message};
  }
}"""


class Setup(NamedTuple):
    near: Server
    far: Server
    api: str
    key: str
    page_port: int
    far_port: int


@pytest.fixture(scope="module")
def setup(tmp_path_factory, in_reactor) -> Iterator[Setup]:  # noqa: F811
    tmp = tmp_path_factory.mktemp("browser-regions")
    dsn = f"sqlite:///{tmp / 'accounts.db'}"
    in_reactor(create_accounts, dsn, ("acme",))
    secret = tmp / "mint.secret"
    secret.write_text("browser-regions-secret\n")
    auth = ("--auth", f"db:dsn={dsn},secret-file={secret}")
    regions = tmp / "regions.toml"
    servers = []
    with DelayProxy(DELAY) as proxy, served_page(PAGE) as page_port:
        try:
            near = start_server(*auth, "--region", "near", users=(), state_dir=str(tmp / "near"))
            servers.append(near)
            regions.write_text(NEAR_ONLY.format(near=near))
            api_port = free_port()
            far = start_server(*auth, "--region", "far", "--regions-file", str(regions),
                               "--api-port", str(api_port), users=(), state_dir=str(tmp / "far"))
            servers.append(far)
            far.read_until("account database loaded")
            # The far region is reached through the delaying path: its entry in the regions file
            # names the proxy's ports, and wins over the relay's own listeners.
            far_port = proxy.forward(far.port)
            far_tls = proxy.forward(far.tls_port, udp=False)
            regions.write_text(NEAR_ONLY.format(near=near) + FAR.format(port=far_port,
                                                                       tls_port=far_tls))
            far.read_until("--regions-file changed: far ready, near ready")
            key = run_cli("browser-key", "add", "acme", "--origin", f"http://127.0.0.1:{page_port}",
                          "--name", "web", "--db", dsn).stdout.strip()
            yield Setup(near, far, f"http://127.0.0.1:{api_port}", key, page_port, far_port)
        finally:
            for server in servers:
                server.stop()


@pytest.fixture(scope="module")
def browser():
    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), headless=True,
                                             args=CHROMIUM_FLAGS)
        try:
            yield browser
        finally:
            browser.close()


def ports(ice_servers) -> list:
    """The port of each TURN/STUN URL, in order."""
    return [int(server["urls"].split(":")[2].split("?")[0]) for server in ice_servers]


def test_the_nearer_region_comes_first_measured_and_remembered(setup, browser) -> None:
    page = browser.new_page()
    page.goto(f"http://127.0.0.1:{setup.page_port}/")
    first = page.evaluate(CALL, [setup.api, setup.key, {}])
    assert "error" not in first, first
    # The API's order: the default region (the far relay's own), then the other.
    answer = first["answer"]
    assert [r["name"] for r in answer["regions"]] == ["far", "near"], answer
    assert answer["region_reason"] == "default" and answer["username"].endswith(":acme:web")
    # The browser's: measured, near first.
    assert (first["chosen"], first["cached"]) == ("near", False)
    times = {region["name"]: region["ms"] for region in first["regions"]}
    assert [region["name"] for region in first["regions"]] == ["near", "far"], first
    # An Allocate is two round trips (401, then with credentials): four delayed legs.
    assert times["far"] >= 4 * DELAY * 1000 - 5, times
    assert 0 < times["near"] < times["far"], times
    near_entries = len(answer["regions"][1]["ice_servers"])
    assert ports(first["iceServers"][:near_entries]) == \
        [setup.near.port] * 3 + [setup.near.tls_port]
    assert ports(first["iceServers"][near_entries:]) == [setup.far_port] * 3 + \
        [ports(answer["regions"][0]["ice_servers"])[3]]
    stored = json.loads(page.evaluate(
        "api => localStorage.getItem('turnrelay.ice.winner:' + api)", setup.api))
    assert (stored["region"], stored["ms"]) == ("near", times["near"])

    # The next page load uses the remembered winner without measuring.
    page.reload()
    second = page.evaluate(CALL, [setup.api, setup.key, {}])
    assert (second["chosen"], second["cached"]) == ("near", True), second
    assert second["regions"] == [{"name": "near", "ms": times["near"]},
                                 {"name": "far", "ms": None}]
    # A remembered winner holds until it expires, even when it is not the fastest; then the
    # regions are measured again.
    remember = "([api, entry]) => localStorage.setItem('turnrelay.ice.winner:' + api, " \
               "JSON.stringify({...entry, expires: Date.now() + entry.expires}))"
    page.evaluate(remember, [setup.api, {"region": "far", "ms": 1, "expires": 60_000}])
    pinned = page.evaluate(CALL, [setup.api, setup.key, {}])
    assert (pinned["chosen"], pinned["cached"]) == ("far", True), pinned
    page.evaluate(remember, [setup.api, {"region": "far", "ms": 1, "expires": -1}])
    expired = page.evaluate(CALL, [setup.api, setup.key, {}])
    assert (expired["chosen"], expired["cached"]) == ("near", False), expired
    assert expired["regions"][1]["ms"] >= 4 * DELAY * 1000 - 5, expired
    # The ICE servers relay: a relay-only peer connection through the chosen region gets a
    # relay candidate with this fresh credential, and the near relay logs its allocation.
    relayed = page.evaluate("""async ([api, servers]) => {
        const ice = await import(api + "/v1/ice.js");
        return await ice.timeToRelay(servers.slice(0, 2));
    }""", [setup.api, second["iceServers"]])
    assert relayed is not None and relayed > 0
    setup.near.read_until(f"allocation opened user={second['answer']['username']} ")
    page.close()


def test_a_region_that_gives_no_relay_candidate_comes_last(setup, browser) -> None:
    page = browser.new_page()
    page.goto(f"http://127.0.0.1:{setup.page_port}/")
    result = page.evaluate("""async ([api, port]) => {
        const ice = await import(api + "/v1/ice.js");
        const dead = [{urls: "turn:127.0.0.1:" + port + "?transport=udp", username: "u", credential: "p"}];
        const times = {dead: await ice.timeToRelay(dead, 1500), other: 12};
        return ice.orderByTime([{name: "dead"}, {name: "other"}], times).map(r => r.name)
                  .concat([String(times.dead)]);
    }""", [setup.api, free_port()])
    assert result == ["other", "dead", "null"]
    page.close()


def test_a_page_of_another_origin_cannot_use_the_key(setup, browser) -> None:
    page = browser.new_page()
    # Same server, another origin: localhost is not 127.0.0.1 to a browser.
    page.goto(f"http://localhost:{setup.page_port}/")
    refused = page.evaluate(CALL, [setup.api, setup.key, {"storage": None}])
    assert refused["error"].startswith(
        f"turnrelay: no answer from {setup.api} that this page may read (is the page's origin, "
        f"http://localhost:{setup.page_port}, one of the browser key's?)"), refused
    setup.far.read_until(f"used from origin 'http://localhost:{setup.page_port}', not one of "
                         "its own")
    page.close()
