"""Which peer addresses a client may relay to: no open relay into the operator's network.

The address check runs when a permission or channel is installed, never per packet: relaying
needs a permission, so a peer that never passed this check is never reached.  The relay's own
listening endpoints are refused by address and port, so Send indications (whose permission is
for an IP address, any port) check them too, with one set lookup on the port first.
"""
from __future__ import annotations

import ipaddress
from typing import Any, Dict, Iterable, List, Optional, Set, Tuple, Union

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

LOOPBACK = tuple(ipaddress.ip_network(n) for n in ("127.0.0.0/8", "::1/128"))

# Destinations a relay must not reach on its own initiative: this host, the operator's private
# networks, the cloud metadata service (169.254.169.254 is link-local), and addresses that are
# not unicast on the internet.
FORBIDDEN = LOOPBACK + tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8",          # "this network"
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",  # RFC 1918
    "100.64.0.0/10",      # carrier-grade NAT (RFC 6598)
    "169.254.0.0/16",     # link-local, cloud metadata
    "192.0.0.0/24",       # IETF protocol assignments
    "192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24",  # documentation
    "198.18.0.0/15",      # benchmarking
    "224.0.0.0/4",        # multicast
    "240.0.0.0/4",        # reserved, broadcast
    "::/128",             # unspecified
    "100::/64",           # discard
    "2001:db8::/32",      # documentation
    "fc00::/7",           # unique local
    "fe80::/10",          # link-local
    "fec0::/10",          # site-local (deprecated)
    "ff00::/8",           # multicast
))

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_V4_COMPATIBLE = ipaddress.ip_network("::/96")


def embedded_ipv4(address: ipaddress.IPv6Address) -> Optional[ipaddress.IPv4Address]:
    """The IPv4 address an IPv6 address stands for: v4-mapped, v4-compatible, NAT64, 6to4."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64 or (address in _V4_COMPATIBLE and int(address) > 1):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def is_ip(value: str) -> bool:
    """Whether `value` is an IPv4 or IPv6 address (not a host name, not a network)."""
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def parse_rule(text: str) -> Tuple[IPAddress, IPAddress]:
    """An operator rule: one address, a CIDR network, or a coturn-style range `first-last`."""
    if "-" in text:
        first, last = (ipaddress.ip_address(part.strip()) for part in text.split("-", 1))
        if first.version != last.version or int(first) > int(last):
            raise ValueError(f"{text!r} is not a range of addresses")
        return first, last
    network = ipaddress.ip_network(text.strip(), strict=False)
    return network[0], network[-1]


def _candidates(host: str) -> List[IPAddress]:
    """The address `host` names and the IPv4 address hidden in it, if any; [] for garbage."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return []
    if address.version == 6:
        inner = embedded_ipv4(address)
        if inner is not None:
            return [address, inner]
    return [address]


class OwnEndpoints:
    """The relay's own listening endpoints: client listeners, tokens API, metrics.

    Never a peer, whatever the rules allow (even loopback in a test setup, or an operator's
    allow rule): a client must not make the relay talk to itself (request loops, or the API
    reached from the relay's own trusted address).  Each service adds the endpoints it binds;
    a listener on a wildcard address answers on every address of this host: loopback and
    `local` (the relay and external addresses, and the interfaces' addresses tap.py finds).
    """

    def __init__(self, local: Iterable[str] = ()):
        self.ports: Set[int] = set()
        self.local: Set[IPAddress] = {ipaddress.ip_address(a) for a in local}
        self._exact: Set[Tuple[IPAddress, int]] = set()
        self._wildcard_ports: Set[int] = set()

    def add(self, host: str, port: int) -> None:
        address = ipaddress.ip_address(host)
        self.ports.add(port)
        if address.is_unspecified:
            self._wildcard_ports.add(port)
        else:
            self._exact.add((address, port))

    def __contains__(self, peer: Tuple[str, int]) -> bool:
        port = peer[1]
        if port not in self.ports:
            return False
        for address in _candidates(peer[0]):
            # A datagram to 0.0.0.0 or :: is delivered to this host, on whichever address.
            if address.is_unspecified or (address, port) in self._exact:
                return True
            if port in self._wildcard_ports and (address.is_loopback or address in self.local):
                return True
        return False


class PeerPolicy:
    """Cluster networks and the relay's own endpoints are never peers; then operator allow
    rules win over deny rules, which win over the built-in defaults."""

    # Verdicts kept per (host, live_relay), at most this many, then all forgotten: clients
    # of one media server or one call name the same peers over and over, and a verdict
    # parses the address and walks every rule.  New rules forget them all.
    KEPT = 4096

    def __init__(self, allowed: Iterable[str] = (), denied: Iterable[str] = (),
                 allow_loopback: bool = False, cluster: Iterable[str] = (),
                 own: Optional[OwnEndpoints] = None):
        self.allowed: List[Tuple[IPAddress, IPAddress]] = []
        self.denied: List[Tuple[IPAddress, IPAddress]] = []
        # Kubernetes pod and service networks (--cluster-cidr): above every allow rule, so an
        # operator allowing a private range for a media server cannot open the cluster too.
        self.cluster: List[Tuple[IPAddress, IPAddress]] = []
        self._verdicts: Dict[Tuple[str, bool], bool] = {}
        self.set_rules(allowed, denied, cluster)
        self.allow_loopback = allow_loopback
        # Shared, not copied: a policy rebuilt on reload keeps the listeners bound at start.
        self.own = own if own is not None else OwnEndpoints()

    def set_rules(self, allowed: Iterable[str], denied: Iterable[str],
                  cluster: Iterable[str]) -> None:
        """The operator's rules, replaced in place (SIGHUP) so that every holder of this policy
        (the core, the callback URL checks) sees the new ones; all or none: a bad rule raises
        ValueError before any is replaced."""
        self.allowed, self.denied, self.cluster = (
            [parse_rule(r) for r in rules] for rules in (allowed, denied, cluster))
        self._verdicts = {}

    @property
    def allow_loopback(self) -> bool:
        return self._allow_loopback

    @allow_loopback.setter
    def allow_loopback(self, value: bool) -> None:
        self._allow_loopback = value
        self._verdicts = {}

    def permits(self, host: str, live_relay: bool = False) -> bool:
        """Whether `host` may be a peer; `live_relay`: it is the address of one of this
        relay's live allocations (`LiveRelays`), which only cluster networks and the
        operator's deny rules refuse, not the built-in loopback and private defaults."""
        verdict = self._verdicts.get((host, live_relay))
        if verdict is None:
            candidates = _candidates(host)
            verdict = bool(candidates) and all(self._permits_one(a, live_relay)
                                               for a in candidates)
            if len(self._verdicts) >= self.KEPT:
                self._verdicts = {}
            self._verdicts[host, live_relay] = verdict
        return verdict

    def permits_peer(self, peer: Tuple[str, int], live_relay: bool = False) -> bool:
        """A permission's or channel's peer: its address, and not one of our own endpoints."""
        return self.permits(peer[0], live_relay) and peer not in self.own

    def _permits_one(self, address: IPAddress, live_relay: bool = False) -> bool:
        if _in_ranges(address, self.cluster):
            return False
        if _in_ranges(address, self.allowed):
            return True
        if _in_ranges(address, self.denied):
            return False
        if live_relay:
            return True
        if self.allow_loopback and any(address in net for net in LOOPBACK):
            return True
        return not any(address in net for net in FORBIDDEN)


def _in_ranges(address: IPAddress, ranges: List[Tuple[IPAddress, IPAddress]]) -> bool:
    return any(first.version == address.version and int(first) <= int(address) <= int(last)
               for first, last in ranges)


class LiveRelays:
    """The relayed transport addresses of this server's live allocations, every worker's.

    Two allocations of one relay relaying to each other is what `turnutils_uclient -y`, the
    /test page and two browsers on the same relay do; on one machine, or in a private network,
    the relay address is loopback or private, which the rules above refuse.  A peer that is
    one of these addresses is the relay itself, not the operator's network, and is allowed
    (`PeerPolicy.permits_peer`) while the allocation lives, and only then.

    One byte per port, per family (a relay has one address per family) and per transport
    (UDP and RFC 6062 TCP relays are different sockets): `memory` is a bytearray in one
    process, or a shared mapping the parent of workers hands to each, in which every worker
    writes only its own slice of the relay ports.  So a worker sees another's allocation the
    moment its Allocate succeeded, without a message that could arrive after the client's
    CreatePermission.
    """

    PORTS = 65536
    SIZE = 4 * PORTS  # (IPv4, IPv6) x (UDP, TCP)

    def __init__(self, relay_ips: Iterable[str], external_ips: Dict[str, str],
                 memory: Optional[Any] = None):
        self.memory = memory if memory is not None else bytearray(self.SIZE)
        # Each relay address, and the address clients are told for it, -> its family's slot.
        self._slots: Dict[str, int] = {}
        for ip in relay_ips:
            slot = 0 if ipaddress.ip_address(ip).version == 4 else 1
            for name in (ip, external_ips.get(ip, ip)):
                self._slots[str(ipaddress.ip_address(name))] = slot

    def _offset(self, address: Tuple[str, int], tcp: bool) -> int:
        """Where `address`'s byte is, or -1 if it is not on a relay address of ours."""
        try:
            slot = self._slots.get(address[0])
            if slot is None:
                slot = self._slots.get(str(ipaddress.ip_address(address[0])))
        except ValueError:
            return -1
        if slot is None or not 0 <= address[1] < self.PORTS:
            return -1
        return (slot + 2 * tcp) * self.PORTS + address[1]

    def add(self, address: Tuple[str, int], tcp: bool) -> None:
        offset = self._offset(address, tcp)
        if offset >= 0:
            self.memory[offset] = 1

    def discard(self, address: Tuple[str, int], tcp: bool) -> None:
        offset = self._offset(address, tcp)
        if offset >= 0:
            self.memory[offset] = 0

    def live(self, address: Tuple[str, int], tcp: bool) -> bool:
        offset = self._offset(address, tcp)
        return offset >= 0 and self.memory[offset] == 1

    def clear(self, low: int, high: int) -> None:
        """Forget ports low-high (a worker's slice, when it starts or its process died)."""
        for slot in range(4):
            start = slot * self.PORTS
            self.memory[start + low:start + high + 1] = bytes(high - low + 1)
