"""One port for TURN and the tokens API (--api-on-tls-port, --api-on-tcp-port), with workers.

On the TLS port: a client offering ALPN `stun.turn` and one offering nothing both get TURN
allocations, coturn's `turnutils_uclient -t -S` relays through it, and HTTPS (curl, which
offers h2 and http/1.1) mints a token whose ice_servers name that port.  On the plain TCP
port: TURN and plain HTTP side by side.  The HTTP side is the parent's API, reached from
every worker.  (Chromium's `turns:` on the shared port is in test_browser.py.)
"""
from __future__ import annotations

import base64
import json
import os
import re
import socket
import ssl
import subprocess
import sys
from typing import List, Optional

import pytest

from relay.cli.turnclient import TCP, TLS, TurnClient, error_code
from relay.proto import stun
from relay.proto.proxy_protocol import encode_v2
from relay.service.options import Options
from relay.web.api import FAILED_KEY_BURST
from support.certs import make_cert
from support.servers import PASSWORD, USER, free_port, running_echo_peer, tool

CLI = os.path.join(os.path.dirname(sys.executable), "turnrelay")
MESSAGES, CLIENTS = 20, 2


def start(server_factory, tmp_path, *extra):
    """A relay with 2 workers, the account database (account `acme`) and the tokens API, plus
    `extra`: (server, acme's API key, certificate path).  Its --api-port is `server.api_port`."""
    cert, key = make_cert(tmp_path, "relay", san="IP:127.0.0.1")
    dsn = f"sqlite:///{tmp_path / 'accounts.db'}"
    added = subprocess.run([CLI, "account", "add", "acme", "--db", dsn], capture_output=True,
                           text=True, timeout=60, check=True)
    secret = tmp_path / "mint.secret"
    secret.write_text("shared-port-secret\n")
    api_port = free_port()
    server = server_factory("--workers", "2", "--auth", f"db:dsn={dsn},secret-file={secret}",
                            "--api-port", str(api_port), "--cert", str(cert), "--pkey",
                            str(key), "--rfc5766-channels", *extra)
    server.read_until("account database loaded")
    server.api_port = api_port
    return server, added.stdout.strip(), cert


def tls_client(port: int, alpn: Optional[List[str]]) -> TurnClient:
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    if alpn is not None:
        context.set_alpn_protocols(alpn)
    return TurnClient.connect(TLS, ("127.0.0.1", port), USER, PASSWORD, context=context,
                              timeout=10)


def curl(*args: str) -> str:
    result = subprocess.run([tool("curl"), "-sS", "--fail", "--max-time", "20", *args],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_one_tls_port_serves_turn_by_alpn_or_first_bytes_and_https(server_factory, tmp_path):
    server, key, cert = start(server_factory, tmp_path, "--api-on-tls-port")
    port = server.tls_port
    for alpn, chosen in ((["stun.turn"], "stun.turn"), (["h2", "stun.turn"], "stun.turn"),
                         (["http/1.1", "stun.nat-discovery"], "stun.nat-discovery"),
                         (None, None), (["http/1.1"], "http/1.1")):
        turn = tls_client(port, alpn)
        assert turn.sock.selected_alpn_protocol() == chosen
        reply = turn.request(stun.ALLOCATE, (stun.REQUESTED_TRANSPORT, 17))
        assert error_code(reply) is None, (alpn, reply)
        turn.close()
    # HTTPS on the same port, curl verifying the relay's certificate: a token whose turns:
    # URL is this very port, and the API's other pages.
    minted = json.loads(curl("--cacert", str(cert), "-u", f"acme:{key}", "-X", "POST",
                             f"https://127.0.0.1:{port}/v1/accounts/acme/tokens"))
    urls = [server["urls"] for server in minted["ice_servers"]]
    assert f"turns:127.0.0.1:{port}?transport=tcp" in urls, urls
    assert curl("--cacert", str(cert), f"https://127.0.0.1:{port}/readyz").strip() == "ok"
    assert "turnrelay_" in curl("--cacert", str(cert), f"https://127.0.0.1:{port}/metrics")
    # A minted credential works on the port that minted it.
    turn = TurnClient.connect(TLS, ("127.0.0.1", port), minted["username"], minted["password"],
                              context=ssl._create_unverified_context(), timeout=10)
    assert error_code(turn.request(stun.ALLOCATE, (stun.REQUESTED_TRANSPORT, 17))) is None
    turn.close()
    # coturn's client over TLS on the shared port (it offers ALPN stun.turn among others);
    # -c: no RTCP allocation, whose RESERVATION-TOKEN may reach another worker than the one
    # holding the reservation (508).
    with running_echo_peer() as peer:
        result = subprocess.run(
            [tool("turnutils_uclient"), "-t", "-S", "-c", "-p", str(port), "-u", USER, "-w", PASSWORD,
             "-e", peer[0], "-r", str(peer[1]), "-n", str(MESSAGES), "-m", str(CLIENTS),
             "127.0.0.1"], capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    expected = MESSAGES * CLIENTS
    assert f"tot_send_msgs={expected}, tot_recv_msgs={expected}" in output, output
    assert "Total lost packets 0 (" in output, output
    log = server.stop()
    assert len(re.findall(r"allocation opened user=alice .*transport=tls", log)) >= 4, log


def test_plain_tcp_port_serves_turn_and_http(server_factory, tmp_path):
    server, _, _ = start(server_factory, tmp_path, "--api-on-tcp-port")
    turn = TurnClient.connect(TCP, ("127.0.0.1", server.port), USER, PASSWORD, timeout=10)
    assert error_code(turn.request(stun.ALLOCATE, (stun.REQUESTED_TRANSPORT, 17))) is None
    turn.close()
    assert curl(f"http://127.0.0.1:{server.port}/healthz").strip() == "ok"
    # The TLS port, not asked to, serves no HTTP: the request line goes to TURN's framing,
    # which closes the connection.
    result = subprocess.run([tool("curl"), "-sS", "-k", "--max-time", "10",
                             f"https://127.0.0.1:{server.tls_port}/healthz"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0 and "ok" not in result.stdout


def mint_status(port: int, client: str, key: str, tls: bool) -> int:
    """The status of a mint over a connection from 127.0.0.1 that a balancer's PROXY v2
    header says is `client`'s."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(encode_v2((client, 40000), ("127.0.0.1", port)))
    if tls:
        sock = ssl._create_unverified_context().wrap_socket(sock)
    auth = base64.b64encode(f"acme:{key}".encode()).decode()
    with sock:
        sock.sendall(f"POST /v1/accounts/acme/tokens HTTP/1.1\r\nHost: relay\r\n"
                     f"Authorization: Basic {auth}\r\nContent-Length: 0\r\n"
                     f"Connection: close\r\n\r\n".encode())
        return int(sock.recv(100).split()[1])


def test_the_api_sees_each_client_behind_a_balancer_and_through_the_turn_port(
        server_factory, tmp_path):
    """Failed API keys are throttled per client address: what the balancer's PROXY header
    says, on the API port and on the TLS port, where a worker passes it on to the parent's
    API.  Were either address lost, the second client would be throttled with the first."""
    server, key, _ = start(server_factory, tmp_path, "--api-on-tls-port", "--proxy-protocol-from",
                           "127.0.0.1", "--api-key-failures-per-minute", "1")
    for port, tls, (guesser, other) in ((server.tls_port, True, ("203.0.113.7", "203.0.113.8")),
                                        (server.api_port, False, ("198.51.100.7", "198.51.100.8"))):
        statuses = [mint_status(port, guesser, "guessed", tls) for _ in range(FAILED_KEY_BURST + 1)]
        assert statuses == [401] * FAILED_KEY_BURST + [429], (port, statuses)
        assert mint_status(port, guesser, key, tls) == 429
        assert mint_status(port, other, key, tls) == 201


@pytest.mark.parametrize("argv, problem", [
    (["--api-on-tls-port"], "--api-on-tls-port: needs --api-port"),
    (["--api-on-tcp-port", "--api-port", "8080", "--api-db", "sqlite:///x.db",
      "--api-secret-file", "/dev/null"], "--api-on-tcp-port: API keys must not cross"),
])
def test_bad_shared_port_options_name_the_option(argv, problem):
    with pytest.raises(SystemExit, match=problem):
        Options().parseOptions(argv)
