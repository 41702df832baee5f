"""A small blocking TURN client over one UDP, TCP or TLS socket, built on relay.proto.stun.

It serves `turnrelay probe` (relay/probe.py) and the wire tests, which need what ready-made
clients cannot be told to do: SHA-256 and USERHASH, forbidden peers, nonces carried between
servers, the same steps over all three transports.  Blocking sockets keep it simple enough to
read next to the RFC: every wait is on a reply, bounded by `timeout`; over UDP a request is
retransmitted with RFC 8489's doubling RTO (section 6.2.1) until then.
"""
from __future__ import annotations

import socket
import ssl
import time
from typing import Optional, Tuple

from relay.proto import stun

UDP, TCP, TLS = "udp", "tcp", "tls"
TRANSPORTS = (UDP, TCP, TLS)
INITIAL_RTO = 0.5


class NoResponse(TimeoutError):
    """Nothing (or nothing that matched) arrived within the client's timeout."""


class Unsigned(Exception):
    """A success response to an authenticated request not signed with our key: a server
    that does not know our password, or something in the path rewriting messages."""


class TurnClient:
    def __init__(self, sock: socket.socket, transport: str, server: stun.Address,
                 username: str = "", password: str = "", realm: Optional[str] = None,
                 timeout: float = 5.0):
        self.sock = sock
        self.transport = transport
        self.server = server
        self.username, self.password, self.realm = username, password, realm
        self.nonce: Optional[str] = None
        self.timeout = timeout
        self._buffer = b""

    @classmethod
    def connect(cls, transport: str, server: stun.Address, username: str = "",
                password: str = "", realm: Optional[str] = None, timeout: float = 5.0,
                context: Optional[ssl.SSLContext] = None, server_hostname: Optional[str] = None,
                bind_host: str = "") -> "TurnClient":
        """A client with its socket ready: bound (UDP), connected (TCP), or past the TLS
        handshake, which raises ssl.SSLError (ssl.SSLCertVerificationError for a certificate
        `context` rejects) or OSError."""
        family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
        if transport == UDP:
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.bind((bind_host, 0))
        else:
            sock = socket.create_connection(server, timeout=timeout)
            # Small requests and ChannelData frames, each awaited: Nagle would hold each one
            # back for the server's delayed ACK.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if transport == TLS:
                assert context is not None, "TLS needs an SSLContext"
                try:
                    sock = context.wrap_socket(sock, server_hostname=server_hostname)
                except BaseException:
                    sock.close()
                    raise
        sock.settimeout(timeout)
        return cls(sock, transport, server, username, password, realm, timeout)

    def close(self) -> None:
        self.sock.close()

    # Framing: one datagram, or one STUN/ChannelData frame cut out of the stream.

    def _send(self, data: bytes) -> None:
        if self.transport == UDP:
            self.sock.sendto(data, self.server)
        else:
            self.sock.sendall(data)

    def _receive(self, deadline: float) -> bytes:
        """The next frame, ChannelData without its stream padding; NoResponse at `deadline`."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NoResponse()
            self.sock.settimeout(remaining)
            try:
                if self.transport == UDP:
                    return self.sock.recv(65536)
                size = stun.stream_frame_length(self._buffer)
                if size is not None:
                    if size < 0:
                        raise ConnectionError("the server sent neither STUN nor ChannelData")
                    frame, self._buffer = self._buffer[:size], self._buffer[size:]
                    if frame[0] >= 0x40:  # ChannelData: cut the padding
                        frame = frame[:4 + stun.CHANNEL_HEADER.unpack_from(frame)[1]]
                    return frame
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("the server closed the connection")
                self._buffer += chunk
            except socket.timeout:
                raise NoResponse() from None

    # STUN transactions.

    def exchange(self, msg: stun.Message, key: Optional[bytes] = None) -> stun.Message:
        """Send a request and wait for the response with its transaction id."""
        wire = msg.encode(key=key, fingerprint=True)
        deadline = time.monotonic() + self.timeout
        rto = INITIAL_RTO if self.transport == UDP else self.timeout
        while True:
            self._send(wire)
            retransmit = min(deadline, time.monotonic() + rto)
            rto *= 2
            try:
                while True:
                    data = self._receive(retransmit)
                    if stun.is_stun(data):
                        reply = stun.parse(data)
                        if reply.transaction_id == msg.transaction_id:
                            return reply
            except NoResponse:
                if time.monotonic() >= deadline:
                    raise

    def request(self, method: int, *attributes: Tuple[int, object]) -> stun.Message:
        """A request with long-term credentials, answering one 401/438 challenge first: the
        realm and nonce come from the challenge unless the realm was given."""
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
            if reply.cls == stun.ERROR and error_code(reply) in (401, 438) \
                    and reply.has(stun.NONCE):
                self.nonce = reply.get(stun.NONCE)
                if self.realm is None:
                    self.realm = reply.get(stun.REALM)
                continue
            if reply.cls == stun.SUCCESS and key is not None and not reply.check_integrity(key):
                raise Unsigned("success response not signed with our key")
            return reply
        return reply

    # Data: Send/Data indications and channels.

    def send_indication(self, peer: stun.Address, data: bytes) -> None:
        msg = stun.Message(stun.SEND, stun.INDICATION)
        msg.add(stun.XOR_PEER_ADDRESS, peer).add(stun.DATA, data)
        self._send(msg.encode())

    def indication(self, method: int) -> stun.Message:
        """The next indication of `method`: Data, or RFC 6062's ConnectionAttempt."""
        deadline = time.monotonic() + self.timeout
        while True:
            data = self._receive(deadline)
            if stun.is_stun(data):
                msg = stun.parse(data)
                if msg.method == method and msg.cls == stun.INDICATION:
                    return msg

    def receive_data(self) -> Tuple[stun.Address, bytes]:
        """The next Data indication: (peer, payload)."""
        msg = self.indication(stun.DATA_METHOD)
        return msg.get(stun.XOR_PEER_ADDRESS), msg.get(stun.DATA)

    def take_buffered(self) -> bytes:
        """Bytes read past the last frame.  On an RFC 6062 data connection the relayed stream
        starts right after the ConnectionBind response, perhaps in the same segment."""
        data, self._buffer = self._buffer, b""
        return data

    def send_channel(self, channel: int, data: bytes) -> None:
        """ChannelData, padded to 4 bytes on a stream (RFC 8656 section 12.5)."""
        padding = stun.PADDING[len(data) & 3] if self.transport != UDP else b""
        self._send(stun.CHANNEL_HEADER.pack(channel, len(data)) + data + padding)

    def receive_channel(self, deadline: float) -> Tuple[int, bytes]:
        """The next ChannelData before `deadline` (time.monotonic()): (channel, payload)."""
        while True:
            data = self._receive(deadline)
            if len(data) >= 4 and 0x40 <= data[0] < 0x80:
                channel, length = stun.CHANNEL_HEADER.unpack_from(data)
                return channel, data[4:4 + length]


def error_code(reply: stun.Message) -> Optional[int]:
    """The ERROR-CODE number of an error response, None for any other: an error response
    without ERROR-CODE gives 0, so a test asserting success (`is None`) still fails on it."""
    return reply.get(stun.ERROR_CODE, (0, ""))[0] if reply.cls == stun.ERROR else None
