"""relay.net.steering on real loopback sockets: the kernel runs the program for each datagram."""
import select
import socket
from typing import List

import pytest

from relay.net.listeners import bound_socket
from relay.net.steering import attach

STUN_REQUEST = b"\x00\x03\x00\x00\x21\x12\xa4\x42" + bytes(12)  # an Allocate's header
SEND_INDICATION = b"\x00\x16\x00\x00\x21\x12\xa4\x42" + bytes(12)
CHANNEL_DATA = b"\x40\x00\x00\x04data"
OTHER = b"\x90\x00rtp?"  # neither STUN nor ChannelData


def group(host: str, processes: int) -> List[socket.socket]:
    """A listener's group as relay.service.build binds it, with the program attached."""
    socks = [bound_socket(host, 0, socket.SOCK_DGRAM, reuse_port=True)]
    port = socks[0].getsockname()[1]
    socks += [bound_socket(host, port, socket.SOCK_DGRAM, reuse_port=True)
              for _ in range(2 * processes - 1)]
    attach(socks[0], processes)
    return socks


def landed(socks: List[socket.socket], client: socket.socket, data: bytes) -> int:
    """The index in the group of the socket `data` reached."""
    client.sendto(data, socks[0].getsockname()[:2])
    ready, _, _ = select.select(socks, [], [], 5)
    assert len(ready) == 1
    assert ready[0].recv(100) == data
    return socks.index(ready[0])


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
@pytest.mark.parametrize("processes", [1, 2, 3])
def test_requests_go_to_the_reactor_and_media_to_the_data_plane_of_one_process(host, processes):
    socks = group(host, processes)
    used = set()
    try:
        for _ in range(60):
            with socket.socket(socks[0].family, socket.SOCK_DGRAM) as client:
                client.bind((host, 0))
                request, other = landed(socks, client, STUN_REQUEST), landed(socks, client, OTHER)
                send, channel = (landed(socks, client, SEND_INDICATION),
                                 landed(socks, client, CHANNEL_DATA))
                assert request % 2 == 0 and other == request  # the process's reactor socket
                assert send == channel == request + 1  # the same process's data-plane socket
                used.add(request // 2)
        assert used == set(range(processes))  # 60 clients reach every process
    finally:
        for sock in socks:
            sock.close()


def test_a_datagram_too_short_to_read_goes_to_the_first_reactor_socket():
    socks = group("127.0.0.1", 2)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.bind(("127.0.0.1", 0))
            assert landed(socks, client, b"") == 0
    finally:
        for sock in socks:
            sock.close()
