"""`turnrelay probe` against a real turnrelay (and coturn's turnserver): a working server passes
on UDP, TCP and TLS with the bytes it relayed in the server's own counters; each kind of failure
is one line naming the transport, the step and the likely cause, with a non-zero exit."""
import json
import os
import re
import subprocess
import sys

import pytest

from support.certs import make_cert
from support.db import create_accounts
from support.delay_proxy import DelayProxy
from support.servers import PASSWORD, USER, free_port, tool

CLI = os.path.join(os.path.dirname(sys.executable), "turnrelay")
COUNT, SIZE = 10, 100
SECRET = "probe-shared-secret"


def probe(*args, timeout=60):
    return subprocess.run([CLI, "probe", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def trusted_server(server_factory, tmp_path):
    """A relay whose TLS certificate is valid for 127.0.0.1 to a client trusting `cert`."""
    cert, key = make_cert(tmp_path, "relay", san="IP:127.0.0.1")
    server = server_factory("--cert", str(cert), "--pkey", str(key))
    return server, cert


def rows(output):
    """The table's rows by transport, each a list of its cells."""
    return {line.split()[0]: line.split() for line in output.splitlines()[1:]
            if line.split() and line.split()[0] in ("UDP", "TCP", "TLS")}


def test_probe_relays_over_udp_tcp_and_tls(trusted_server):
    server, cert = trusted_server
    result = probe(f"turn:127.0.0.1:{server.port}", "--tls-port", str(server.tls_port),
                   "--user", USER, "--password", PASSWORD, "--ca", str(cert),
                   "--count", str(COUNT), "--size", str(SIZE))
    assert result.returncode == 0, result.stdout + result.stderr
    table = rows(result.stdout)
    assert sorted(table) == ["TCP", "TLS", "UDP"], result.stdout
    for transport, port in (("UDP", server.port), ("TCP", server.port), ("TLS", server.tls_port)):
        _, address, status, reflexive, relayed, binding, rtt, loss = table[transport]
        assert (address, status, loss) == (f"127.0.0.1:{port}", "ok", f"0/{COUNT}")
        assert reflexive.startswith("127.0.0.1:") and float(binding) > 0
        assert re.fullmatch(r"127\.0\.0\.1:6[1-5]\d{3}", relayed), relayed
        p50, p99 = map(float, rtt.split("/"))
        assert 0 < p50 <= p99
    log = server.stop()
    # Two allocations per transport, each sent COUNT packets and was sent COUNT back.
    counted = f"from_client={COUNT}/{COUNT * SIZE}B to_client={COUNT}/{COUNT * SIZE}B"
    for transport in ("udp", "tcp", "tls"):
        assert log.count(f"transport={transport} relay=127.0.0.1:") == 2, log
    closed = [line for line in log.splitlines() if "allocation closed" in line]
    assert len(closed) == 6 and all(counted in line for line in closed), log


def test_json_and_rest_credentials(server_factory):
    server = server_factory("--use-auth-secret", "--static-auth-secret", SECRET, users=(),
                            tls=False)
    result = probe(f"turn:127.0.0.1:{server.port}?transport=tcp", "--account", "acme",
                   "--secret", SECRET, "--count", "3", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    [report] = json.loads(result.stdout)
    assert (report["transport"], report["ok"], report["sent"], report["lost"]) == ("tcp", True, 3, 0)
    assert report["rtt_p50_ms"] > 0 and len(report["relayed"]) == 2
    assert len(re.findall(r"allocation opened user=\d+:acme:probe account=acme ", server.stop())) == 2


def test_a_wrong_password_is_refused_on_every_transport(server_factory):
    server = server_factory()
    result = probe(f"turn:127.0.0.1:{server.port}", "--tls-port", str(server.tls_port),
                   "--insecure", "--user", USER, "--password", "not-the-password")
    assert result.returncode == 1, result.stdout
    for transport in ("UDP", "TCP", "TLS"):
        assert rows(result.stdout)[transport][2:4] == ["FAILED", "at"]
        assert (f"{transport}: credentials refused (401): wrong user or password, or an "
                "expired credential") in result.stdout.splitlines(), result.stdout


def test_a_closed_udp_port_fails_fast_with_a_reason():
    port = free_port()
    result = probe(f"turn:127.0.0.1:{port}?transport=udp", "--user", USER, "--password",
                   PASSWORD, "--timeout", "0.5", timeout=20)
    assert result.returncode == 1
    assert rows(result.stdout)["UDP"][2:5] == ["FAILED", "at", "binding"]
    assert f"UDP: no response to Binding within 0.5 s: UDP {port} blocked?" in result.stdout


def test_an_untrusted_certificate_fails_unless_insecure(server_factory):
    server = server_factory()  # its self-signed certificate from --state-dir
    args = (f"turns:127.0.0.1:{server.tls_port}", "--user", USER, "--password", PASSWORD,
            "--count", "2")
    refused = probe(*args)
    assert refused.returncode == 1
    assert rows(refused.stdout)["TLS"][2:5] == ["FAILED", "at", "connect"]
    assert re.search(r"^TLS: certificate verify failed: self.signed certificate \(--ca FILE",
                     refused.stdout, re.M), refused.stdout
    accepted = probe(*args, "--insecure")
    assert accepted.returncode == 0, accepted.stdout
    assert rows(accepted.stdout)["TLS"][2] == "ok"


def test_a_forbidden_peer_is_named(server_factory):
    # The probe relays between two allocations of the relay, allowed on any address unless an
    # operator's rule denies it.
    server = server_factory("--denied-peer-ip", "127.0.0.1", loopback_peers=False)
    result = probe(f"turn:127.0.0.1:{server.port}?transport=udp", "--user", USER,
                   "--password", PASSWORD)
    assert result.returncode == 1
    assert rows(result.stdout)["UDP"][2:5] == ["FAILED", "at", "permission"]
    assert "UDP: peer address forbidden (403): the server will not relay to its own relayed " \
           "address 127.0.0.1:" in result.stdout


def test_bad_arguments_are_one_line(tmp_path):
    result = probe("turn:127.0.0.1:3478", "--user", USER)
    assert result.returncode == 2
    assert result.stderr.strip().endswith(
        "give --user and --password, or --account and --secret (or --secret-file)")
    result = probe("http://example.org", "--user", USER, "--password", PASSWORD)
    assert result.returncode == 2 and "expected turn:HOST" in result.stderr


def test_probe_against_coturn(tmp_path):
    """The probe is a client of TURN, not of turnrelay: coturn's server passes too."""
    port, tls_port = free_port(), free_port()
    cert, key = make_cert(tmp_path, "coturn", san="IP:127.0.0.1")
    process = subprocess.Popen(
        [tool("turnserver"), "-n", "--listening-ip", "127.0.0.1", "--relay-ip", "127.0.0.1",
         "--listening-port", str(port), "--tls-listening-port", str(tls_port), "--cert",
         str(cert), "--pkey", str(key), "--no-dtls", "--lt-cred-mech",
         "--user", f"{USER}:{PASSWORD}", "--realm", "coturn.test", "--allow-loopback-peers",
         "--no-cli", "--min-port", "61000", "--max-port", "65000", "--log-file", "stdout",
         "--pidfile", str(tmp_path / "turnserver.pid"), "--userdb", str(tmp_path / "turndb")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # coturn says so once its relay threads, which own the listeners, are up.
        assert any("Total General servers" in line for line in process.stdout)
        result = probe(f"turn:127.0.0.1:{port}", "--tls-port", str(tls_port), "--ca", str(cert),
                       "--user", USER, "--password", PASSWORD, "--count", "5")
        assert result.returncode == 0, result.stdout + result.stderr
        assert [rows(result.stdout)[t][2] for t in ("UDP", "TCP", "TLS")] == ["ok"] * 3
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_probe_through_a_given_echo_peer(server_factory, echo_peer):
    server = server_factory(tls=False)
    host, port = echo_peer
    result = probe(f"turn:127.0.0.1:{server.port}", "--transport", "udp,tcp", "--peer",
                   f"{host}:{port}", "--user", USER, "--password", PASSWORD, "--count", "5",
                   "--size", "50", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    reports = json.loads(result.stdout)
    assert [(r["transport"], r["ok"], len(r["relayed"]), r["lost"]) for r in reports] == [
        ("udp", True, 1, 0), ("tcp", True, 1, 0)]
    # One allocation per transport, each relaying 5 packets of 50 bytes there and back.
    assert server.stop().count("from_client=5/250B to_client=5/250B") == 2


def test_probe_over_ipv6_gets_ipv6_relayed_addresses(server_factory):
    """An IPv6-only relay answers the default (IPv4) Allocate with 440: the probe asks again."""
    server = server_factory(host="::1")
    result = probe(f"turn:[::1]:{server.port}", "--tls-port", str(server.tls_port), "--insecure",
                   "--user", USER, "--password", PASSWORD, "--count", "3")
    assert result.returncode == 0, result.stdout
    for transport in ("UDP", "TCP", "TLS"):
        _, address, status, reflexive, relayed, *_ = rows(result.stdout)[transport]
        assert status == "ok" and reflexive.startswith("[::1]:") and relayed.startswith("[::1]:")


# --regions: several regions side by side.  The far region is the same relay behind a path
# delaying each direction DELAY (support.delay_proxy): a relayed round trip crosses it four
# times (to the relay and back out, twice), the first relayed address takes three round trips
# (Binding, Allocate refused 401, Allocate).

DELAY = 0.1


def test_probe_regions_side_by_side_names_the_nearest(server_factory):
    server = server_factory(tls=False)
    with DelayProxy(DELAY) as proxy:
        far = proxy.forward(server.port)
        result = probe("--regions", f"far=turn:127.0.0.1:{far}",
                       f"near=turn:127.0.0.1:{server.port}", "--user", USER,
                       "--password", PASSWORD, "--count", "5", "--transport", "udp,tcp")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["REGION", "TRANSPORT", "SERVER", "RESULT", "TO", "RELAYED", "ms",
                                "RTT", "p50/p99", "ms", "LOSS"]
    table = {(row[0], row[1]): row for row in map(str.split, lines[1:5])}
    assert sorted(table) == [("far", "TCP"), ("far", "UDP"), ("near", "TCP"), ("near", "UDP")]
    for (region, _), (_, _, address, status, relayed_ms, rtt, loss) in table.items():
        port = far if region == "far" else server.port
        assert (address, status, loss) == (f"127.0.0.1:{port}", "ok", "0/5")
        p50 = float(rtt.split("/")[0])
        if region == "far":
            assert float(relayed_ms) >= 6 * DELAY * 1000 - 5 and p50 >= 4 * DELAY * 1000 - 5
        else:
            assert 0 < p50 < 4 * DELAY * 1000 and float(relayed_ms) < 6 * DELAY * 1000
    assert lines[5] == "chosen: near (the lowest median round trip through the relay)"


def test_probe_regions_from_the_tokens_api(server_factory, tmp_path, in_reactor):  # noqa: F811
    dsn = f"sqlite:///{tmp_path / 'accounts.db'}"
    keys = in_reactor(create_accounts, dsn, ("acme",))
    secret = tmp_path / "mint.secret"
    secret.write_text(f"{SECRET}\n")
    regions = tmp_path / "regions.toml"
    regions.write_text('[regions.far]\nhost = "127.0.0.1"\n')
    api_port = free_port()
    server = server_factory("--auth", f"db:dsn={dsn},secret-file={secret}", "--api-port",
                            str(api_port), "--regions-file", str(regions), "--region", "near",
                            users=(), tls=False)
    server.read_until("account database loaded")
    api = f"http://127.0.0.1:{api_port}"
    with DelayProxy(DELAY) as proxy:
        regions.write_text(f'[regions.far]\nhost = "127.0.0.1"\nport = {proxy.forward(server.port)}\n')
        server.read_until("--regions-file changed: far ready, near ready")
        result = subprocess.run(
            [CLI, "probe", "--regions", "--api", api, "--account", "acme", "--count", "3",
             "--json"], capture_output=True, text=True, timeout=60,
            env={**os.environ, "TURNRELAY_API_KEY": keys["acme"]})
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    # The API's order (no GeoIP: its own region, then the other), probed side by side.
    assert [(r["region"], r["transport"], r["ok"]) for r in report["regions"]] == \
        [("near", "udp", True), ("far", "udp", True)]
    near, far = report["regions"]
    assert near["rtt_p50_ms"] < far["rtt_p50_ms"] and far["rtt_p50_ms"] >= 4 * DELAY * 1000 - 5
    assert report["chosen"] == "near"
    refused = probe("--regions", "--api", api, "--account", "acme", "--api-key", "wrong")
    assert (refused.returncode, refused.stderr) == (2, (
        f"turnrelay probe: the tokens API at {api} refused: 401 wrong account id or API key\n"))
    assert len(re.findall(r"allocation opened user=\d+:acme:probe ", server.stop())) == 4


@pytest.mark.parametrize("args, problem", [
    (["--regions"], "--regions needs NAME=URI arguments, or --api URL"),
    (["--regions", "--api", "http://127.0.0.1:1", "a=turn:h"], "give --api URL or NAME=URI"),
    (["--regions", "--api", "http://127.0.0.1:1"], "--api needs --account and --api-key"),
    (["a=turn:h", "b=turn:h", "--user", "u", "--password", "p"], "give one URI, or --regions"),
])
def test_bad_regions_arguments_are_one_line(args, problem):
    result = probe(*args)
    assert result.returncode == 2 and problem in result.stderr, result.stderr
    assert len(result.stderr.splitlines()) == 1
