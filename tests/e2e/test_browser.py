"""A real browser through turnrelay: headless Chromium (Debian's package, driven by Playwright,
no browser download) makes a relay-only WebRTC call between two peer connections of one page,
over turn:?transport=udp, ?transport=tcp and turns:, as a WebRTC app behind a strict NAT would.

The page is the self-test page (relay/web/test_page.html); the test calls its loopbackCall() and
checks, from the browser's getStats(), that both sides' selected pair is a relay candidate of
the expected relayProtocol, that every data-channel message arrived in order, and, from the
relay's own log, that turnrelay relayed at least those bytes each way.  One browser for all.
"""
import base64
import hashlib
import json
import os
import re
import subprocess
import sys
from importlib import resources

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from support.certs import make_cert
from support.chromium import CHROMIUM_FLAGS, chromium, served_page
from support.db import raw_rows
from support.delay_proxy import DelayProxy
from support.servers import PASSWORD, USER, free_port

MESSAGES, SIZE = 20, 1000
LEDGER_TOTALS = "SELECT SUM(bytes_from_client), SUM(bytes_to_client) FROM usage_deltas"
CLI = os.path.join(os.path.dirname(sys.executable), "turnrelay")


def spki_hash(cert_path) -> str:
    """base64(SHA-256(SubjectPublicKeyInfo)): what --ignore-certificate-errors-spki-list takes."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    return make_cert(tmp_path_factory.mktemp("cert"), "relay", san="IP:127.0.0.1")


@pytest.fixture(scope="module")
def page_url():
    """The self-test page, served on 127.0.0.1 by a plain HTTP server of the test's own."""
    with served_page(resources.files("relay.web").joinpath("test_page.html").read_bytes()) as port:
        yield f"http://127.0.0.1:{port}/test"


@pytest.fixture(scope="module")
def page(certificate, page_url):
    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    from playwright.sync_api import sync_playwright
    cert, _ = certificate
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium(), headless=True,
            args=CHROMIUM_FLAGS + [f"--ignore-certificate-errors-spki-list={spki_hash(cert)}"])
        try:
            page = browser.new_page()
            page.goto(page_url)
            yield page
        finally:
            browser.close()


def call(page, url, username=USER, password=PASSWORD, **options):
    return page.evaluate("([server, options]) => loopbackCall(server, options)",
                         [{"urls": url, "username": username, "credential": password}, options])


def relayed_bytes(log: str):
    """Payload bytes from and to clients over every allocation the relay closed."""
    counters = re.findall(r"allocation closed .* from_client=\d+/(\d+)B to_client=\d+/(\d+)B", log)
    return sum(int(f) for f, _ in counters), sum(int(t) for _, t in counters)


@pytest.mark.parametrize("scheme, transport", [("turn", "udp"), ("turn", "tcp"), ("turns", "tls")])
def test_a_relay_only_call_over_each_transport(page, server_factory, certificate, tmp_path,
                                                scheme, transport):
    cert, key = certificate
    server = server_factory("--cert", str(cert), "--pkey", str(key))
    port = server.tls_port if scheme == "turns" else server.port
    result = call(page, f"{scheme}:127.0.0.1:{port}?transport={'udp' if transport == 'udp' else 'tcp'}",
                  messages=MESSAGES, size=SIZE)
    assert result["connected"], result
    assert (result["sent"], result["received"], result["inOrder"]) == (MESSAGES, MESSAGES, True)
    for pair in result["pairs"]:
        assert (pair["localType"], pair["remoteType"], pair["relayProtocol"]) == \
            ("relay", "relay", transport), result
        assert pair["localAddress"].startswith("127.0.0.1:")
    assert result["rttMs"] > 0 and result["bytesRelayed"] >= MESSAGES * SIZE
    log = server.stop()
    assert f"transport={transport} relay=127.0.0.1:" in log
    # The relay counts what the browsers sent it, ICE checks included, and kept counting after
    # getStats(): at least every byte both sides' selected pairs sent and received.
    from_clients, to_clients = relayed_bytes(log)
    assert from_clients >= sum(pair["bytesSent"] for pair in result["pairs"]) > MESSAGES * SIZE
    assert to_clients >= sum(pair["bytesReceived"] for pair in result["pairs"]) > MESSAGES * SIZE
    # The usage ledger (the default one, SQLite in --state-dir) has the same counts.
    ledger = raw_rows(f"sqlite:///{tmp_path / 'state' / 'usage.db'}", LEDGER_TOTALS)
    assert ledger == [(from_clients, to_clients)], log


def test_a_wrong_password_is_the_browsers_401(page, server_factory):
    server = server_factory(tls=False)
    result = call(page, f"turn:127.0.0.1:{server.port}?transport=udp", password="wrong")
    assert not result["connected"]
    assert 401 in [error["errorCode"] for error in result["errors"]], result


def test_an_unreachable_server_is_the_browsers_701(page):
    result = call(page, f"turn:127.0.0.1:{free_port()}?transport=tcp")
    assert not result["connected"]
    assert 701 in [error["errorCode"] for error in result["errors"]], result


# The self-test page at /test on the API port: the visitor's view, through the form.

@pytest.fixture
def api_relay(server_factory, tmp_path, certificate):
    """start(*extra, **kwargs) -> (relay with --api-port and account `acme`, API port,
    acme's key)."""
    def start(*extra, **kwargs):
        dsn = f"sqlite:///{tmp_path / 'accounts.db'}"
        added = subprocess.run([CLI, "account", "add", "acme", "--db", dsn], capture_output=True,
                               text=True, timeout=60, check=True)
        secret = tmp_path / "rest.secret"
        secret.write_text("self-test-secret\n")
        cert, key = certificate
        port = free_port()
        server = server_factory("--auth", f"db:dsn={dsn},secret-file={secret}", "--api-port",
                                str(port), "--cert", str(cert), "--pkey", str(key), *extra,
                                **kwargs)
        server.read_until(f"tokens API listening on http [127.0.0.1]:{port}")
        server.read_until("account database loaded")
        return server, port, added.stdout.strip()
    return start


def run_form(page, port, **fields):
    """Open /test, fill in `fields` (element id -> text), run, and wait for the outcome."""
    response = page.goto(f"http://127.0.0.1:{port}/test")
    assert response.status == 200
    for element, text in fields.items():
        page.fill(f"#{element}", text)
    page.click("#run")
    page.wait_for_selector("body[data-done]", timeout=60_000)
    return response


def table_rows(page):
    return page.eval_on_selector_all("#results tbody tr", """rows => rows.map(row => ({
        transport: row.dataset.transport, ok: row.dataset.ok === "true",
        cells: [...row.cells].map(cell => cell.textContent)}))""")


def test_the_self_test_page_mints_and_connects_over_every_transport(page, api_relay, tmp_path):
    server, port, key = api_relay()
    response = run_form(page, port, account="acme", apikey=key)
    # The page ran under its own policy: nothing but its inline code and this origin.
    policy = response.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    page.screenshot(path=str(tmp_path / "self-test.png"), full_page=True)
    rows = table_rows(page)
    assert [row["transport"] for row in rows] == ["udp", "tcp", "tls"], rows
    for row in rows:
        transport, result, connect, rtt, relayed, cause = row["cells"]
        assert transport.startswith(row["transport"].upper() + "turn"), row  # then its URL
        assert row["ok"] and result == "connected" and cause == "", row
        assert re.fullmatch(r"[\d.]+ ms", connect) and re.fullmatch(r"[\d.]+ ms", rtt), row
        assert int(relayed.replace(",", "").removesuffix(" B")) > 20 * 1000, row
    assert page.text_content("#status") == "Done."
    assert len(re.findall(r"allocation opened user=\d+:acme:self-test ", server.stop())) == 6


def test_the_self_test_page_times_every_region_and_names_the_choice(page, api_relay, tmp_path):
    """Two regions: this relay, and the same relay behind a path delaying each direction
    100 ms (support.delay_proxy), named first by the API (its pin).  The page times both,
    chooses the near one, then relays a call over every transport of both."""
    regions = tmp_path / "regions.toml"
    regions.write_text('[regions.far]\nhost = "127.0.0.1"\n')
    server, port, key = api_relay("--regions-file", str(regions))
    with DelayProxy(0.1) as proxy:
        regions.write_text(f'[regions.far]\nhost = "127.0.0.1"\nport = {proxy.forward(server.port)}'
                           f'\ntls-port = {proxy.forward(server.tls_port, udp=False)}\n')
        server.read_until("--regions-file changed: default ready, far ready")
        run_form(page, port, account="acme", apikey=key)
        regions_table = page.eval_on_selector_all("#regions tbody tr", """rows => rows.map(row => (
            {region: row.dataset.region, ms: Number(row.dataset.ms), chosen: row.dataset.chosen,
             cells: [...row.cells].map(cell => cell.textContent)}))""")
        page.screenshot(path=str(tmp_path / "self-test-regions.png"), full_page=True)
    # The API's order (no GeoIP: the relay's own region, then the other), each timed.
    assert [(row["region"], row["chosen"]) for row in regions_table] == \
        [("default", "true"), ("far", "false")], regions_table
    near, far = regions_table
    assert far["ms"] >= 4 * 100 - 5 and 0 < near["ms"] < far["ms"], regions_table
    # The page shows whole milliseconds; JavaScript rounds a half up, Python's format to even.
    assert near["cells"][2:] == ["chosen"] and far["cells"][2:] == [""], regions_table
    for row in (near, far):
        shown, unit = row["cells"][1].split()
        assert unit == "ms" and abs(int(shown) - row["ms"]) <= 0.5, row
    rows = table_rows(page)
    assert [row["transport"] for row in rows] == ["udp", "tcp", "tls"] * 2, rows
    assert all(row["ok"] for row in rows), rows


def test_the_self_test_page_names_the_likely_causes(page, api_relay, server_factory, tmp_path):
    # The page's call relays between two allocations of this relay, which is allowed on any
    # address unless a rule denies it: an operator's --denied-peer-ip does.
    relay, port, key = api_relay("--denied-peer-ip", "127.0.0.1", loopback_peers=False)
    run_form(page, port, account="acme", apikey="not-the-key")
    assert page.text_content("#status") == "The tokens API refused: wrong account id or API key"
    untrusted = server_factory(udp=False, tcp=False)  # a self-signed certificate of its own
    urls = [f"turn:127.0.0.1:{relay.port}?transport=udp",
            f"turn:127.0.0.1:{free_port()}?transport=tcp",
            f"turn:127.0.0.1:{free_port()}?transport=udp",
            f"turns:127.0.0.1:{untrusted.tls_port}?transport=tcp"]
    run_form(page, port, account="", apikey="", urls="\n".join(urls),
             credential=json.dumps({"username": USER, "password": PASSWORD}))
    page.screenshot(path=str(tmp_path / "self-test-failures.png"), full_page=True)
    rows = table_rows(page)
    assert [(row["transport"], row["ok"]) for row in rows] == [
        ("udp", False), ("tcp", False), ("udp", False), ("tls", False)], rows
    causes = [row["cells"][5] for row in rows]
    assert causes[0].startswith("Peer address forbidden: the relay got both candidates")
    assert causes[1:] == [
        "TCP blocked: cannot reach the relay's TCP port.",
        "UDP blocked: no answer from the relay over UDP (a firewall drops it?).",
        "TLS certificate rejected, or the TLS port is blocked: no relay candidate over TLS."]
    run_form(page, port, urls=urls[0], credential=json.dumps({"username": USER, "password": "no"}))
    assert [row["cells"][5] for row in table_rows(page)] == [
        "Credentials refused: wrong or expired username and password."]


def test_one_tls_port_serves_turns_to_the_browser_and_https_to_curl(page, api_relay,
                                                                    certificate):
    """--api-on-tls-port, with workers: curl mints a token over HTTPS on the TLS port, and the
    browser's turns: (no ALPN) relays a call through the same port with it."""
    server, _, key = api_relay("--api-on-tls-port", "--workers", "2")
    cert, _ = certificate
    minted = subprocess.run(
        ["curl", "-sS", "--fail", "--max-time", "20", "--cacert", str(cert), "-u", f"acme:{key}",
         "-X", "POST", f"https://127.0.0.1:{server.tls_port}/v1/accounts/acme/tokens"],
        capture_output=True, text=True, timeout=30)
    assert minted.returncode == 0, minted.stderr
    token = json.loads(minted.stdout)
    [turns] = [entry for entry in token["ice_servers"] if entry["urls"].startswith("turns:")]
    assert turns["urls"] == f"turns:127.0.0.1:{server.tls_port}?transport=tcp"
    result = call(page, turns["urls"], token["username"], token["password"],
                  messages=MESSAGES, size=SIZE)
    assert result["connected"], result
    assert (result["sent"], result["received"], result["inOrder"]) == (MESSAGES, MESSAGES, True)
    for pair in result["pairs"]:
        assert (pair["localType"], pair["relayProtocol"]) == ("relay", "tls"), result
    assert re.search(r"allocation opened user=\d+:acme\S* .*transport=tls", server.stop())
