"""The abuse suite: a real relay, over UDP, TCP and TLS, refuses to be a door into the operator's
network, into itself or into another user's allocation, and survives malformed input.

Every forbidden peer must get 403 for CreatePermission and ChannelBind, and whatever the client
sends toward it (Send indications, ChannelData on the refused channel) must reach nobody:
where the address is bindable on this host (loopback, and what the kernel routes to loopback:
0.0.0.0, ::, IPv4 loopback inside IPv6) a real socket listens there, and the relay's own
per-allocation counter, logged when the allocation closes, must count only the control
message sent to an allowed peer.  The control message also orders the checks: it is sent last
on the same 5-tuple, so once it has arrived every earlier one has been handled.
"""
from __future__ import annotations

import copy
import signal
import socket
import ssl
import time
from typing import Dict, List, Tuple

import pytest

from relay.cli.turnclient import NoResponse, TurnClient, error_code
from relay.proto import stun
from support.relay_clients import TRANSPORTS, closed_counters, connect, listener_address, udp_socket
from support.servers import PASSWORD, REALM, USER, free_port

UDP = (stun.REQUESTED_TRANSPORT, 17)
DUAL = (stun.ADDITIONAL_ADDRESS_FAMILY, stun.FAMILY_IPV6)
CONTROL = "127.0.0.2"   # the one peer the operator allows: --allowed-peer-ip
BOB, BOB_PASSWORD = "bob", "builder"

# The list: (peer address, the loopback address a datagram to it would land on, if any).
FORBIDDEN: List[Tuple[str, str]] = [
    ("127.0.0.1", "127.0.0.1"), ("127.1.2.3", "127.1.2.3"), ("::1", "::1"),
    ("0.0.0.0", "127.0.0.1"), ("0.1.2.3", ""), ("::", "::1"),
    ("::ffff:127.0.0.1", "127.0.0.1"), ("::ffff:10.0.0.1", ""),
    ("::ffff:169.254.169.254", ""), ("::127.0.0.1", "127.0.0.1"),
    ("64:ff9b::7f00:1", "127.0.0.1"), ("2002:7f00:1::", "127.0.0.1"),
    ("169.254.169.254", ""), ("169.254.0.1", ""), ("fe80::1", ""), ("fc00::1", ""),
    ("fd12:3456::1", ""),
    ("10.0.0.1", ""), ("172.16.0.1", ""), ("172.31.255.254", ""), ("192.168.1.1", ""),
    ("100.64.0.1", ""), ("192.0.0.8", ""), ("192.0.2.1", ""), ("198.51.100.1", ""),
    ("203.0.113.1", ""), ("198.18.0.1", ""), ("2001:db8::1", ""), ("100::1", ""),
    ("224.0.0.1", ""), ("239.255.255.250", ""), ("ff02::1", ""), ("ff0e::1", ""),
    ("240.0.0.1", ""), ("255.255.255.255", ""),
]


def as_user(client: TurnClient, user: str, password: str) -> TurnClient:
    """Another user's credentials on `client`'s 5-tuple (same socket, same nonce)."""
    other = copy.copy(client)
    other.username, other.password = user, password
    return other


def nothing_received(sinks: Dict[str, socket.socket]) -> List[str]:
    """What reached the listening sinks; each is read without waiting, after the control."""
    leaks = []
    for host, sink in sinks.items():
        sink.setblocking(False)
        try:
            data, source = sink.recvfrom(65536)
            leaks.append(f"{host} got {data!r} from {source}")
        except BlockingIOError:
            pass
        sink.settimeout(5)
    return leaks


@pytest.fixture
def sinks():
    """A listening UDP socket on every loopback address a forbidden peer could land on."""
    opened = {host: udp_socket(host) for host in {landing for _, landing in FORBIDDEN if landing}}
    yield opened
    for sock in opened.values():
        sock.close()


@pytest.fixture
def tcp_sinks():
    """A listening TCP socket on every loopback address a forbidden Connect could land on."""
    opened = {host: socket.create_server((host, 0), family=socket.AF_INET6 if ":" in host
                                         else socket.AF_INET)
              for host in {landing for _, landing in FORBIDDEN if landing}}
    yield opened
    for sock in opened.values():
        sock.close()


def nothing_connected(listeners: Dict[str, socket.socket]) -> List[str]:
    """Which listeners got a connection; each is asked without waiting, after the control."""
    reached = []
    for host, listener in listeners.items():
        listener.setblocking(False)
        try:
            connection, source = listener.accept()
            connection.close()
            reached.append(f"{host} accepted a connection from {source}")
        except BlockingIOError:
            pass
    return reached


def assert_no_connect_through(server, transport: str, listeners: Dict[str, socket.socket]) -> None:
    """RFC 6062: Connect from a TCP allocation to each forbidden peer is 403, no attempt made;
    a Connect to the allowed control peer, made last, orders the check."""
    client = connect(server, transport)
    try:
        reply = client.request(stun.ALLOCATE, (stun.REQUESTED_TRANSPORT, 6), DUAL)
        assert reply.cls == stun.SUCCESS and len(reply.get_all(stun.XOR_RELAYED_ADDRESS)) == 2
        wrong = []
        for host, landing in FORBIDDEN:
            peer = (host, listeners[landing].getsockname()[1] if landing else 9)
            code = error_code(client.request(stun.CONNECT, (stun.XOR_PEER_ADDRESS, peer)))
            if code != 403:
                wrong.append(f"{peer}: Connect answered {code}")
        with socket.create_server((CONTROL, 0)) as control:
            reply = client.request(stun.CONNECT, (stun.XOR_PEER_ADDRESS, control.getsockname()[:2]))
            assert reply.cls == stun.SUCCESS, reply.get(stun.ERROR_CODE)
            control.settimeout(5)
            control.accept()[0].close()
        assert wrong == [], f"over {transport}:\n" + "\n".join(wrong)
        assert nothing_connected(listeners) == [], transport
    finally:
        client.close()


def assert_no_way_through(server, transport: str, sinks: Dict[str, socket.socket]) -> None:
    client = connect(server, transport)
    try:
        reply = client.request(stun.ALLOCATE, UDP, DUAL)
        assert reply.cls == stun.SUCCESS and len(reply.get_all(stun.XOR_RELAYED_ADDRESS)) == 2
        with udp_socket(CONTROL) as control:
            control_peer = control.getsockname()[:2]
            assert client.request(stun.CREATE_PERMISSION,
                                  (stun.XOR_PEER_ADDRESS, control_peer)).cls == stun.SUCCESS
            wrong = []
            for i, (host, landing) in enumerate(FORBIDDEN):
                peer = (host, sinks[landing].getsockname()[1] if landing else 9)
                number = 0x4000 + i
                codes = (error_code(client.request(stun.CREATE_PERMISSION,
                                                   (stun.XOR_PEER_ADDRESS, peer))),
                         error_code(client.request(stun.CHANNEL_BIND, (stun.CHANNEL_NUMBER, number),
                                                   (stun.XOR_PEER_ADDRESS, peer))))
                if codes != (403, 403):
                    wrong.append(f"{peer}: CreatePermission, ChannelBind answered {codes}")
                client.send_indication(peer, b"leak %d" % i)
                client.send_channel(number, b"leak %d" % i)
            client.send_indication(control_peer, b"done")
            data, source = control.recvfrom(100)
            assert data == b"done", data
        assert wrong == [], f"over {transport}:\n" + "\n".join(wrong)
        assert nothing_received(sinks) == [], transport
        assert closed_counters(server, client) == "1/4B", f"over {transport} more was relayed"
    finally:
        client.close()


def reload_peer_rules(server, config, rules: str) -> None:
    """Rewrite the --config file's peer rules and SIGHUP: a fresh policy replaces the old."""
    config.write_text(rules)
    server.process.send_signal(signal.SIGHUP)
    server.read_until("peer rules reloaded")


def test_forbidden_peers_get_403_and_nothing_reaches_them(server_factory, sinks, tcp_sinks,
                                                           tmp_path):
    config = tmp_path / "turnrelay.toml"
    config.write_text(f'allowed-peer-ip = ["{CONTROL}"]\n')
    server = server_factory("--config", str(config), "--relay-ip", "::1", loopback_peers=False)
    for reload in (False, True):
        if reload:
            # Reloaded rules that name other networks leave the defaults as they were.
            reload_peer_rules(server, config, f'allowed-peer-ip = ["{CONTROL}", "198.51.100.7"]\n'
                                              'denied-peer-ip = ["8.8.8.0/24"]\n')
        for transport in TRANSPORTS:
            assert_no_way_through(server, transport, sinks)
        for transport in ("tcp", "tls"):
            assert_no_connect_through(server, transport, tcp_sinks)


def test_operator_rules_open_what_they_name_and_only_that(server_factory):
    server = server_factory("--allowed-peer-ip", "10.0.0.0/8", "--allowed-peer-ip", "127.0.0.3",
                            "--denied-peer-ip", "10.9.0.0/16", "--cluster-cidr", "10.96.0.0/12",
                            loopback_peers=False)
    with udp_socket("127.0.0.3") as allowed, udp_socket("127.0.0.4") as other:
        client = connect(server, "udp")
        try:
            assert client.request(stun.ALLOCATE, UDP).cls == stun.SUCCESS
            for host, code in (("10.1.2.3", None), ("10.9.0.1", None), ("10.96.0.1", 403),
                               ("10.111.1.1", 403), ("172.16.0.1", 403), ("127.0.0.4", 403)):
                reply = client.request(stun.CREATE_PERMISSION, (stun.XOR_PEER_ADDRESS, (host, 9)))
                assert error_code(reply) == code, host
            peer = allowed.getsockname()[:2]
            assert client.request(stun.CHANNEL_BIND, (stun.CHANNEL_NUMBER, 0x4000),
                                  (stun.XOR_PEER_ADDRESS, peer)).cls == stun.SUCCESS
            client.send_channel(0x4000, b"allowed")
            assert allowed.recvfrom(100)[0] == b"allowed"
            assert nothing_received({"127.0.0.4": other}) == []
        finally:
            client.close()


def test_the_relays_own_endpoints_are_never_peers(server_factory, tmp_path):
    """Even with loopback allowed, and an allow rule naming them: listeners, API, metrics;
    before and after the peer rules are reloaded."""
    api_port, metrics_port = free_port(), free_port()
    secret = tmp_path / "mint.secret"
    secret.write_text("a-secret-to-mint-with\n")
    config = tmp_path / "turnrelay.toml"
    config.write_text('allowed-peer-ip = ["127.0.0.0/8"]\n')
    server = server_factory("--config", str(config), "--relay-ip", "::1",
                            "--auth", f"db:dsn=sqlite:///{tmp_path / 'accounts.db'},"
                                      f"secret-file={secret}", "--api-port", str(api_port),
                            "--prometheus", "--prometheus-port", str(metrics_port))
    server.read_until(f"tokens API listening on http [127.0.0.1]:{api_port}")
    server.read_until(f"metrics listening on http [127.0.0.1]:{metrics_port}")
    own_ports = (server.port, server.tls_port, api_port, metrics_port)
    for transport in TRANSPORTS + ("reload",) + TRANSPORTS:
        if transport == "reload":
            reload_peer_rules(server, config, 'allowed-peer-ip = ["127.0.0.0/8", "::1"]\n')
            continue
        with udp_socket("127.0.0.1") as sink:
            client = connect(server, transport)
            try:
                assert client.request(stun.ALLOCATE, UDP, DUAL).cls == stun.SUCCESS
                sink_peer = sink.getsockname()[:2]
                # A permission for 127.0.0.1 covers every port: sink and listeners alike.
                assert client.request(stun.CREATE_PERMISSION, (stun.XOR_PEER_ADDRESS, sink_peer),
                                      (stun.XOR_PEER_ADDRESS, ("::1", 9))).cls == stun.SUCCESS
                for i, port in enumerate(own_ports):
                    for host in ("127.0.0.1", "0.0.0.0", "::ffff:127.0.0.1", "::"):
                        peer = (host, port)
                        assert error_code(client.request(
                            stun.CHANNEL_BIND, (stun.CHANNEL_NUMBER, 0x4000 + i),
                            (stun.XOR_PEER_ADDRESS, peer))) == 403, (peer, transport)
                        if host == "127.0.0.1":
                            assert error_code(client.request(
                                stun.CREATE_PERMISSION, (stun.XOR_PEER_ADDRESS, peer))) == 403
                        # A Binding request to our own listener would be answered to the relay
                        # port and come back as a Data indication: it must not leave at all.
                        probe = stun.Message(stun.BINDING, stun.REQUEST).encode()
                        client.send_indication(peer, probe)
                client.send_indication(sink_peer, b"done")
                assert sink.recvfrom(100)[0] == b"done"
                assert closed_counters(server, client) == "1/4B", transport
            finally:
                client.close()
        if transport != "udp":
            tcp = connect(server, transport)
            assert tcp.request(stun.ALLOCATE, (stun.REQUESTED_TRANSPORT, 6), DUAL).cls \
                == stun.SUCCESS
            for port in own_ports:
                for host in ("127.0.0.1", "0.0.0.0", "::ffff:127.0.0.1", "::"):
                    assert error_code(tcp.request(stun.CONNECT, (stun.XOR_PEER_ADDRESS,
                                                                 (host, port)))) == 403
            tcp.close()
    assert "Traceback" not in server.stop()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_channel_numbers_outside_rfc8656s_range_are_400(server_factory, transport):
    """0x4000-0x4FFF only, unless --rfc5766-channels (old clients) opens 0x5000-0x7FFF."""
    strict, compat = server_factory(), server_factory("--rfc5766-channels")
    for server, accepted in ((strict, {0x4000, 0x4FFF}), (compat, {0x4000, 0x4FFF, 0x5000, 0x7FFE, 0x7FFF})):
        client = connect(server, transport)
        assert client.request(stun.ALLOCATE, UDP).cls == stun.SUCCESS
        for i, number in enumerate((0x0000, 0x3FFF, 0x4000, 0x4FFF, 0x5000, 0x7FFE, 0x7FFF, 0x8000, 0xFFFF)):
            reply = client.request(stun.CHANNEL_BIND, (stun.CHANNEL_NUMBER, number),
                                   (stun.XOR_PEER_ADDRESS, ("127.0.0.1", 10000 + i)))
            assert error_code(reply) == (None if number in accepted else 400), hex(number)
        client.close()


# -- password guessing ---------------------------------------------------------------------------

@pytest.mark.parametrize("transport", TRANSPORTS)
def test_password_guessing_gets_401_then_slows_to_a_crawl(server_factory, transport):
    """A relay per transport: the 401 limiter counts per source address (burst 20, 2/s)."""
    server = server_factory()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    # A short timeout: an unanswered guess is the limiter at work (0.3 s: no UDP retransmit).
    guesser = TurnClient.connect(transport, listener_address(server, transport), USER, "guess",
                                 REALM, timeout=0.3, context=context, bind_host=server.host)
    challenge = guesser.exchange(stun.Message(stun.ALLOCATE, stun.REQUEST).add(*UDP))
    assert error_code(challenge) == 401 and challenge.get(stun.REALM) == REALM
    wrong = stun.long_term_key(USER, REALM, "guess")
    answered, start = 0, time.monotonic()
    for _ in range(30):
        guess = stun.Message(stun.ALLOCATE, stun.REQUEST).add(*UDP).add(stun.USERNAME, USER)
        guess.add(stun.REALM, REALM).add(stun.NONCE, challenge.get(stun.NONCE))
        try:
            reply = guesser.exchange(guess, wrong)
        except NoResponse:
            continue
        assert error_code(reply) == 401 and not reply.has(stun.SOFTWARE)
        answered += 1
    elapsed = time.monotonic() - start
    # The burst, then two a second: guessing crawls (without the limiter all 30 would be).
    assert 20 <= answered <= 21 + 2 * elapsed, (answered, elapsed)
    guesser.close()
    # The right password from the same address still logs in.
    honest = connect(server, transport)
    assert honest.request(stun.ALLOCATE, UDP).cls == stun.SUCCESS
    honest.close()


# -- malformed input ----------------------------------------------------------------------------

MARKER = b"\xdeMARKER-never-echoed\xad"
# What an answer to a malformed message may carry: an error and a challenge, nothing of ours.
ANSWER_ATTRIBUTES = {stun.ERROR_CODE, stun.REALM, stun.NONCE, stun.PASSWORD_ALGORITHMS,
                     stun.SOFTWARE, stun.FINGERPRINT, stun.MESSAGE_INTEGRITY,
                     stun.MESSAGE_INTEGRITY_SHA256, stun.UNKNOWN_ATTRIBUTES,
                     stun.XOR_MAPPED_ADDRESS}


def binding(*attributes: Tuple[int, bytes]) -> stun.Message:
    msg = stun.Message(stun.BINDING, stun.REQUEST)
    msg.attributes.extend(attributes)
    return msg


def with_length(wire: bytes, length: int) -> bytes:
    return wire[:2] + length.to_bytes(2, "big") + wire[4:]


def signed(client: TurnClient, method: int, *attributes: Tuple[int, bytes],
           password: str = PASSWORD) -> bytes:
    msg = stun.Message(method, stun.REQUEST)
    msg.attributes.extend(attributes)
    msg.add(stun.USERNAME, USER).add(stun.REALM, REALM).add(stun.NONCE, client.nonce)
    return msg.encode(key=stun.long_term_key(USER, REALM, password), fingerprint=True)


def malformed_cases(client: TurnClient) -> List[Tuple[str, bytes, object]]:
    """(what, bytes, expected): None for dropped, else the acceptable answers' codes, with
    0 for a success.  Each message is complete as its own header frames it, so a stream stays
    in step; `client` holds an allocation and a nonce."""
    good = binding((stun.SOFTWARE, MARKER)).encode(fingerprint=True)
    overrun = binding().encode()
    overrun = with_length(overrun, 8) + (0x8022).to_bytes(2, "big") + (200).to_bytes(2, "big") \
        + MARKER[:4]
    fingerprint = bytearray(good)
    fingerprint[-1] ^= 0x01
    late = binding((stun.SOFTWARE, MARKER)).encode(fingerprint=True)
    late = with_length(late, len(late) - 20 + 8) + (0x8022).to_bytes(2, "big") \
        + (4).to_bytes(2, "big") + MARKER[:4]
    response = stun.Message(stun.BINDING, stun.SUCCESS).add(stun.SOFTWARE, "x").encode()
    short_mi = stun.Message(stun.ALLOCATE, stun.REQUEST).add(stun.REQUESTED_TRANSPORT, 17)
    short_mi.add(stun.USERNAME, USER).add(stun.REALM, REALM).add(stun.NONCE, client.nonce)
    short_mi.attributes.append((stun.MESSAGE_INTEGRITY, MARKER[:10]))
    bad_peer = (stun.XOR_PEER_ADDRESS, b"\x00\x07\x12\x34" + MARKER[:4])
    odd_peer = (stun.XOR_PEER_ADDRESS, MARKER[:5])
    many = binding(*[(0xC000 + i, MARKER[:4]) for i in range(500)])
    return [
        ("attribute longer than the message", overrun, None),
        ("length not a multiple of 4", with_length(good, len(good) - 22)[:-2], None),
        ("bad FINGERPRINT", bytes(fingerprint), None),
        ("FINGERPRINT not last", late, None),
        ("a response, not a request", response, None),
        ("unknown method", stun.Message(0x0FF, stun.REQUEST).add(stun.SOFTWARE, "x").encode(),
         {400}),
        ("unknown comprehension-required attribute", binding((0x0031, MARKER)).encode(), {420}),
        ("500 unknown optional attributes", many.encode(), {0}),
        ("MESSAGE-INTEGRITY of 10 bytes", short_mi.encode(), {400, 401}),
        ("bad MESSAGE-INTEGRITY", signed(client, stun.ALLOCATE, (stun.REQUESTED_TRANSPORT,
                                                                 b"\x11\x00\x00\x00"),
                                         password="guess"), {401}),
        ("XOR-PEER-ADDRESS of family 7", signed(client, stun.CREATE_PERMISSION, bad_peer), {400}),
        ("XOR-PEER-ADDRESS of 5 bytes", signed(client, stun.CHANNEL_BIND, odd_peer,
                                               (stun.CHANNEL_NUMBER, b"\x40\x00\x00\x00")),
         {400}),
        ("CHANNEL-NUMBER of 2 bytes", signed(client, stun.CHANNEL_BIND,
                                             (stun.CHANNEL_NUMBER, b"\x40\x00")), {400}),
        ("LIFETIME of 3 bytes", signed(client, stun.REFRESH, (stun.LIFETIME, b"\x00\x00\x01")),
         {400}),
    ]


def answers_until_binding(client: TurnClient) -> List[bytes]:
    """Everything the server sends before it answers a fresh Binding: its answers to what
    came before, since it handles one client's messages in order."""
    probe = stun.Message(stun.BINDING, stun.REQUEST)
    client.sock.sendall(probe.encode()) if client.transport != "udp" else \
        client.sock.sendto(probe.encode(), client.server)
    answers = []
    while True:
        data = client._receive(time.monotonic() + 5)  # the client's own framing
        if stun.is_stun(data) and stun.parse(data).transaction_id == probe.transaction_id:
            return answers
        answers.append(data)


def judge(what: str, wire: bytes, expected, answers: List[bytes]) -> List[str]:
    tid = wire[8:20]
    problems = []
    for data in answers:
        if MARKER[:4] in data or len(data) > 200:
            problems.append(f"{what}: echoed or oversized answer {data!r}")
            continue
        reply = stun.parse(data)
        code = error_code(reply) or 0
        if reply.transaction_id != tid or expected is None or code not in expected:
            problems.append(f"{what}: answered {code} with transaction {reply.transaction_id!r}")
        extra = {t for t, _ in reply.attributes} - ANSWER_ATTRIBUTES
        if extra:
            problems.append(f"{what}: answer carries attributes {sorted(extra)}")
    if expected is not None and len(answers) != 1:
        problems.append(f"{what}: {len(answers)} answers, expected one of {expected}")
    return problems


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_malformed_messages_are_dropped_or_answered_400_never_echoed(server_factory, transport):
    server = server_factory()
    client = connect(server, transport)
    try:
        assert client.request(stun.ALLOCATE, UDP).cls == stun.SUCCESS
        problems = []
        for what, wire, expected in malformed_cases(client):
            client._send(wire)
            problems += judge(what, wire, expected, answers_until_binding(client))
        if transport == "udp":
            # Datagrams shorter than their header says, or not STUN nor ChannelData at all.
            for what, wire in (("truncated header", MARKER[:12]),
                               ("header longer than the datagram",
                                with_length(binding().encode(), 100) + MARKER),
                               ("ChannelData longer than the datagram",
                                b"\x40\x00\x03\xe8" + MARKER),
                               ("first byte 0xFF", b"\xff" + MARKER * 2)):
                client._send(wire)
                problems += judge(what, wire, None, answers_until_binding(client))
        assert problems == [], "\n".join(problems)
        # The allocation is untouched and still relays.
        assert client.request(stun.REFRESH).cls == stun.SUCCESS
    finally:
        client.close()
    if transport != "udp":
        # Streams: a frame cut short by the client closing, and bytes that frame nothing
        # (the server closes those connections), then a fresh connection is served.
        for cut in (MARKER[:3], with_length(binding().encode(), 100) + MARKER, b"\xff" + MARKER):
            broken = connect(server, transport)
            broken._send(cut)
            broken.close()
        fresh = connect(server, transport)
        assert fresh.exchange(stun.Message(stun.BINDING, stun.REQUEST)).cls == stun.SUCCESS
        fresh.close()
    log = server.stop()
    assert "Traceback" not in log and "Unhandled" not in log, log


# -- another user's allocation --------------------------------------------------------------------

@pytest.mark.parametrize("transport", TRANSPORTS)
def test_another_users_allocation_cannot_be_touched(server_factory, transport):
    server = server_factory(users=((USER, PASSWORD), (BOB, BOB_PASSWORD)))
    alice = connect(server, transport)
    bob = connect(server, transport, BOB, BOB_PASSWORD)
    with udp_socket("127.0.0.1") as peer, udp_socket("127.0.0.5") as bobs_peer:
        target, bobs_target = peer.getsockname()[:2], bobs_peer.getsockname()[:2]
        try:
            assert alice.request(stun.ALLOCATE, UDP).cls == stun.SUCCESS
            assert alice.request(stun.CHANNEL_BIND, (stun.CHANNEL_NUMBER, 0x4000),
                                 (stun.XOR_PEER_ADDRESS, target)).cls == stun.SUCCESS
            touches = ((stun.CREATE_PERMISSION, [(stun.XOR_PEER_ADDRESS, bobs_target)]),
                       (stun.CHANNEL_BIND, [(stun.CHANNEL_NUMBER, 0x4001),
                                            (stun.XOR_PEER_ADDRESS, bobs_target)]),
                       (stun.REFRESH, [(stun.LIFETIME, 0)]))
            # From another 5-tuple, with valid credentials: there is no allocation to touch.
            for method, attributes in touches:
                assert error_code(bob.request(method, *attributes)) == 437, method
            bob.send_indication(target, b"from bob's 5-tuple")
            bob.send_channel(0x4000, b"from bob's 5-tuple")
            # On alice's 5-tuple with bob's credentials: 441, and nothing changes.
            intruder = as_user(alice, BOB, BOB_PASSWORD)
            for method, attributes in touches:
                assert error_code(intruder.request(method, *attributes)) == 441, method
            # Neither bob's permission nor his channel exists; alice's channel still works.
            alice.send_indication(bobs_target, b"no permission")
            alice.send_channel(0x4001, b"no channel")
            alice.send_channel(0x4000, b"alice's")
            assert peer.recvfrom(100)[0] == b"alice's"
            assert nothing_received({"peer": peer, "bob's peer": bobs_peer}) == []
            assert closed_counters(server, alice) == "1/7B"
        finally:
            alice.close()
            bob.close()
