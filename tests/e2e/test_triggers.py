"""Usage triggers on real relays: registered through the tokens API, fired once across two
relays sharing a PostgreSQL account database and ledger (a failed delivery retried, with the
same idempotency token), to a real HTTP server on loopback, which the tests allow explicitly
(`--allow-loopback-peers` or `--allowed-peer-ip`); refused by default for loopback, private
and metadata addresses, named or resolved, at registration and again at delivery.
"""
import base64
import contextlib
import json
import queue
import re
import sqlite3
import ssl
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator, List, Optional, Tuple

from relay.proto import stun
from relay.storage.accounts import AccountStore
from support.certs import make_cert
from support.cli import cli
from support.postgres import fresh_schema
from support.relay_clients import UDP, relay_through
from support.servers import REALM, free_port, running_echo_peer
from support.wire_client import WireClient


@contextlib.contextmanager
def callback_server(host: str, answers: List[int],
                    tls: Optional[ssl.SSLContext] = None) -> Iterator[Tuple[str, queue.Queue]]:
    """An HTTP server (HTTPS with `tls`) recording each POST (path, content type, JSON body)
    and answering the next status of `answers` (204 once they run out)."""
    received: queue.Queue = queue.Queue()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            received.put((self.path, self.headers["content-type"], body))
            self.send_response(answers.pop(0) if answers else 204)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer((host, free_port(host)), Handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"{'https' if tls else 'http'}://{host}:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()


def api_call(api, method, path, key, body=None):
    """(status, JSON answer or None) of a tokens API request as account acme."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{api}{path}", method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"authorization": "Basic " + base64.b64encode(f"acme:{key}".encode()).decode(),
                 "content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            data = answer.read()
            return answer.status, json.loads(data) if data else None
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


TRIGGERS = "/v1/accounts/acme/triggers"


def credential(secret):
    return json.loads(cli("token", "--account", "acme", "--secret-file", str(secret)))


def test_a_trigger_fires_once_across_relays_and_a_failed_delivery_is_retried(
        postgres_dsn, server_factory, tmp_path):
    dsn = fresh_schema(postgres_dsn)
    secret = tmp_path / "rest.secret"
    secret.write_text("shared-rest-secret-1\n")
    key = cli("account", "add", "acme", "--db", dsn).strip()
    api = free_port()
    common = ("--auth", f"db:dsn={dsn},secret-file={secret}", "--accounting",
              f"postgresql:dsn={dsn}", "--accounting-interval", "1")
    # start_server passes --allow-loopback-peers: this test's explicit allowance of loopback.
    relays = [server_factory(*common, "--api-port", str(api), users=(), tls=False),
              server_factory(*common, users=(), tls=False)]
    for relay in relays:
        relay.read_until("account database loaded")
    with callback_server("127.0.0.1", [503]) as (base, received):
        url = f"{base}/hooks/usage?token=hook-secret-1"
        status, trigger = api_call(api, "POST", TRIGGERS, key, {
            "callback_url": url, "trigger_value": "0.01", "friendly_name": "ten kB"})
        assert status == 201, trigger
        sid = trigger["sid"]
        assert re.fullmatch(r"UT[0-9a-f]{32}", sid)
        assert (trigger["trigger_value"], trigger["callback_url"], trigger["recurring"],
                trigger["date_fired"], trigger["uri"]) == ("0.01", url, "monthly", None,
                                                           f"{TRIGGERS}/{sid}")
        assert api_call(api, "GET", TRIGGERS, key) == (200, {"triggers": [trigger]})

        # 6000 bytes through each relay: neither alone reaches 10 000, the fleet does.
        clients = []
        with running_echo_peer() as peer:
            for relay in relays:
                token = credential(secret)
                client = WireClient((relay.host, relay.port), token["username"],
                                    token["password"], REALM)
                assert client.request(stun.ALLOCATE, UDP).cls == stun.SUCCESS
                relay_through(client, peer, 3)
                clients.append(client)
            path, content_type, first = received.get(timeout=20)
            assert (path, content_type) == ("/hooks/usage?token=hook-secret-1",
                                            "application/json")
            assert first["account"] == "acme" and first["trigger_sid"] == sid
            assert first["threshold_bytes"] == 10_000 and first["current_bytes"] >= 10_000
            assert first["trigger_value"] == "0.01"
            assert first["period"] == time.strftime("%Y-%m", time.gmtime())
            assert first["idempotency_token"] == f"{sid}-{first['period']}"
            # The 503 is retried after a second, with the same notice.
            _, _, second = received.get(timeout=10)
            assert second == first
            # More usage, and two polls of every relay later, nothing more was sent.
            relay_through(clients[1], peer, 2)
            time.sleep(5)
            assert received.empty()
    status, shown = api_call(api, "GET", f"{TRIGGERS}/{sid}", key)
    assert status == 200 and shown["date_fired"] is not None
    logs = "".join(relay.stop() for relay in relays)
    assert len(re.findall(rf"usage trigger {sid} of account acme fired", logs)) == 1
    assert len(re.findall(rf"usage trigger {sid} notice not delivered: HTTP 503; retrying in 1 s",
                          logs)) == 1
    assert len(re.findall(rf"usage trigger {sid} notice delivered \(HTTP 204\)", logs)) == 1
    assert "hook-secret-1" not in logs
    for client in clients:
        client.close()


def lone_relay(sqlite_dsn, server_factory, tmp_path):
    """(relay, API port, acme's API key, secret file): one relay with an SQLite account
    database, on which loopback is forbidden but for 127.0.0.2, the peer `spend` relays to
    and an allowed callback host."""
    secret = tmp_path / "rest.secret"
    secret.write_text("shared-rest-secret-1\n")
    key = cli("account", "add", "acme", "--db", sqlite_dsn).strip()
    api = free_port()
    relay = server_factory("--auth", f"db:dsn={sqlite_dsn},secret-file={secret}",
                           "--accounting-interval", "1", "--api-port", str(api),
                           "--allowed-peer-ip", "127.0.0.2", users=(), tls=False,
                           loopback_peers=False)
    relay.read_until("account database loaded")
    return relay, api, key, secret


def spend(relay, secret, size):
    """An allocation of acme that has sent `size` bytes (in 500-byte datagrams) to 127.0.0.2."""
    token = credential(secret)
    client = WireClient((relay.host, relay.port), token["username"], token["password"], REALM)
    assert client.request(stun.ALLOCATE, UDP).cls == stun.SUCCESS
    peer = ("127.0.0.2", 9)
    assert client.request(stun.CREATE_PERMISSION, (stun.XOR_PEER_ADDRESS, peer)).cls == stun.SUCCESS
    for _ in range(size // 500):
        client.send_indication(peer, b"s" * 500)
    return client


def test_forbidden_callbacks_are_refused_at_registration_and_at_delivery(
        sqlite_dsn, server_factory, tmp_path, in_reactor):
    relay, api, key, secret = lone_relay(sqlite_dsn, server_factory, tmp_path)
    with callback_server("127.0.0.1", []) as (base, received):
        port = base.rpartition(":")[2]
        for url, problem in [
                (f"http://127.0.0.1:{port}/", "127.0.0.1 is a forbidden address"),
                (f"http://localhost:{port}/", "localhost resolves to a forbidden address"),
                ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is a forbidden"),
                ("https://10.1.2.3/hook", "10.1.2.3 is a forbidden address"),
                ("http://[::ffff:192.168.0.1]/", "::ffff:192.168.0.1 is a forbidden address"),
                ("ftp://example.org/hook", "expected an http:// or https:// URL"),
                ("http://user:pw@example.org/", "credentials in the URL")]:
            status, answer = api_call(api, "POST", TRIGGERS, key,
                                      {"callback_url": url, "trigger_value": "1"})
            assert (status, answer["code"]) == (400, 400), url
            assert answer["message"].startswith("callback_url: ") and problem in answer["message"]
        for body, field in [({"callback_url": f"http://127.0.0.2:{port}/"}, "trigger_value"),
                            ({"callback_url": f"http://127.0.0.2:{port}/", "trigger_value": "0"},
                             "trigger_value"), ({"trigger_value": "1"}, "callback_url"),
                            ({"callback_url": f"http://127.0.0.2:{port}/", "trigger_value": "1",
                              "recurring": "daily"}, "recurring")]:
            status, answer = api_call(api, "POST", TRIGGERS, key, body)
            assert status == 400 and answer["message"].startswith(field + ": "), answer
        # The allow rule that lets the relay reach 127.0.0.2 lets a callback go there too.
        status, allowed = api_call(api, "POST", TRIGGERS, key, {
            "callback_url": f"http://127.0.0.2:{port}/", "trigger_value": "100"})
        assert status == 201, allowed
        assert api_call(api, "DELETE", f"{TRIGGERS}/{allowed['sid']}", key) == (204, None)
        assert api_call(api, "GET", f"{TRIGGERS}/{allowed['sid']}", key)[0] == 404
        assert api_call(api, "GET", TRIGGERS, key) == (200, {"triggers": []})

        # A host that resolved to an allowed address when registered and now resolves to
        # loopback (DNS rebinding) is refused at delivery: written here as the API would have.
        store = in_reactor(AccountStore.from_dsn, sqlite_dsn)
        rebound = in_reactor(store.add_trigger, "acme", 1000, f"http://localhost:{port}/")
        in_reactor(store.close)
        client = spend(relay, secret, 1500)
        relay.read_until(f"usage trigger {rebound.trigger_id} of account acme fired", timeout=15)
        relay.search(rf"usage trigger {rebound.trigger_id} notice not delivered: localhost "
                     r"resolves to a forbidden address \((127\.0\.0\.1|::1)\); retrying in 1 s",
                     timeout=15)
        assert received.empty()
        client.close()


def test_https_callbacks_verify_the_certificate_of_the_host_in_the_url(
        sqlite_dsn, server_factory, tmp_path, monkeypatch):
    """The connection is pinned to the checked address, yet TLS still verifies the URL's host:
    a certificate the relay trusts (here through SSL_CERT_FILE) is delivered to, another not."""
    trusted = make_cert(tmp_path, "hook", san="IP:127.0.0.2")
    untrusted = make_cert(tmp_path, "other", san="IP:127.0.0.2")
    monkeypatch.setenv("SSL_CERT_FILE", str(trusted[0]))
    relay, api, key, secret = lone_relay(sqlite_dsn, server_factory, tmp_path)
    contexts = []
    for cert, private_key in (trusted, untrusted):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, private_key)
        contexts.append(context)
    with callback_server("127.0.0.2", [], contexts[0]) as (good, delivered), \
            callback_server("127.0.0.2", [], contexts[1]) as (bad, refused):
        sids = []
        for url in (good + "/hook", bad + "/hook"):
            status, trigger = api_call(api, "POST", TRIGGERS, key,
                                       {"callback_url": url, "trigger_value": "0.001"})
            assert status == 201, trigger
            sids.append(trigger["sid"])
        client = spend(relay, secret, 1500)
        path, _, notice = delivered.get(timeout=15)
        assert path == "/hook" and notice["trigger_sid"] == sids[0]
        relay.search(rf"usage trigger {sids[1]} notice not delivered: .*certificate verify "
                     r"failed.*; retrying in 1 s", timeout=15)
        assert refused.empty()
        client.close()


def test_a_firing_claimed_long_ago_and_never_delivered_is_taken_over(
        sqlite_dsn, server_factory, tmp_path, in_reactor):
    """A relay that claimed a firing and stopped (or gave up) leaves its row undelivered: after
    10 minutes another relay claims it again and delivers; a recent claim is left alone."""
    relay, api, key, secret = lone_relay(sqlite_dsn, server_factory, tmp_path)
    with callback_server("127.0.0.2", []) as (base, received):
        store = in_reactor(AccountStore.from_dsn, sqlite_dsn)
        stale = in_reactor(store.add_trigger, "acme", 1000, base + "/stale")
        recent = in_reactor(store.add_trigger, "acme", 1000, base + "/recent")
        in_reactor(store.close)
        period, now = time.strftime("%Y-%m", time.gmtime()), int(time.time())
        with contextlib.closing(sqlite3.connect(sqlite_dsn[len("sqlite://"):])) as db, db:
            db.executemany("INSERT INTO trigger_firings (trigger_id, period, usage_bytes,"
                           " fired_at) VALUES (?, ?, ?, ?)",
                           [(stale.trigger_id, period, 1000, now - 700),
                            (recent.trigger_id, period, 1000, now - 60)])
        client = spend(relay, secret, 1500)
        path, _, notice = received.get(timeout=15)
        assert path == "/stale" and notice["trigger_sid"] == stale.trigger_id
        relay.read_until(f"usage trigger {stale.trigger_id} notice delivered", timeout=10)
        time.sleep(3)  # one poll more: the recent claim stays its relay's
        assert received.empty()
        client.close()
    assert f"usage trigger {recent.trigger_id}" not in relay.stop()
