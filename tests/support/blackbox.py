"""Black-box garbage for a running turnrelay, while real clients keep using it.

Used by tests/e2e/test_blackbox.py (a short run) and bench/blackbox.py (100,000 datagrams).
Datagrams are mutations of real requests, signed with the server's real nonce and a real
user's key, so damage lands past the header checks and inside authenticated handlers; stream
garbage goes to the TCP and TLS listeners, including damaged TLS ClientHellos.  Real aioice
clients relay round trips over UDP and TCP in a thread the whole time, and every answer the
server gives the garbage must itself be a well-formed message.
"""
from __future__ import annotations

import random
import socket
import ssl
import threading
import time
from typing import Callable, List, Tuple

from relay.proto import stun
from support.aioice_client import relay_round_trips
from support.servers import PASSWORD, REALM, USER

PEER = ("8.8.8.8", 5000)


def mutate(rng: random.Random, data: bytes) -> bytes:
    """One to four of: bit flip, byte set, cut, insertion, a length field overwritten."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(5)
        if kind == 0 and out:
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
        elif kind == 1 and out:
            out[rng.randrange(len(out))] = rng.randrange(256)
        elif kind == 2:
            del out[rng.randint(0, len(out)):]
        elif kind == 3:
            at = rng.randint(0, len(out))
            out[at:at] = rng.randbytes(rng.randint(1, 16))
        elif len(out) >= 24:
            at = rng.choice([2] + list(range(22, len(out) - 1, 4)))
            out[at:at + 2] = rng.randrange(65536).to_bytes(2, "big")
    return bytes(out)


def real_requests(server: Tuple[str, int]) -> List[bytes]:
    """Valid requests of every kind, signed with the nonce this server just issued."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        probe = stun.Message(stun.ALLOCATE, stun.REQUEST).add(stun.REQUESTED_TRANSPORT, 17)
        sock.sendto(probe.encode(), server)
        nonce = stun.parse(sock.recv(65536)).get(stun.NONCE)
    key = stun.long_term_key(USER, REALM, PASSWORD)
    wires = []
    for method, attributes in [
            (stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, 17), (stun.LIFETIME, 600),
                             (stun.EVEN_PORT, False), (stun.DONT_FRAGMENT, True)]),
            (stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, 17),
                             (stun.ADDITIONAL_ADDRESS_FAMILY, stun.FAMILY_IPV6)]),
            (stun.REFRESH, [(stun.LIFETIME, 300)]),
            (stun.CREATE_PERMISSION, [(stun.XOR_PEER_ADDRESS, PEER),
                                      (stun.XOR_PEER_ADDRESS, ("127.0.0.1", 9))]),
            (stun.CHANNEL_BIND, [(stun.CHANNEL_NUMBER, 0x4000), (stun.XOR_PEER_ADDRESS, PEER)])]:
        for sha256 in (False, True):
            msg = stun.Message(method, stun.REQUEST)
            for attr_type, value in attributes:
                msg.add(attr_type, value)
            msg.add(stun.USERNAME, USER).add(stun.REALM, REALM).add(stun.NONCE, nonce)
            if sha256:
                msg.add(stun.PASSWORD_ALGORITHMS, [(stun.ALGORITHM_SHA256, b""),
                                                   (stun.ALGORITHM_MD5, b"")])
                msg.add(stun.PASSWORD_ALGORITHM, (stun.ALGORITHM_SHA256, b""))
                sign = stun.long_term_key(USER, REALM, PASSWORD, stun.ALGORITHM_SHA256)
            else:
                sign = key
            # With FINGERPRINT nearly every mutation is caught by the CRC; without it the
            # damage reaches attribute decoding and the integrity check; unsigned, the
            # handlers that answer before authentication.
            wires.append(msg.encode(key=sign, sha256=sha256, fingerprint=True))
            wires.append(msg.encode(key=sign, sha256=sha256))
            wires.append(msg.encode())
    send = stun.Message(stun.SEND, stun.INDICATION).add(stun.XOR_PEER_ADDRESS, PEER)
    wires.append(send.add(stun.DATA, b"payload").encode())
    wires.append(stun.Message(stun.BINDING, stun.REQUEST).encode(fingerprint=True))
    wires.append(stun.CHANNEL_HEADER.pack(0x4000, 7) + b"payload")
    return wires


def check_reply(data: bytes) -> None:
    """What the server sends to a garbage source is a whole STUN message or ChannelData."""
    if data[0] >= 0x40:
        assert len(data) >= 4 and 0x4000 <= stun.CHANNEL_HEADER.unpack_from(data)[0] <= 0x7FFE
    else:
        stun.parse(data)


def fire_datagrams(server: Tuple[str, int], count: int, seed: int, rate: float = 3000,
                   sources: int = 8, batch: int = 100) -> Tuple[int, int]:
    """`count` datagrams, nine in ten a mutated real request, one in ten random bytes.

    Paced at `rate` a second, answers drained in between: a flood beyond what the relay
    reads only fills its socket buffer (the kernel drops the rest, see `udp_drops`) and
    tests nothing.  Returns (datagrams sent, answers checked).
    """
    rng = random.Random(seed)
    seeds = real_requests(server)
    socks = []
    for _ in range(sources):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((server[0], 0))
        sock.setblocking(False)
        socks.append(sock)
    sent = answers = 0
    began = time.monotonic()
    try:
        while sent < count:
            for _ in range(min(batch, count - sent)):
                data = (rng.randbytes(rng.randint(0, 200)) if rng.random() < 0.1
                        else mutate(rng, rng.choice(seeds)))
                try:
                    rng.choice(socks).sendto(data, server)
                except BlockingIOError:
                    pass
                sent += 1
            answers += drain(socks, began + sent / rate - time.monotonic())
        answers += drain(socks, 0.5)
    finally:
        for sock in socks:
            sock.close()
    return sent, answers


def udp_drops(port: int) -> int:
    """Datagrams the kernel dropped on the UDP socket bound to `port` (its receive buffer was
    full), from /proc/net/udp: what a sender outran, not what the relay refused."""
    drops = 0
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if int(fields[1].split(":")[1], 16) == port:
                    drops += int(fields[-1])
    return drops


def drain(socks: List[socket.socket], wait: float) -> int:
    """Read and check every answer waiting on `socks`; wait up to `wait` s for a first one."""
    checked = 0
    deadline = time.monotonic() + wait
    while True:
        got = False
        for sock in socks:
            while True:
                try:
                    data = sock.recv(65536)
                except (BlockingIOError, ConnectionRefusedError):
                    break
                check_reply(data)
                checked += 1
                got = True
        if not got and time.monotonic() >= deadline:
            return checked
        if not got:
            time.sleep(0.001)   # nothing yet: a datagram socket has no EOF to wait on


def client_hello() -> bytes:
    """The first flight of a real TLS handshake, to damage."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    tls = context.wrap_bio(incoming, outgoing)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def malformed_streams(server, count: int, seed: int) -> int:
    """`count` TCP/TLS connections carrying garbage; each is closed by us or by the server."""
    rng = random.Random(seed)
    seeds = real_requests((server.host, server.port))
    hello = client_hello()
    garbage: List[Tuple[int, Callable[[], bytes]]] = [
        (server.port, lambda: rng.randbytes(rng.randint(1, 2000))),
        (server.port, lambda: b"".join(mutate(rng, rng.choice(seeds)) for _ in range(8))),
        (server.port, lambda: stun.HEADER.pack(0x0003, 65532, stun.MAGIC_COOKIE, b"t" * 12)
         + rng.randbytes(100)),                          # a frame that never completes
        (server.port, lambda: b"\x80" + rng.randbytes(50)),  # neither STUN nor ChannelData
        (server.tls_port, lambda: rng.randbytes(rng.randint(1, 2000))),
        (server.tls_port, lambda: mutate(rng, hello)),
        (server.tls_port, lambda: hello[:rng.randint(1, len(hello))]),
    ]
    for i in range(count):
        port, make = garbage[i % len(garbage)]
        with socket.create_connection((server.host, port), timeout=10) as sock:
            try:
                sock.sendall(make())
                if rng.random() < 0.5:
                    # Wait for the server's verdict (an answer, a close) for a moment.
                    sock.settimeout(0.2)
                    sock.recv(65536)
            except (ConnectionError, socket.timeout):
                pass
    return count


class RealClients(threading.Thread):
    """aioice round trips over UDP and TCP, again and again until stopped; all must pass.

    A round that fails is tried once more before it counts, as a real client retransmits:
    its peer leg is UDP, and one datagram in thousands lost on a busy machine says nothing
    about the relay (seen once in a CI rehearsal: one TCP round of 533 timed out)."""

    def __init__(self, server):
        super().__init__(daemon=True)
        self.server = server
        self.rounds = 0
        self.failures: List[str] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            transport = ("udp", "tcp")[self.rounds % 2]
            payloads = [b"real client %d/%d" % (self.rounds, i) for i in range(5)]
            for attempt in (1, 2):
                try:
                    relay_round_trips(self.server, USER, PASSWORD, payloads, transport)
                    break
                except Exception as err:   # whatever aioice raises: recorded if twice
                    if attempt == 2:
                        self.failures.append(f"{transport} round {self.rounds}: {err!r}")
            self.rounds += 1

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=60)


