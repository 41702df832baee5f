"""TLS for the stream listeners: our own pyOpenSSL context, versions and ciphers pinned.

An `ssl:` endpoint string can set neither protocol versions nor ciphers and cannot swap a
certificate, so the context is built here.  `reload` swaps in a new certificate: connections
made after it use the new one, established sessions keep theirs.  `reload_if_changed` does it
when the files' contents changed, for certificates replaced without a signal (Kubernetes
updates a mounted Secret in place, by swapping a symlink).
"""
from __future__ import annotations

import datetime
import hashlib
import hmac
import os
import socket
import time
from typing import Callable, List, Optional, Sequence, Tuple

from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from zope.interface import implementer

TLS_VERSIONS = {
    "1.2": SSL.TLS1_2_VERSION,
    "1.3": SSL.TLS1_3_VERSION,
}
# ECDHE key exchange with AEAD ciphers only; TLS 1.3 suites are AEAD by construction.
CIPHERS = b"ECDHE+AESGCM:ECDHE+CHACHA20"


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """`alpn`: the application protocols (RFC 7301) this listener speaks, in order of
    preference: the first the client also offers is chosen; none, when it offers none of them
    (or sends no ALPN at all, as browsers' `turns:` does)."""

    method = SSL.TLS_SERVER_METHOD

    def __init__(self, cert: str, key: str, min_version: str = "1.2", max_version: str = "1.2",
                 alpn: Sequence[bytes] = ()):
        self.cert, self.key = cert, key
        self.min_version, self.max_version = TLS_VERSIONS[min_version], TLS_VERSIONS[max_version]
        self.alpn = tuple(alpn)
        self.loaded: Optional[bytes] = None  # digest of the files as last loaded (or tried)
        self.context = self._context()

    def _digest(self) -> Optional[bytes]:
        """SHA-256 of certificate and key as they are now; None while one cannot be read.
        Contents, not mtime or inode: a symlink swap, a copy over, a same-second rewrite all
        show, and two small files a few seconds apart cost nothing."""
        digest = hashlib.sha256()
        try:
            for path in (self.cert, self.key):
                with open(path, "rb") as f:
                    digest.update(f.read())
        except OSError:
            return None
        return digest.digest()

    def _versions(self) -> Tuple[int, int]:
        return self.min_version, self.max_version

    def _context(self) -> SSL.Context:
        # Read before loading: a change racing the load is then seen again at the next look.
        self.loaded = self._digest()
        ctx = SSL.Context(self.method)
        low, high = self._versions()
        ctx.set_min_proto_version(low)
        ctx.set_max_proto_version(high)
        ctx.set_cipher_list(CIPHERS)
        ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE
                        | SSL.OP_NO_RENEGOTIATION | SSL.OP_NO_TICKET)
        ctx.use_certificate_chain_file(self.cert)
        ctx.use_privatekey_file(self.key)
        ctx.check_privatekey()
        if self.alpn:
            ctx.set_alpn_select_callback(self._select_protocol)
        return ctx

    def _select_protocol(self, connection: SSL.Connection, offered: List[bytes]) -> bytes:
        for protocol in self.alpn:
            if protocol in offered:
                return protocol
        return SSL.NO_OVERLAPPING_PROTOCOLS  # type: ignore[return-value]

    def reload(self) -> None:
        """Re-read certificate and key; on error keep serving the old ones (and raise)."""
        self.context = self._context()

    def reload_if_changed(self) -> bool:
        """`reload` if the files changed since the last load; whether they had.  A pair that
        fails to load is not tried again until it changes once more."""
        digest = self._digest()
        if digest is None or digest == self.loaded:
            return False
        self.reload()
        return True

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        return SSL.Connection(self.context, None)


DTLS1_2_VERSION = 0xFEFD  # pyOpenSSL names no DTLS version
COOKIE_SIZE = 16
COOKIE_PERIOD = 60.0  # seconds


class ServerDTLS(ServerTLS):
    """The DTLS listeners' context (RFC 7350): the TLS listeners' certificate, reload, ciphers
    and options, DTLS 1.2 only, and the stateless cookie exchange of RFC 6347 section 4.2.1.

    A cookie is an HMAC of the client's address and port and of the current `COOKIE_PERIOD`
    under `cookie_key`: it proves the client receives at that address, any process holding the
    key (every worker: it is derived from the nonce keys they share) checks it without having
    kept anything, and one seen on the wire is good for two periods at most, not forever.
    `relay.net.dtls` sets each connection's app data to its client's address for this.
    """

    method = SSL.DTLS_SERVER_METHOD

    def __init__(self, cert: str, key: str, cookie_key: bytes, alpn: Sequence[bytes] = (),
                 clock: Callable[[], float] = time.time):
        self.cookie_key = cookie_key
        self.clock = clock
        super().__init__(cert, key, alpn=alpn)

    def _versions(self) -> Tuple[int, int]:
        return DTLS1_2_VERSION, DTLS1_2_VERSION

    def _context(self) -> SSL.Context:
        ctx = super()._context()
        ctx.set_options(SSL.OP_COOKIE_EXCHANGE | SSL.OP_NO_QUERY_MTU)
        ctx.set_cookie_generate_callback(self.cookie)
        ctx.set_cookie_verify_callback(self.cookie_valid)
        return ctx

    def cookie(self, connection: SSL.Connection, periods_ago: int = 0) -> bytes:
        host, port = connection.get_app_data()
        period = int(self.clock() // COOKIE_PERIOD) - periods_ago
        return hmac.new(self.cookie_key, f"{host} {port} {period}".encode(),
                        hashlib.sha256).digest()[:COOKIE_SIZE]

    def cookie_valid(self, connection: SSL.Connection, cookie: bytes) -> bool:
        """This period's cookie, or the last one's (a client answering across the turn)."""
        return any(hmac.compare_digest(cookie, self.cookie(connection, ago)) for ago in (0, 1))


def self_signed(state_dir: str) -> Tuple[str, str, bool]:
    """A certificate for first runs without one: made once, kept in the state directory.

    Returns (cert path, key path, whether it was just made).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    cert_path = os.path.join(state_dir, "self-signed-cert.pem")
    key_path = os.path.join(state_dir, "self-signed-key.pem")
    if os.path.exists(cert_path) and os.path.exists(key_path):
        return cert_path, key_path, False
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, socket.gethostname())])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=825))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(socket.gethostname())]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path, True
