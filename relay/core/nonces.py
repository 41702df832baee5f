"""Stateless nonces: any process holding the same secret accepts a nonce another one issued.

A nonce is `[cookie]` + base64url(issue time, 4 bytes | HMAC-SHA256 truncated to 12 bytes)
where the MAC covers the cookie, the time and the client's IP address.  The cookie is RFC 8489
section 9.2's "obMatJos2" followed by the security feature set; covering it with the MAC is
what stops an attacker from stripping the features to force a downgrade to MD5.
"""
from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import os
import struct
from typing import Dict, Optional, Sequence, Tuple

from relay.util.keyed_hmac import hmac_digest
from relay.util.secretfile import read_secrets

COOKIE = "obMatJos2"
FEATURE_PASSWORD_ALGORITHMS = 0x800000
FEATURE_USERNAME_ANONYMITY = 0x400000
CLOCK_SKEW = 30  # seconds a nonce may come from the future: clocks of a fleet differ a little


class NonceStatus(enum.Enum):
    VALID = "valid"
    STALE = "stale"
    INVALID = "invalid"


def load_secrets(path: Optional[str]) -> list:
    """Keys from `--nonce-secret-file` (one per line, the first signs, the others verify), or a
    fresh random key: fine for one process, but a fleet must share the file."""
    if path is None:
        return [os.urandom(32)]
    keys = read_secrets(path)
    if len(keys) > 2:
        raise ValueError(f"{path} holds {len(keys)} secrets: one, or two while rotating")
    return keys


class NonceIssuer:
    """Issues and checks nonces with fixed `secrets` (the first signs).

    A nonce is checked on every authenticated request, and the clients behind one address
    share it within a second, so the issue time of each one whose MAC verified is kept (at
    most `KEPT`, then all forgotten): its next check is a lookup and the age test.
    """

    KEPT = 4096

    def __init__(self, secrets: Sequence[bytes], lifetime: float, features: int):
        self.secrets = tuple(secrets)
        self.lifetime = lifetime
        self.features = features
        self.prefix = COOKIE + base64.b64encode(features.to_bytes(3, "big")).decode() if features else ""
        self._verified: Dict[Tuple[str, str], int] = {}  # (nonce, client IP) -> issue time
        self._issued: Dict[str, str] = {}  # client IP -> its nonce of `_issued_second`
        self._issued_second = -1

    def _mac(self, secret: bytes, prefix: str, stamp: bytes, client_ip: str) -> bytes:
        data = prefix.encode() + stamp + client_ip.encode()
        return hmac_digest(secret, data, hashlib.sha256)[:12]

    def issue(self, client_ip: str, now: float) -> str:
        """The nonce for `client_ip` this second: the same for every client behind that
        address until the second ends, so it is made once (many clients behind one NAT
        arrive together in a reconnect storm) and kept until then."""
        second = int(now) & 0xFFFFFFFF
        if second != self._issued_second:
            self._issued, self._issued_second = {}, second
        nonce = self._issued.get(client_ip)
        if nonce is None:
            stamp = struct.pack("!I", second)
            mac = self._mac(self.secrets[0], self.prefix, stamp, client_ip)
            nonce = self.prefix + base64.urlsafe_b64encode(stamp + mac).decode()
            if len(self._issued) >= self.KEPT:
                self._issued = {}
            self._issued[client_ip] = nonce
        return nonce

    def check(self, nonce: str, client_ip: str, now: float) -> NonceStatus:
        issued = self._verified.get((nonce, client_ip))
        if issued is None:
            issued = self._verify(nonce, client_ip)
            if issued is None:
                return NonceStatus.INVALID
            if len(self._verified) >= self.KEPT:
                self._verified.clear()
            self._verified[nonce, client_ip] = issued
        # Signed 32-bit age: a nonce from a fleet member whose clock runs a little ahead is
        # young, not 136 years old.
        age = ((int(now) - issued + 2**31) & 0xFFFFFFFF) - 2**31
        return NonceStatus.VALID if -CLOCK_SKEW <= age <= self.lifetime else NonceStatus.STALE

    def _verify(self, nonce: str, client_ip: str) -> Optional[int]:
        """The issue time of a nonce one of our secrets signed for `client_ip`, else None."""
        if not nonce.startswith(self.prefix):
            return None
        try:
            blob = base64.urlsafe_b64decode(nonce[len(self.prefix):].encode())
        except ValueError:
            return None
        if len(blob) != 16:
            return None
        stamp, mac = blob[:4], blob[4:]
        for secret in self.secrets:
            if hmac.compare_digest(mac, self._mac(secret, self.prefix, stamp, client_ip)):
                return struct.unpack("!I", stamp)[0]
        return None
