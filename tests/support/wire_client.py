"""The wire tests' client: relay.cli.turnclient over UDP, from an address on the server's host.

It does what coturn's and aioice's clients cannot be told to do: dual allocations with
ADDITIONAL-ADDRESS-FAMILY, SHA-256 and USERHASH, forbidden peers, nonces carried between
servers.  Every wait is on a reply, bounded by the client's timeout.
"""
from __future__ import annotations

from typing import Tuple

from relay.cli.turnclient import UDP, TurnClient, error_code

__all__ = ["WireClient", "error_code"]


def WireClient(server: Tuple[str, int], username: str, password: str, realm: str) -> TurnClient:
    return TurnClient.connect(UDP, server, username, password, realm, bind_host=server[0])
