"""HTTP callbacks to URLs an account gave us, without letting it reach the operator's network.

A callback URL is the same risk as a peer address (server-side request forgery: the relay
would POST from inside the operator's network), so it obeys the same `PeerPolicy`: every
address its host resolves to must be permitted, when the URL is registered and again at each
delivery (DNS may answer differently later: rebinding).  The connection then goes to the
address that was checked, never to a second resolution: the Agent's endpoint is pinned to it,
while TLS still verifies the certificate against the URL's host name.  Redirects are not
followed (a plain `Agent` never does), the whole request has a short deadline, and the
answer's body is not read.
"""
from __future__ import annotations

import json
import socket
from io import BytesIO
from typing import Any, Dict, List, Tuple
from urllib.parse import urlsplit

from twisted.internet import defer, threads
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.web.client import URI, Agent, FileBodyProducer
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from relay import SOFTWARE
from relay.core.peers import PeerPolicy, is_ip

TIMEOUT = 10.0  # seconds for connecting, TLS and the answer (resolving: the system resolver's)
MAX_URL = 2048


class ForbiddenCallback(Exception):
    """The URL's host is, or resolves to, an address the policy refuses (or to none)."""


def check_url(url: str) -> Tuple[str, str, int]:
    """(scheme, host, port) of an http or https URL; ValueError saying what is wrong."""
    if not isinstance(url, str) or len(url) > MAX_URL:
        raise ValueError(f"expected an http:// or https:// URL of at most {MAX_URL} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueError("not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("expected an http:// or https:// URL with a host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("credentials in the URL are not accepted")
    if not url.isascii() or any(c.isspace() or ord(c) < 32 for c in url):
        raise ValueError("not a valid URL: ASCII without spaces (punycode for a non-ASCII host)")
    return parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80)


def _resolve(host: str, port: int) -> List[str]:
    if is_ip(host):
        return [host]
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return []
    return list(dict.fromkeys(info[4][0].split("%")[0] for info in infos))


@defer.inlineCallbacks
def permitted_address(url: str, policy: PeerPolicy):
    """The address to connect to for `url`, resolved now; ForbiddenCallback unless the host
    resolves and every address it resolves to is permitted (one forbidden answer is enough to
    refuse: the resolver may hand it out next time)."""
    _, host, port = check_url(url)
    addresses = yield threads.deferToThread(_resolve, host, port)
    if not addresses:
        raise ForbiddenCallback(f"{host} does not resolve")
    forbidden = [address for address in addresses if not policy.permits(address)]
    if forbidden and is_ip(host):
        raise ForbiddenCallback(f"{host} is a forbidden address")
    if forbidden:
        raise ForbiddenCallback(f"{host} resolves to a forbidden address ({forbidden[0]})")
    return addresses[0]


@implementer(IAgentEndpointFactory)
class _PinnedEndpoints:
    """Connects wherever the URL says, but to the one address already checked."""

    def __init__(self, reactor: Any, address: str, timeout: float):
        self.reactor, self.address, self.timeout = reactor, address, timeout

    def endpointForURI(self, uri: URI) -> Any:
        endpoint_type = TCP6ClientEndpoint if ":" in self.address else TCP4ClientEndpoint
        endpoint = endpoint_type(self.reactor, self.address, uri.port, timeout=self.timeout)
        if uri.scheme == b"https":
            endpoint = wrapClientTLS(optionsForClientTLS(uri.host.decode("idna")), endpoint)
        return endpoint


class _Ignore(Protocol):
    """Drops the answer's body: only the status matters, and a body could be endless."""

    def connectionMade(self) -> None:
        self.transport.stopProducing()


@defer.inlineCallbacks
def post_json(reactor: Any, url: str, body: Dict[str, Any], policy: PeerPolicy,
              timeout: float = TIMEOUT):
    """POST `body` as JSON to `url`; fires with the answer's status code.  ForbiddenCallback
    when the host resolves to a refused address; a timeout or connection error otherwise."""
    address = yield permitted_address(url, policy)
    agent = Agent.usingEndpointFactory(reactor, _PinnedEndpoints(reactor, address, timeout))
    headers = Headers({b"content-type": [b"application/json"],
                       b"user-agent": [SOFTWARE.encode("ascii")]})
    producer = FileBodyProducer(BytesIO(json.dumps(body).encode("utf-8")))
    request = agent.request(b"POST", url.encode("ascii"), headers, producer)
    request.addTimeout(timeout, reactor)
    response = yield request
    response.deliverBody(_Ignore())
    return response.code
