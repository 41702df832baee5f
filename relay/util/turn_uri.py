"""TURN URIs (RFC 7065): `turn:HOST[:PORT][?transport=udp|tcp]` and `turns:HOST[:PORT]`, as
the probe takes its target and a draining relay reads its alternates."""
from __future__ import annotations

import re
from typing import NamedTuple, Optional

DEFAULT_PORT, DEFAULT_TLS_PORT = 3478, 5349
_URI = re.compile(r"(?P<scheme>turns?):(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:?\[\]]+))"
                  r"(?::(?P<port>[0-9]{1,5}))?(?:\?transport=(?P<transport>udp|tcp))?")


class TurnUri(NamedTuple):
    secure: bool                 # turns:
    host: str                    # without the brackets of an IPv6 literal
    port: Optional[int]          # None: the scheme's default
    transport: Optional[str]     # "udp", "tcp" or None (turn: means either)


def parse_turn_uri(uri: str) -> TurnUri:
    """The parts of `uri`; ValueError saying what is wrong otherwise."""
    match = _URI.fullmatch(uri)
    if match is None:
        raise ValueError("expected turn:HOST[:PORT][?transport=udp|tcp] or turns:HOST[:PORT]")
    port = int(match["port"]) if match["port"] else None
    if port is not None and not 0 < port < 65536:
        raise ValueError("not a port number")
    return TurnUri(match["scheme"] == "turns", match["v6"] or match["host"], port, match["transport"])
