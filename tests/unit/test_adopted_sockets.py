"""Listening sockets handed to the reactor: they stay non-blocking, and a busy UDP listener
leaves the reactor its other work.

PyPy's `socket.fromfd`, which Twisted calls to adopt a descriptor, makes the descriptor
blocking, and its duplicate shares the flag: a worker's reactor then hung in its listener's
one recvfrom (or accept) too many, relaying nothing back from peers and never stopping.  The
`fromfd` here does what PyPy's does, on any interpreter.
"""
import errno
import fcntl
import os
import socket

import pytest
from twisted.internet.protocol import DatagramProtocol

from relay.net.listeners import ListenerPort, adopt_datagram_socket, bound_socket
from relay.service.services import adopt_stream_socket


class FakeReactor:
    """What adopting a socket asks of a reactor: stream ports through `fromfd` (as Twisted
    makes datagram ports), readers kept."""

    def __init__(self):
        self.adopted = []
        self.readers = []

    def adoptStreamPort(self, fd, family, factory):
        return socket.fromfd(fd, family, socket.SOCK_STREAM)

    def addReader(self, reader):
        self.readers.append(reader)

    def removeReader(self, reader):
        self.readers.remove(reader)


@pytest.fixture
def reactor(monkeypatch):
    reactor = FakeReactor()
    real_fromfd = socket.fromfd

    def pypy_like_fromfd(fd, family, kind, proto=0):
        sock = real_fromfd(fd, family, kind, proto)
        sock.setblocking(True)
        reactor.adopted.append(sock)
        return sock

    monkeypatch.setattr(socket, "fromfd", pypy_like_fromfd)
    yield reactor
    for sock in reactor.adopted:
        sock.close()


def blocking(sock: socket.socket) -> bool:
    return not fcntl.fcntl(sock.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK


def test_adopted_listeners_stay_non_blocking(reactor):
    adopt_datagram_socket(reactor, bound_socket("127.0.0.1", 0, socket.SOCK_DGRAM),
                          DatagramProtocol())
    adopt_stream_socket(reactor, bound_socket("127.0.0.1", 0, socket.SOCK_STREAM), None)
    assert [blocking(sock) for sock in reactor.adopted] == [False, False]


class Received(DatagramProtocol):
    def __init__(self):
        self.datagrams = []

    def datagramReceived(self, data, addr):
        self.datagrams.append((data, addr))


def test_a_udp_listener_reads_a_bounded_batch_per_wake_up(reactor):
    """Twisted's own port would read all 100 (up to 256 KiB) in one wake-up, and the reactor
    would serve no timer, thread result or other socket until they were all answered."""
    protocol = Received()
    port = adopt_datagram_socket(reactor, bound_socket("127.0.0.1", 0, socket.SOCK_DGRAM),
                                 protocol)
    assert isinstance(port, ListenerPort) and reactor.readers == [port]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.bind(("127.0.0.1", 0))
        for n in range(100):
            client.sendto(b"request %d" % n, ("127.0.0.1", port.getHost().port))
        port.doRead()
        assert len(protocol.datagrams) == ListenerPort.BATCH < 100
        port.doRead()
        port.doRead()  # nothing left: returns at once
        assert [data for data, _ in protocol.datagrams] == [b"request %d" % n for n in range(100)]
        assert {addr for _, addr in protocol.datagrams} == {client.getsockname()}


class Failing:
    """A socket whose next read reports an error, as a full buffer or ICMP may."""

    def recvfrom(self, size):
        raise OSError(errno.ENOBUFS, "No buffer space available")


def test_a_read_error_leaves_the_udp_listener_listening(reactor):
    """Twisted's port raised it to the reactor, which closed the listener for good."""
    port = adopt_datagram_socket(reactor, bound_socket("127.0.0.1", 0, socket.SOCK_DGRAM),
                                 Received())
    listening = port.socket
    port.socket = Failing()
    try:
        port.doRead()  # no exception: the reactor keeps it
    finally:
        port.socket = listening
    assert reactor.readers == [port]
