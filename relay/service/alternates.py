"""The other relays of this region, from a file of TURN URIs (--alternate-servers-file).

The operator writes a hostNetwork region's endpoints there (one URI per node running a ready
relay) and the kubelet keeps the mounted copy current.  A relay looks at the file every
second, re-reading it when it changes, and while draining or full sends new Allocates with
300 Try Alternate to those of the client's kind (relay.core.redirect): UDP and TCP clients
to the turn: URIs, TLS clients to the turns: ones.  Its own endpoints (`OwnEndpoints`: its
listeners on this host's and its external addresses) are left out, and so are host names,
since ALTERNATE-SERVER carries an address.  The --alternate-server options stay as they are,
first in the list.
"""
from __future__ import annotations

import os
from typing import List, Optional, Tuple

from twisted.logger import Logger

from relay.core.peers import OwnEndpoints, is_ip
from relay.core.server import TurnConfig
from relay.proto.stun import Address
from relay.util.turn_uri import DEFAULT_PORT, DEFAULT_TLS_PORT, parse_turn_uri

log = Logger()


def parse_alternates(text: str, own: OwnEndpoints) -> Tuple[List[Address], List[Address]]:
    """(UDP/TCP alternates, TLS alternates) of the URIs in `text`, one a line ('#' comments),
    in file order without repeats; lines that are not TURN URIs with an IP address, and this
    relay's own endpoints, are skipped."""
    plain: List[Address] = []
    tls: List[Address] = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            uri = parse_turn_uri(line)
        except ValueError as err:
            log.warn("alternates: skipping {line!r}: {err}", line=line, err=err)
            continue
        if not is_ip(uri.host):
            continue
        address = (uri.host, uri.port or (DEFAULT_TLS_PORT if uri.secure else DEFAULT_PORT))
        chosen = tls if uri.secure else plain
        if address not in own and address not in chosen:
            chosen.append(address)
    return plain, tls


class AlternatesFile:
    """The file's alternates added to `config`'s static ones, refreshed when the file changes
    (the kubelet swaps a ConfigMap's files in, so a new inode or mtime means new content).  A
    missing file (an optional ConfigMap not written yet) means none."""

    def __init__(self, path: str, config: TurnConfig):
        self.path, self.config = path, config
        self.static = (config.alternate_servers, config.tls_alternate_servers)
        self._seen: Optional[Tuple[int, int]] = None

    def refresh(self) -> None:
        try:
            stat = os.stat(self.path)
            seen: Optional[Tuple[int, int]] = (stat.st_ino, stat.st_mtime_ns)
        except OSError:
            seen = None
        if seen == self._seen:
            return
        self._seen = seen
        try:
            text = ""
            if seen is not None:
                with open(self.path) as f:
                    text = f.read()
        except OSError as err:
            log.warn("alternates: cannot read {path}: {err}", path=self.path, err=err)
            text = ""
        plain, tls = parse_alternates(text, self.config.policy.own)
        self.config.alternate_servers = self.static[0] + tuple(a for a in plain if a not in self.static[0])
        self.config.tls_alternate_servers = self.static[1] + tuple(a for a in tls if a not in self.static[1])
        log.info("redirects in this region: {plain} (UDP, TCP) and {tls} (TLS)",
                 plain=_shown(self.config.alternate_servers), tls=_shown(self.config.tls_alternate_servers))


def _shown(addresses: Tuple[Address, ...]) -> str:
    return ", ".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in addresses) or "none"
