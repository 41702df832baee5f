"""A small blocking TURN client over a real UDP socket, built on relay.stun, for wire tests.

It does what coturn's and aioice's clients cannot be told to do: dual allocations with
ADDITIONAL-ADDRESS-FAMILY, SHA-256 and USERHASH, forbidden peers, nonces carried between
servers.  Every wait is on a reply, bounded by a socket timeout.
"""
from __future__ import annotations

import socket
from typing import Optional, Tuple

from relay import stun


class WireClient:
    def __init__(self, server: Tuple[str, int], username: str, password: str, realm: str):
        family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.settimeout(5)
        self.sock.bind((server[0], 0))
        self.server = server
        self.username, self.password, self.realm = username, password, realm
        self.nonce: Optional[str] = None

    def close(self) -> None:
        self.sock.close()

    def exchange(self, msg: stun.Message, key: Optional[bytes] = None) -> stun.Message:
        """Send a request and wait for the response with its transaction id."""
        self.sock.sendto(msg.encode(key=key, fingerprint=True), self.server)
        while True:
            data = self.sock.recv(65536)
            if stun.is_stun(data):
                reply = stun.parse(data)
                if reply.transaction_id == msg.transaction_id:
                    return reply

    def request(self, method: int, *attributes: Tuple[int, object]) -> stun.Message:
        """A request with long-term credentials, answering one 401/438 challenge first."""
        for _ in range(2):
            msg = stun.Message(method, stun.REQUEST)
            for attr_type, value in attributes:
                msg.add(attr_type, value)
            key = None
            if self.nonce is not None:
                msg.add(stun.USERNAME, self.username).add(stun.REALM, self.realm)
                msg.add(stun.NONCE, self.nonce)
                key = stun.long_term_key(self.username, self.realm, self.password)
            reply = self.exchange(msg, key)
            if reply.cls == stun.ERROR and reply.get(stun.ERROR_CODE)[0] in (401, 438) \
                    and reply.has(stun.NONCE):
                self.nonce = reply.get(stun.NONCE)
                continue
            if reply.cls == stun.SUCCESS and key is not None:
                assert reply.check_integrity(key), "success response not signed with our key"
            return reply
        return reply

    def send_indication(self, peer: Tuple[str, int], data: bytes) -> None:
        msg = stun.Message(stun.SEND, stun.INDICATION)
        msg.add(stun.XOR_PEER_ADDRESS, peer).add(stun.DATA, data)
        self.sock.sendto(msg.encode(), self.server)

    def receive_data(self) -> Tuple[Tuple[str, int], bytes]:
        """The next Data indication: (peer, payload)."""
        while True:
            data = self.sock.recv(65536)
            if stun.is_stun(data):
                msg = stun.parse(data)
                if msg.method == stun.DATA_METHOD and msg.cls == stun.INDICATION:
                    return msg.get(stun.XOR_PEER_ADDRESS), msg.get(stun.DATA)


def error_code(reply: stun.Message) -> Optional[int]:
    return reply.get(stun.ERROR_CODE, (None, ""))[0] if reply.cls == stun.ERROR else None
