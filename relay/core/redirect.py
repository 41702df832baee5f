"""Where a relay that takes no new allocation sends them: 300 Try Alternate (RFC 8489 section
10, RFC 8656 section 7.2) naming the nearest healthy relay.

A relay stops taking allocations while it drains (SIGTERM) and while it is full (it holds
--total-quota allocations, counted over all its workers).  Its alternates come in tiers,
nearest first: the other relays of its own region (--alternate-server, --alternate-servers-file),
then each other serving region of --regions-file by distance.  The first tier holding an
alternate of the client's kind (TLS or not, its address family) gives the answer, round robin
within the tier; an alternate that is one of the relay's own endpoints never does, so a relay
never sends a client back to itself.  With no alternate left the answer is 508 Insufficient
Capacity, on which RFC 8656 has a client wait and retry elsewhere.

The service layer (relay.service.redirects) keeps the tiers current; the choice is made here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

from relay.core.peers import OwnEndpoints
from relay.proto import stun
from relay.proto.stun import Address

DRAINING, FULL = "draining", "full"  # why an Allocate is redirected (the metric's label)


@dataclass(frozen=True)
class Alternate:
    """One relay a client may be sent to: its UDP/TCP listener, or its TLS one (`tls`) with
    the name its certificate carries (`domain`, sent as ALTERNATE-DOMAIN)."""
    address: Address
    tls: bool = False
    domain: Optional[str] = None


Tier = Tuple[Alternate, ...]


class Redirects:
    """The tiers beyond the relay's own region, as the service layer last set them, and the
    choice of an alternate for one client."""

    def __init__(self) -> None:
        self.regions: Tuple[Tier, ...] = ()  # the other serving regions', nearest first
        self._turn = 0

    def choose(self, tiers: Sequence[Tier], family: int, transport: str,
               own: OwnEndpoints) -> Optional[Alternate]:
        """An alternate for a client of `transport` and address `family`: from the first of
        `tiers` with one that fits and is not one of `own` endpoints.  DTLS clients get none:
        no alternate is known to be a DTLS server."""
        if transport == "dtls":
            return None
        tls = transport == "tls"
        for tier in tiers:
            fits = [a for a in tier if a.tls == tls and stun.address_family(a.address[0]) == family
                    and a.address not in own]
            if fits:
                self._turn += 1
                return fits[self._turn % len(fits)]
        return None


def try_alternate(alternate: Alternate) -> stun.StunError:
    """The 300 answer naming `alternate` (signed like any answer to an authenticated
    request: RFC 8489 section 9.2.4's rules apply to it as to a success)."""
    attributes: List[Tuple[int, Any]] = [(stun.ALTERNATE_SERVER, alternate.address)]
    if alternate.tls and alternate.domain:
        attributes.append((stun.ALTERNATE_DOMAIN, alternate.domain))
    return stun.StunError(300, "Try Alternate", attributes)
