"""TURN over DTLS 1.2 on UDP (RFC 7350): `turns:` for clients that want UDP's behaviour.

One UDP socket per listener, one pyOpenSSL connection over memory BIOs per client address.

- **No state before the cookie.**  A datagram from an address without a session is only
  looked at if it is a DTLS handshake record; a connection is made for it, asked
  `DTLSv1_listen` (RFC 6347 section 4.2.1) and dropped again unless the ClientHello carries a
  valid cookie (`relay.net.tls.ServerDTLS`).  Without one the answer is a HelloVerifyRequest,
  smaller than the ClientHello: a spoofed source gets no state kept and no amplification.
- **Bounded sessions.**  A session counts against the per-source limit the TCP and TLS
  connections share (`StreamLimits`), at most `HALF_OPEN` may be in their handshake at once,
  and a sweep ends a session whose handshake outlives `handshake_timeout`, or that has had no
  allocation for `idle_timeout` seconds.  A close_notify ends it at once, and its allocation
  with it, as a TCP close would.
- **Records are messages.**  Each application record is one STUN message or ChannelData, fed
  to the core like a stream's frames; what the core sends back is one record a datagram.
  Handshake flights go out in datagrams of at most `MTU` bytes, records whole (pyOpenSSL's
  memory BIO runs the records of a flight together).

With workers, SO_REUSEPORT keeps a client's datagrams on one worker (the kernel hashes the
address pair); a cookie any worker made is good at any other, should the group change.
"""
from __future__ import annotations

from typing import Dict, Iterator, Optional, Tuple

from OpenSSL import SSL
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from relay.core.client import Client
from relay.core.server import TurnServer
from relay.net.listeners import LoginDispatcher, StreamLimits
from relay.net.tls import ServerDTLS
from relay.proto import stun

Address = Tuple[str, int]
log = Logger(namespace="turnrelay")
HANDSHAKE = 22  # DTLS record content type
_HANDSHAKE_BYTE = bytes([HANDSHAKE])
RECORD_HEADER = 13  # type, version, epoch and sequence number, length
MTU = 1200  # handshake flights are cut to datagrams of at most this many bytes
HALF_OPEN = 256  # sessions in their handshake at once, per process
SWEEP = 0.5  # seconds between two looks at handshake retransmissions and idle sessions
_SEND_INDICATION = stun.SEND_INDICATION


class DtlsSession:
    """One client address's DTLS connection, and its `Client` for the core."""

    __slots__ = ("connection", "address", "listener", "client", "established", "since")

    def __init__(self, listener: "DtlsListener", connection: SSL.Connection, address: Address,
                 now: float):
        self.listener = listener
        self.connection = connection
        self.address = address
        self.established = False
        self.since = now  # the handshake's start, then the last sweep that saw an allocation
        self.client = Client("dtls", listener.listener, address, self.send)

    def send(self, data: bytes) -> None:
        """One STUN message or ChannelData to the client, as one record in one datagram
        (read at once: a second, empty read would cost an exception a packet)."""
        try:
            self.connection.send(data)
            self.listener.sendto(self.connection.bio_read(65536), self.address)
        except SSL.Error:
            pass  # a session being torn down: UDP may drop, and so may we


class DtlsListener(DatagramProtocol):
    """A DTLS client listener: sessions by client address, each feeding the core."""

    noisy = False

    def __init__(self, server: TurnServer, dispatch: LoginDispatcher, listener: Address,
                 tls: ServerDTLS, limits: StreamLimits, clock: IReactorTime):
        self.server = server
        self.dispatch = dispatch
        self.listener = listener
        self.tls = tls
        self.limits = limits
        self.clock = clock
        self.sessions: Dict[Address, DtlsSession] = {}
        self.half_open = 0
        self.sweeper = LoopingCall(self.sweep)
        self.sweeper.clock = clock

    def startProtocol(self) -> None:
        self._sendto = self.transport.socket.sendto
        self.sweeper.start(SWEEP, now=False)

    def stopProtocol(self) -> None:
        if self.sweeper.running:
            self.sweeper.stop()
        for session in list(self.sessions.values()):
            self.end(session)

    def datagramReceived(self, data: bytes, addr: Address) -> None:
        session = self.sessions.get(addr)
        # A handshake record of epoch 0 is a new ClientHello: a client that started over.
        if session is None or (data[:1] == _HANDSHAKE_BYTE and data[3:5] == b"\0\0"
                               and session.established):
            self.hello(data, addr, session)
            return
        connection = session.connection
        try:
            connection.bio_write(data)
            if not session.established:
                if not self.handshake(session):
                    return
            while True:
                self.received(session.client, connection.recv(65536))
        except SSL.WantReadError:
            pass
        except SSL.ZeroReturnError:  # close_notify
            self.end(session)
        except SSL.Error as err:
            log.info("DTLS session of {host}:{port} failed: {err}", host=addr[0], port=addr[1],
                     err=_reason(err))
            self.end(session)

    def hello(self, data: bytes, addr: Address, old: Optional[DtlsSession]) -> None:
        """A datagram from an address without a session (or a new ClientHello from one with
        `old`): a session only for a ClientHello with a valid cookie, which replaces `old`; a
        HelloVerifyRequest for one without; nothing for anything else."""
        if len(data) < 13 or data[0] != HANDSHAKE:
            return
        connection = SSL.Connection(self.tls.context, None)
        connection.set_accept_state()
        connection.set_ciphertext_mtu(MTU)
        connection.set_app_data(addr)  # for the cookie
        try:
            connection.bio_write(data)
            connection.DTLSv1_listen()
        except SSL.WantReadError:
            self.flush(connection, addr)  # the HelloVerifyRequest, or nothing
            return
        except SSL.Error:
            return
        if old is not None:
            self.end(old)
        if self.half_open >= HALF_OPEN or not self.limits.admit(addr[0]):
            return
        session = self.sessions[addr] = DtlsSession(self, connection, addr, self.clock.seconds())
        self.half_open += 1
        self.handshake(session)

    def handshake(self, session: DtlsSession) -> bool:
        """Drive the handshake; whether it is complete.  A failed one (a DTLS 1.0 client, no
        common cipher) is answered with its alert and ends the session."""
        try:
            session.connection.do_handshake()
        except SSL.WantReadError:
            self.flush(session.connection, session.address)
            return False
        except SSL.Error as err:
            self.flush(session.connection, session.address)
            log.info("DTLS handshake with {host}:{port} failed: {err}", host=session.address[0],
                     port=session.address[1], err=_reason(err))
            self.end(session)
            return False
        self.flush(session.connection, session.address)
        session.established = True
        session.since = self.clock.seconds()
        self.half_open -= 1
        return True

    def received(self, client: Client, data: bytes) -> None:
        """One application record: ChannelData, a Send indication, or a request."""
        if len(data) < 4:
            return
        if 0x40 <= data[0] < 0x80:
            self.server.channel_data(client, data)
        elif data[0] == 0 and data[1] == _SEND_INDICATION:
            self.server.send_indication(client, data)
        else:
            self.dispatch(client, data)

    def flush(self, connection: SSL.Connection, address: Address) -> None:
        """Send what the connection wrote (a handshake flight, an alert), whole records in
        datagrams of at most `MTU` bytes: the memory BIO runs them together."""
        written = b""
        while True:
            try:
                written += connection.bio_read(65536)
            except SSL.WantReadError:
                break
        for datagram in datagrams(written, MTU):
            self.sendto(datagram, address)

    def sendto(self, datagram: bytes, address: Address) -> None:
        try:
            self._sendto(datagram, address)
        except OSError:
            pass  # a full buffer or an ICMP error: UDP may drop

    def end(self, session: DtlsSession) -> None:
        if self.sessions.get(session.address) is not session:
            return
        del self.sessions[session.address]
        if not session.established:
            self.half_open -= 1
        self.limits.release(session.address[0])
        session.client.connected = False
        self.server.connection_lost(session.client)
        try:
            session.connection.shutdown()
            self.flush(session.connection, session.address)
        except SSL.Error:
            pass

    def sweep(self) -> None:
        """Handshake retransmissions, and the end of sessions past their time."""
        now = self.clock.seconds()
        limits, allocations = self.limits, self.server.allocations
        for session in list(self.sessions.values()):
            if not session.established:
                if limits.handshake_timeout and now - session.since > limits.handshake_timeout:
                    limits.timed_out += 1
                    self.end(session)
                    continue
                try:
                    if session.connection.DTLSv1_handle_timeout():
                        self.flush(session.connection, session.address)
                except SSL.Error:
                    self.end(session)
            elif session.client.key in allocations:
                session.since = now
            elif limits.idle_timeout and now - session.since > limits.idle_timeout:
                limits.timed_out += 1
                self.end(session)



def datagrams(records: bytes, mtu: int) -> Iterator[bytes]:
    """DTLS records (13-byte headers, the length last) packed whole into datagrams of at most
    `mtu` bytes; a record longer than that goes alone."""
    start = end = 0
    while end + RECORD_HEADER <= len(records):
        size = RECORD_HEADER + int.from_bytes(records[end + 11:end + 13], "big")
        if end > start and end + size - start > mtu:
            yield records[start:end]
            start = end
        end += size
    if len(records) > start:
        yield records[start:]


def _reason(err: SSL.Error) -> str:
    """OpenSSL's reason text ("unsupported protocol"), or the error's own."""
    try:
        return "; ".join(reason for _, _, reason in err.args[0]) or repr(err)
    except (IndexError, TypeError, ValueError):
        return repr(err)
