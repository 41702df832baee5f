"""Where clients reach a region's relays, written as WebRTC `iceServers` entries, and which
region a client should use.

The tokens API hands each credential out with the ICE servers of the region nearest the end
user, followed by the next nearest as a fallback (`choose`).  It knows its own region (its
--public-host and its own listening ports) and those of --regions-file, a TOML file of the
form

    [regions.eu-west]
    host = "turn-eu.example.org"   # required: a DNS name or an IP address
    port = 3478                    # UDP and TCP, default 3478
    tls-port = 5349                # TLS, default 5349
    latitude = 53.35               # where its relays are, in degrees (both or neither)
    longitude = -6.26
    country = "IE"                 # optional, ISO 3166 alpha-2
    continent = "EU"               # optional: AF AN AS EU NA OC SA
    ready = true                   # default true: false while the region cannot serve
    draining = false               # default false: true while it is being emptied

A region is only a public address here: minting needs no contact with its relays, since every
region shares the account database and the secret file.  A region that is not ready or is
draining is never handed out first; the relay re-reads the file when it changes, so whoever
writes it (an operator, a health checker) takes a region out within seconds.

This module is sans-IO: the tokens API locates the client (`relay.web.geoip`) and passes its
coordinates in.
"""
from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

DEFAULT_PORT, DEFAULT_TLS_PORT = 3478, 5349
AUTO = "auto"  # the tokens API's `region` value asking for the nearest region
CONTINENTS = ("AF", "AN", "AS", "EU", "NA", "OC", "SA")
EARTH_RADIUS_KM = 6371.0
_HOSTNAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")
_COUNTRY = re.compile(r"[A-Z]{2}")
_KEYS = {"host", "port", "tls-port", "latitude", "longitude", "country", "continent", "ready",
         "draining"}

Point = Tuple[float, float]  # latitude, longitude in degrees


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
    """A region's public host and ports (a port of None is a transport it does not serve),
    where it is, and whether it serves."""
    host: str
    udp_port: Optional[int] = DEFAULT_PORT
    tcp_port: Optional[int] = DEFAULT_PORT
    tls_port: Optional[int] = DEFAULT_TLS_PORT
    location: Optional[Point] = None
    country: Optional[str] = None
    continent: Optional[str] = None
    ready: bool = True
    draining: bool = False

    @property
    def serving(self) -> bool:
        return self.ready and not self.draining

    @property
    def state(self) -> str:
        return "draining" if self.draining else "ready" if self.ready else "not ready"

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


def _degrees(entry: Mapping[str, Any], key: str, limit: int) -> float:
    value = entry[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not -limit <= value <= limit:
        raise ValueError(f"{key}: {value!r} is not a number of degrees from {-limit} to {limit}")
    return float(value)


def _location(entry: Mapping[str, Any]) -> Optional[Point]:
    if "latitude" not in entry and "longitude" not in entry:
        return None
    for key in ("latitude", "longitude"):
        if key not in entry:
            raise ValueError(f"{key}: required with "
                             f"{'longitude' if key == 'latitude' else 'latitude'}")
    return _degrees(entry, "latitude", 90), _degrees(entry, "longitude", 180)


def _code(entry: Mapping[str, Any], key: str) -> Optional[str]:
    value = entry.get(key)
    if value is None:
        return None
    if key == "country" and not (isinstance(value, str) and _COUNTRY.fullmatch(value)):
        raise ValueError(f"country: {value!r} is not an ISO 3166 code such as \"IE\"")
    if key == "continent" and value not in CONTINENTS:
        raise ValueError(f"continent: {value!r} is not one of {' '.join(CONTINENTS)}")
    return value


def _flag(entry: Mapping[str, Any], key: str, default: bool) -> bool:
    value = entry.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"{key}: {value!r} is not true or false")
    return value


def regions_from_table(table: Mapping[str, Any]) -> Dict[str, Region]:
    """The regions of a parsed --regions-file; ValueError naming the region and key at fault.

    An empty file holds no regions yet: the Kubernetes operator's directory is one until the
    first region has a public address, and its relays start before that."""
    if not table:
        return {}
    regions = table.get("regions")
    if not isinstance(regions, dict) or not regions or set(table) != {"regions"}:
        raise ValueError("expected [regions.NAME] tables and nothing else")
    parsed = {}
    for name, entry in regions.items():
        try:
            if name == AUTO:
                raise ValueError(f"{AUTO!r} is the tokens API's word for the nearest region")
            if not isinstance(entry, dict):
                raise ValueError("expected a table with host = ...")
            unknown = set(entry) - _KEYS
            if unknown:
                raise ValueError(f"unknown key {sorted(unknown)[0]!r}")
            if not isinstance(entry.get("host"), str):
                raise ValueError("host = \"...\" is required")
            port = _port(entry, "port", DEFAULT_PORT)
            parsed[name] = Region(check_host(entry["host"]), port, port,
                                  _port(entry, "tls-port", DEFAULT_TLS_PORT), _location(entry),
                                  _code(entry, "country"), _code(entry, "continent"),
                                  _flag(entry, "ready", True), _flag(entry, "draining", False))
        except ValueError as err:
            raise ValueError(f"region {name!r}: {err}") from None
    return parsed


def great_circle_km(a: Point, b: Point) -> float:
    """The haversine distance between two points on a spherical Earth."""
    lat1, lon1, lat2, lon2 = map(math.radians, (*a, *b))
    h = math.sin((lat2 - lat1) / 2) ** 2 \
        + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(h)))


class NoRegionServing(Exception):
    """Every known region is draining or not ready."""


@dataclass(frozen=True)
class Choice:
    """The region a credential's ICE servers come from first, the one after it (None when no
    other region serves), why (`geoip`, `pinned` or `default`) and, when the answer is not
    what was asked for, a note saying so.  `order` is every serving region in the order
    they are handed out (first, second, then the rest by the same distance), for a client
    that measures several before it picks (the tokens API's `regions=N`, /v1/ice.js)."""
    first: str
    second: Optional[str]
    reason: str
    note: Optional[str] = None
    order: Tuple[str, ...] = ()


def _by_distance(regions: Mapping[str, Region], point: Optional[Point]) -> List[str]:
    """Serving regions nearest `point` first; those of unknown location (or all, when `point`
    is unknown) after them by name."""
    def key(name: str) -> Tuple[float, str]:
        where = regions[name].location
        return (great_circle_km(point, where) if point and where else math.inf), name
    return sorted((name for name, region in regions.items() if region.serving), key=key)


def choose(regions: Mapping[str, Region], default: str, requested: Optional[str],
           client: Optional[Point], unlocated: str = "") -> Choice:
    """The regions to hand out: `requested` (a name, None or AUTO, checked by the caller)
    when it serves, else the serving region nearest the client (`client`, None when it could
    not be located: `unlocated` says why), else the `default` region, or the serving one
    nearest it.  The second is the serving region nearest to the client, or to the first."""
    if requested is None and len(regions) > 1:
        requested = AUTO
    if requested not in (None, AUTO):
        reason, anchor, note = "pinned", regions[requested].location, None
        if not regions[requested].serving:
            note = f"{requested} is {regions[requested].state}: the nearest serving region"
    elif requested == AUTO and client is not None:
        reason, anchor, note, requested = "geoip", client, None, ""
    else:
        reason, anchor, requested = "default", regions[default].location, default
        note = unlocated or None
        if not regions[default].serving:
            note = f"{note + '; ' if note else ''}{default} is {regions[default].state}: " \
                   "the nearest serving region"
    order = _by_distance(regions, anchor)
    if not order:
        raise NoRegionServing("no region is ready: every one is draining or not ready")
    if requested in order:  # a serving pinned or default region leads whatever its location
        order.remove(requested)
        order.insert(0, requested)
    if reason != "geoip" and len(order) > 1:  # the fallback is the region nearest the first
        rest = _by_distance({name: regions[name] for name in order[1:]},
                            regions[order[0]].location)
        order[1:] = rest
    return Choice(order[0], order[1] if len(order) > 1 else None, reason, note, tuple(order))
