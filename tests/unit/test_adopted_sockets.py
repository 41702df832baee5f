"""Listening sockets handed to the reactor stay non-blocking.

PyPy's `socket.fromfd`, which the reactor's adopt*Port methods call, makes the descriptor
blocking, and its duplicate shares the flag: a worker's reactor then hung in its listener's
one recvfrom (or accept) too many, relaying nothing back from peers and never stopping.  The
fake reactor here does what PyPy's does, on any interpreter.
"""
import fcntl
import os
import socket

from relay.net.listeners import adopt_datagram_socket, bound_socket
from relay.service.services import adopt_stream_socket


class PyPyLikeReactor:
    """Adopts a descriptor as Twisted does, through fromfd, which blocks it as PyPy's does."""

    def __init__(self):
        self.adopted = []

    def _adopt(self, fd, family, kind):
        sock = socket.fromfd(fd, family, kind)
        sock.setblocking(True)
        self.adopted.append(sock)
        return sock

    def adoptDatagramPort(self, fd, family, protocol, max_size):
        return self._adopt(fd, family, socket.SOCK_DGRAM)

    def adoptStreamPort(self, fd, family, factory):
        return self._adopt(fd, family, socket.SOCK_STREAM)


def blocking(sock: socket.socket) -> bool:
    return not fcntl.fcntl(sock.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK


def test_adopted_listeners_stay_non_blocking():
    reactor = PyPyLikeReactor()
    adopt_datagram_socket(reactor, bound_socket("127.0.0.1", 0, socket.SOCK_DGRAM), None)
    adopt_stream_socket(reactor, bound_socket("127.0.0.1", 0, socket.SOCK_STREAM), None)
    try:
        assert [blocking(sock) for sock in reactor.adopted] == [False, False]
    finally:
        for sock in reactor.adopted:
            sock.close()
