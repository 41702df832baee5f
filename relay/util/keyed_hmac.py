"""HMAC under keys used again and again, with each key's padded hash states made once.

Every signed STUN request is checked and answered with an HMAC under its user's long-term key,
and every nonce is made and checked under the relay's nonce secret: the same few keys, over
and over.  `hmac.new` pads the key and hashes both pads for each message, and OpenSSL 3 also
looks its digest up by name each time: an HMAC-SHA1 of 100 bytes cost 4.05 us, four times a
plain SHA-1 of them (0.93 us, CPython 3.11 on the project machine).  Here the two padded
states of a key are hashed once and copied per message.

On PyPy the copies are made in C (`relay.util._keyed_hmac`, keyed_hmac.c), where that module
was built: there each `hashlib` object carries a lock and an OpenSSL context freed by a
finalizer, which only a major collection runs.  An HMAC took 2.5-3.2 us and a million of
them forced 123-127 major collections, whose finalizer step stalled a relay under Allocate
cycles for 40-70 ms each time; in C one takes 0.25-0.30 us and a million force none.  On
CPython, which frees a `hashlib` object at once, copying them is the faster way (0.52 against
0.76 us), so it stays.  Without the module (no OpenSSL headers at install), or for a digest
other than SHA-1 and SHA-256, `hashlib` makes them everywhere.

`hmac_digest(key, data, hashlib.sha1)` equals `hmac.new(key, data, hashlib.sha1).digest()`.
"""
from __future__ import annotations

import hashlib
import platform
from typing import Any, Callable, Dict, Optional, Tuple

try:
    from relay.util._keyed_hmac import ffi, lib
except ImportError:  # not built: `hashlib` makes every HMAC
    ffi = lib = None

BLOCK = 64  # the block size of SHA-1 and SHA-256, the digests STUN uses (RFC 2104's B)
KEPT = 4096  # keys whose states are kept, then all forgotten (one per user, plus secrets)
_INNER = bytes(b ^ 0x36 for b in range(256))
_OUTER = bytes(b ^ 0x5C for b in range(256))
_NATIVE = {hashlib.sha1: 0, hashlib.sha256: 1}  # what keyed_hmac.c's kh_new takes
NATIVE_FIRST = platform.python_implementation() == "PyPy"

Keyed = Callable[[bytes], bytes]  # the HMAC of a message under one key and digest
_keyed: Dict[Tuple[bytes, Callable[..., Any]], Keyed] = {}


def hmac_digest(key: bytes, data: bytes, digestmod: Callable[..., Any]) -> bytes:
    """HMAC (RFC 2104) of `data` under `key` with a `hashlib` constructor of a 64-byte block."""
    keyed = _keyed.get((key, digestmod))
    if keyed is None:
        if len(_keyed) >= KEPT:
            _keyed.clear()
        keyed = _keyed[key, digestmod] = ((NATIVE_FIRST and native(key, digestmod))
                                          or in_hashlib(key, digestmod))
    return keyed(data)


def native(key: bytes, digestmod: Callable[..., Any]) -> Optional[Keyed]:
    """HMACs under `key` by keyed_hmac.c, or None without the module or for another digest."""
    kind = _NATIVE.get(digestmod)
    if lib is None or kind is None:
        return None
    made = lib.kh_new(kind, key, len(key))
    if made == ffi.NULL:
        raise MemoryError("OpenSSL could not start an HMAC")
    states = ffi.gc(made, lib.kh_free)

    def keyed(data: bytes) -> bytes:
        # Into a bytearray: PyPy counts each `ffi.new` as memory pressure (6 more major
        # collections a million HMACs).
        out = bytearray(32)
        size = lib.kh_digest(states, data, len(data), ffi.from_buffer(out))
        if not size:
            raise MemoryError("OpenSSL could not finish an HMAC")
        return bytes(out[:size])
    return keyed


def in_hashlib(key: bytes, digestmod: Callable[..., Any]) -> Keyed:
    """HMACs under `key` from copies of `hashlib` objects of its two padded states."""
    padded = (digestmod(key).digest() if len(key) > BLOCK else key).ljust(BLOCK, b"\0")
    inner_state, outer_state = digestmod(padded.translate(_INNER)), digestmod(padded.translate(_OUTER))

    def keyed(data: bytes) -> bytes:
        inner = inner_state.copy()
        inner.update(data)
        outer = outer_state.copy()
        outer.update(inner.digest())
        return outer.digest()
    return keyed
