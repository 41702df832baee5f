"""TURN over DTLS (RFC 7350, --dtls) with the default workers.

coturn's `turnutils_uclient -S` (UDP + secure: DTLS) relays every message through an echo
peer.  Debian's uclient picks DTLS 1.0 or 1.2 at random for each attempt: 1.0 is refused with
an alert (the relay's policy is DTLS 1.2) and it tries again.

A flood of 10,000 ClientHellos from 200 sources that never answer (what a spoofed source
amounts to: the answer goes nowhere) leaves the relay's memory flat and no session behind:
each gets a HelloVerifyRequest no larger than itself, a valid cookie replayed from another
address gets another one, and a real client relays right after, and after 2,000 more
datagrams of damaged ClientHellos and random bytes.
"""
from __future__ import annotations

import random
import re
import socket
import subprocess
import time
from typing import List, Tuple

from OpenSSL import SSL

from support.blackbox import mutate
from support.servers import PASSWORD, USER, running_echo_peer, tool

MESSAGES, CLIENTS = 20, 2
FLOOD, SOURCES = 10_000, 200
RATE = 2000  # ClientHellos a second: what the relay reads, not what fills its socket buffer


def uclient(server, peer) -> str:
    result = subprocess.run(
        # -c: no RTCP allocation, whose RESERVATION-TOKEN the kernel may hand to another
        # worker than the one holding the reservation (508, over UDP as over DTLS).
        [tool("turnutils_uclient"), "-S", "-c", "-p", str(server.tls_port), "-u", USER, "-w", PASSWORD,
         "-e", peer[0], "-r", str(peer[1]), "-n", str(MESSAGES), "-m", str(CLIENTS),
         server.host], capture_output=True, text=True, timeout=90)
    return result.stdout + result.stderr


def relays_every_message(output: str) -> None:
    expected = MESSAGES * CLIENTS
    assert f"tot_send_msgs={expected}, tot_recv_msgs={expected}" in output, output
    assert "Total lost packets 0 (" in output, output
    assert not re.search(r"error [45]\d\d", output), output


def rss_kib(pid: int) -> int:
    """Resident memory of the relay: its process and its workers."""
    total = 0
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        pids = [pid] + [int(child) for child in f.read().split()]
    for each in pids:
        with open(f"/proc/{each}/status") as f:
            total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return total


def dtls_client_flights() -> Tuple[SSL.Connection, bytes]:
    """A DTLS 1.2 client over memory BIOs, and its first ClientHello (no cookie yet)."""
    context = SSL.Context(SSL.DTLS_CLIENT_METHOD)
    client = SSL.Connection(context, None)
    client.set_connect_state()
    client.set_ciphertext_mtu(1200)
    try:
        client.do_handshake()
    except SSL.WantReadError:
        pass
    return client, client.bio_read(65536)


def flood(server, hello: bytes, count: int) -> List[int]:
    """`count` ClientHellos from SOURCES addresses, paced at RATE; the answers' sizes."""
    socks = []
    for n in range(SOURCES):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((f"127.0.{2 + n // 250}.{1 + n % 250}", 0))
        sock.setblocking(False)
        socks.append(sock)
    answers: List[int] = []
    began = time.monotonic()
    try:
        for i in range(count):
            socks[i % SOURCES].sendto(hello, (server.host, server.tls_port))
            if i % 100 == 99:
                while time.monotonic() < began + i / RATE:
                    _drain(socks, answers)
        deadline = time.monotonic() + 2
        while len(answers) < count and time.monotonic() < deadline:
            _drain(socks, answers)
    finally:
        for sock in socks:
            sock.close()
    return answers


def _drain(socks, answers: List[int]) -> None:
    got = False
    for sock in socks:
        while True:
            try:
                answers.append(len(sock.recv(65536)))
                got = True
            except BlockingIOError:
                break
    if not got:
        time.sleep(0.001)  # datagrams have no event to wait on here


def test_uclient_relays_over_dtls(server_factory):
    server = server_factory("--workers", "2", "--dtls", "--rfc5766-channels")
    server.read_until("all 2 workers ready")
    with running_echo_peer() as peer:
        relays_every_message(uclient(server, peer))
    log = server.stop()
    assert len(re.findall(r"allocation opened user=alice .*transport=dtls", log)) >= CLIENTS, log
    assert "reason=deleted" in log and "transport=tls" not in log
    # Every session's datagrams reached the one worker holding it (SO_REUSEPORT hashes the
    # address pair): every message came back above, and no session failed.
    assert "DTLS session of" not in log, log


def test_a_flood_of_client_hellos_leaves_no_state_and_the_relay_serving(server_factory):
    server = server_factory("--workers", "2", "--dtls", "--rfc5766-channels")
    server.read_until("all 2 workers ready")
    client, hello = dtls_client_flights()
    # A valid cookie, for this client's address only: replayed from the flood's sources it
    # must get a HelloVerifyRequest again, not a session.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(5)
        sock.sendto(hello, (server.host, server.tls_port))
        verify_request = sock.recv(65536)
    assert verify_request[0] == 22 and verify_request[13] == 3  # HelloVerifyRequest
    client.bio_write(verify_request)
    try:
        client.do_handshake()
    except SSL.WantReadError:
        pass
    with_cookie = client.bio_read(65536)
    assert len(with_cookie) > len(hello)

    flood(server, hello, 1000)  # warm-up: every code path run once, the allocator settled
    before = rss_kib(server.process.pid)
    answers = flood(server, hello, FLOOD // 2) + flood(server, with_cookie, FLOOD // 2)
    after = rss_kib(server.process.pid)
    print(f"RSS {before} KiB -> {after} KiB after {FLOOD} ClientHellos, {len(answers)} answers")
    assert len(answers) >= FLOOD * 0.9, len(answers)
    assert max(answers) <= len(hello)  # no amplification: each answer at most a hello's size
    assert after - before < 4096, (before, after)
    # Damaged ClientHellos and random bytes: answered or dropped, never a crash.
    rng = random.Random(7)
    garbage = [mutate(rng, rng.choice([hello, with_cookie])) for _ in range(1500)]
    garbage += [rng.randbytes(rng.randint(1, 300)) for _ in range(500)]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for datagram in garbage:
            sock.sendto(datagram, (server.host, server.tls_port))
    with running_echo_peer() as peer:
        relays_every_message(uclient(server, peer))
    log = server.stop()
    assert "DTLS handshake with 127.0.2." not in log and "DTLS handshake with 127.0.3." not in log
    assert "Unhandled Error" not in log and "Traceback" not in log, log
