"""coturn's own client tools against turnrelay over UDP, TCP and TLS, with long-term credentials."""
import re
import subprocess

import pytest

from support.servers import PASSWORD, USER, running_echo_peer, tool
from support.uclient import relayed_all

MESSAGES, CLIENTS = 20, 2
# uclient picks channel numbers in RFC 5766's range, beyond RFC 8656's 0x4FFF.
RFC5766 = "--rfc5766-channels"


@pytest.fixture
def turnrelay(server_factory):
    return server_factory(RFC5766)


def uclient(server, peer, *flags, port=None, user=USER, password=PASSWORD):
    args = [tool("turnutils_uclient"), *flags, "-p", str(port or server.port), "-u", user,
            "-w", password, "-e", peer[0], "-r", str(peer[1]), "-n", str(MESSAGES),
            "-m", str(CLIENTS), server.host]  # 20 ms apart, uclient's default
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("flags", [
    pytest.param((), id="udp-channels"),
    pytest.param(("-s",), id="udp-send-indications"),
    pytest.param(("-t",), id="tcp-channels"),
    pytest.param(("-t", "-s"), id="tcp-send-indications"),
    pytest.param(("-t", "-S"), id="tls-channels"),
    pytest.param(("-t", "-S", "-s"), id="tls-send-indications"),
])
def test_uclient_relays_every_message(turnrelay, echo_peer, flags):
    port = turnrelay.tls_port if "-S" in flags else turnrelay.port
    # uclient opens an RTP/RTCP pair of allocations per client (EVEN-PORT + RESERVATION-TOKEN).
    for _ in range(3):
        result = uclient(turnrelay, echo_peer, *flags, port=port)
        output = result.stdout + result.stderr
        relayed = relayed_all(output, MESSAGES * CLIENTS)
        # Debian's uclient 4.6.1 opens each TLS connection with TLS 1.0, 1.1 or 1.2 picked at
        # random (its mainuclient.c) and starts over when the relay refuses the old two; now
        # and then that costs it a message or its whole run.  Such a run says nothing about
        # the relay: it is run again, and only such a run.
        if relayed or "alert protocol version" not in output:
            break
    assert relayed, output


def test_uclient_ipv6_relay_and_dont_fragment(server_factory):
    """-x asks for an IPv6 relay (REQUESTED-ADDRESS-FAMILY), -g adds DONT-FRAGMENT."""
    server = server_factory(RFC5766, "--relay-ip", "::1", tls=False)
    with running_echo_peer("::1") as peer:
        result = uclient(server, peer, "-x", "-g")
    output = result.stdout + result.stderr
    assert relayed_all(output, MESSAGES * CLIENTS), output
    assert "relay=::1:" in server.stop()


def test_uclient_with_wrong_password_gets_no_allocation(turnrelay, echo_peer):
    result = uclient(turnrelay, echo_peer, password="not-the-password")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Cannot complete Allocation" in output, output


def test_stunclient_binding_over_udp(turnrelay):
    result = subprocess.run([tool("turnutils_stunclient"), "-p", str(turnrelay.port), turnrelay.host],
                            capture_output=True, text=True, timeout=30)
    assert re.search(r"UDP reflexive addr: 127\.0\.0\.1:\d+", result.stdout + result.stderr), \
        result.stdout + result.stderr


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
def test_uclient_client_to_client_over_tcp_relays(turnrelay, tls):
    """-T -y: pairs of clients with TCP allocations (RFC 6062), one Connects to the other's
    relayed address, which sees a ConnectionAttempt; both ConnectionBind and echo each other.
    With -S the control and data connections are TLS."""
    port = turnrelay.tls_port if tls else turnrelay.port
    args = [tool("turnutils_uclient"), "-T", "-y", *(["-S"] if tls else []), "-p", str(port),
            "-u", USER, "-w", PASSWORD, "-n", str(MESSAGES), "-m", str(CLIENTS), turnrelay.host]
    result = subprocess.run(args, capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert relayed_all(output, MESSAGES * CLIENTS), output
    log = turnrelay.stop()
    assert re.search(rf"transport={'tls' if tls else 'tcp'} relay=tcp:127\.0\.0\.1:\d+", log), log
    assert "tcp connect user=alice" in log, log
