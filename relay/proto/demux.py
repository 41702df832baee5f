"""Telling TURN from HTTP by the first bytes of a stream, for a port that serves both.

A new TURN connection opens with a STUN message (RFC 8656: an Allocate, a Binding, or RFC
6062's ConnectionBind), whose first byte is below 0x40; ChannelData (0x40-0x7F) needs a channel
bound on the same connection first, so it never opens one, but the TURN framing judges it
anyway.  An HTTP request line opens with an upper-case method and a space.  What is neither
goes to TURN, whose framing closes the connection.
"""
from __future__ import annotations

from typing import Optional

TURN, HTTP = "turn", "http"
HTTP_METHODS = (b"GET ", b"HEAD ", b"POST ", b"PUT ", b"DELETE ", b"OPTIONS ", b"PATCH ")
ALPN_TURN = b"stun.turn"  # RFC 7443
ALPN_STUN = b"stun.nat-discovery"  # RFC 7443: STUN alone, which a TURN port serves too
ALPN_STUN_TURN = (ALPN_TURN, ALPN_STUN)  # in order of preference
ALPN_HTTP = b"http/1.1"


def stream_kind(data: bytes) -> Optional[str]:
    """TURN or HTTP for a connection whose first bytes are `data`; None while a few more
    bytes (at most 8 in all) are needed to tell."""
    if not data:
        return None
    if not 0x40 <= data[0] < 0x80:
        return TURN
    for method in HTTP_METHODS:
        if data.startswith(method):
            return HTTP
        if method.startswith(data):
            return None
    return TURN
