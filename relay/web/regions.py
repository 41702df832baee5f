"""Where clients reach a region's relays, written as WebRTC `iceServers` entries.

The tokens API hands each credential out with the ICE servers of one region: by default the
relay's own (its --public-host and its own listening ports), or another one named in
--regions-file, a TOML file of the form

    [regions.eu-west]
    host = "turn-eu.example.org"   # required: a DNS name or an IP address
    port = 3478                    # UDP and TCP, default 3478
    tls-port = 5349                # TLS, default 5349

A region is only a public address here: minting needs no contact with its relays, since every
region shares the account database and the secret file.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional

DEFAULT_PORT, DEFAULT_TLS_PORT = 3478, 5349
_HOSTNAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")


def check_host(host: str) -> str:
    """`host` itself when it is a DNS name or an IP address, else ValueError: it goes into
    URLs that browsers parse, so nothing else may slip in."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _HOSTNAME.fullmatch(host) or len(host) > 253:
            raise ValueError(f"{host!r} is not a host name or an IP address") from None
    return host


@dataclass(frozen=True)
class Region:
    """A region's public host and ports; a port of None is a transport it does not serve."""
    host: str
    udp_port: Optional[int] = DEFAULT_PORT
    tcp_port: Optional[int] = DEFAULT_PORT
    tls_port: Optional[int] = DEFAULT_TLS_PORT

    def ice_servers(self, username: str, credential: str) -> List[Dict[str, str]]:
        """STUN, then TURN over UDP, TCP and TLS, in the order clients should try them."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        servers = [{"urls": f"stun:{host}:{self.udp_port}"}] if self.udp_port is not None else []
        for scheme, port, transport in (("turn", self.udp_port, "udp"),
                                        ("turn", self.tcp_port, "tcp"),
                                        ("turns", self.tls_port, "tcp")):
            if port is not None:
                servers.append({"urls": f"{scheme}:{host}:{port}?transport={transport}",
                                "username": username, "credential": credential})
        return servers


def _port(entry: Mapping[str, Any], key: str, default: int) -> int:
    value = entry.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError(f"{key}: {value!r} is not a port number")
    return value


def regions_from_table(table: Mapping[str, Any]) -> Dict[str, Region]:
    """The regions of a parsed --regions-file; ValueError naming the region and key at fault."""
    regions = table.get("regions")
    if not isinstance(regions, dict) or not regions or set(table) != {"regions"}:
        raise ValueError("expected [regions.NAME] tables and nothing else")
    parsed = {}
    for name, entry in regions.items():
        try:
            if not isinstance(entry, dict):
                raise ValueError("expected a table with host = ...")
            unknown = set(entry) - {"host", "port", "tls-port"}
            if unknown:
                raise ValueError(f"unknown key {sorted(unknown)[0]!r}")
            if not isinstance(entry.get("host"), str):
                raise ValueError("host = \"...\" is required")
            port = _port(entry, "port", DEFAULT_PORT)
            parsed[name] = Region(check_host(entry["host"]), port, port,
                                  _port(entry, "tls-port", DEFAULT_TLS_PORT))
        except ValueError as err:
            raise ValueError(f"region {name!r}: {err}") from None
    return parsed
