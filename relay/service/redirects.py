"""Keeps a relay's redirect targets current (relay.core.redirect makes the choice).

Every second, in every process (each worker answers its own Allocates): the other relays of
this region from --alternate-servers-file (`AlternatesFile`), and the other regions of
--regions-file that serve (ready, not draining), nearest this relay's region first by
great-circle distance (regions without a location after those with, by name).  A region is
reached at its `host`: an IP address is used as it is, a host name is resolved once per
change of the file (in a thread: getaddrinfo blocks) and also sent as ALTERNATE-DOMAIN to TLS
clients, the name their certificate check needs.  This relay's own region is left out: its
address in the file is this relay's own, or its load balancer's, which may lead back here.
"""
from __future__ import annotations

import math
import socket
from typing import Callable, Dict, List, Mapping, Tuple

from twisted.internet import threads
from twisted.logger import Logger

from relay.core.peers import is_ip
from relay.core.redirect import Alternate, Tier
from relay.core.server import TurnServer
from relay.util.tomlfile import read_toml
from relay.web.regions import Region, great_circle_km, regions_from_table

log = Logger(namespace="turnrelay")


def region_tiers(regions: Mapping[str, Region], own: str,
                 addresses: Mapping[str, Tuple[str, ...]]) -> Tuple[Tier, ...]:
    """The serving regions other than `own`, nearest `own` first, each as its alternates:
    UDP/TCP and TLS on each of its host's `addresses` (an IP host is its own address)."""
    anchor = regions[own].location if own in regions else None

    def distance(name: str) -> Tuple[float, str]:
        where = regions[name].location
        return (great_circle_km(anchor, where) if anchor and where else math.inf), name
    tiers = []
    for name in sorted((n for n, r in regions.items() if n != own and r.serving), key=distance):
        region = regions[name]
        ips = (region.host,) if is_ip(region.host) else addresses.get(region.host, ())
        domain = None if is_ip(region.host) else region.host
        tier: List[Alternate] = []
        for ip in ips:
            port = region.udp_port if region.udp_port is not None else region.tcp_port
            if port is not None:
                tier.append(Alternate((ip, port)))
            if region.tls_port is not None:
                tier.append(Alternate((ip, region.tls_port), True, domain))
        if tier:
            tiers.append(tuple(tier))
    return tuple(tiers)


def _resolve(host: str) -> Tuple[str, ...]:
    found = socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
    return tuple(dict.fromkeys(info[4][0] for info in found))


class RegionRedirects:
    """A look at --regions-file (called every second): when it changed, the server's region
    tiers again, once the host names in it are resolved.  A file that does not load keeps
    the old tiers (the tokens API's watch logs it)."""

    def __init__(self, server: TurnServer, path: str, own: str,
                 stamp: Callable[[str], object], resolve=None):
        self.server, self.path, self.own, self.stamp = server, path, own, stamp
        self.resolve = resolve or (lambda host: threads.deferToThread(_resolve, host))
        self._seen: object = None
        self._addresses: Dict[str, Tuple[str, ...]] = {}

    def look(self) -> None:
        stamp = self.stamp(self.path)
        if stamp == self._seen:
            return
        self._seen = stamp
        try:
            regions = regions_from_table(read_toml(self.path)) if stamp is not None else {}
        except ValueError:
            return
        self._addresses = {}
        self._apply(regions)
        for host in {r.host for r in regions.values() if not is_ip(r.host)}:
            d = self.resolve(host)
            d.addCallback(self._resolved, host, regions, stamp)
            d.addErrback(lambda failure, host=host: log.warn(
                "redirects: cannot resolve {host}: {err}", host=host, err=failure.value))

    def _resolved(self, ips: Tuple[str, ...], host: str, regions: Mapping[str, Region],
                  stamp: object) -> None:
        if stamp == self._seen:  # not a resolution of an older file's names
            self._addresses[host] = ips
            self._apply(regions)

    def _apply(self, regions: Mapping[str, Region]) -> None:
        tiers = region_tiers(regions, self.own, self._addresses)
        if tiers != self.server.redirects.regions:
            self.server.redirects.regions = tiers
            log.info("redirects beyond this region, nearest first: {tiers}",
                     tiers="; ".join(", ".join(_shown(a) for a in tier) for tier in tiers) or "none")


def _shown(alternate: Alternate) -> str:
    host, port = alternate.address
    text = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return f"{text} (TLS{', ' + alternate.domain if alternate.domain else ''})" if alternate.tls \
        else text

