"""`/metrics`, `/healthz` and `/readyz` over HTTP, for Prometheus and for Kubernetes probes.

Served on `--prometheus-port` and, beside the tokens API, on `--api-port`.  Each answer is
computed in the reactor's thread, where the core's state lives (prometheus_client's own
Twisted resource would read it from a thread pool, racing the relay), and none needs a key:
they carry no account, username or address.

- `/healthz`: 200 while the process serves HTTP at all (liveness); with worker processes,
  503 while one of them keeps dying at start, so that the orchestrator restarts the relay.
- `/readyz`: 200 once the client listeners are up and while allocations are taken; 503 before,
  and from the first moment of a drain (SIGTERM), so a load balancer stops sending new
  clients at once.  A usage ledger outage does not make the relay unready: every relay of a
  region shares that ledger, and pulling them all out of service would not bring it back; it
  shows in the metrics and the log instead.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Optional

from prometheus_client import CollectorRegistry, generate_latest
from twisted.web.http import combinedLogFormatter
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from relay.web.metrics import CONTENT_TYPE

# Why the relay is not ready, or None when it is.
NotReady = Callable[[], Optional[str]]


def _text(request: Request, code: int, body: bytes, content_type: bytes) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", content_type)
    request.setHeader(b"cache-control", b"no-store")
    return body


class MetricsPage(Resource):
    isLeaf = True

    def __init__(self, registry: CollectorRegistry):
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        return _text(request, 200, generate_latest(self.registry), CONTENT_TYPE.encode())


class HealthPage(Resource):
    isLeaf = True

    def __init__(self, not_ready: Optional[NotReady] = None):
        super().__init__()
        self.not_ready = not_ready

    def render_GET(self, request: Request) -> bytes:
        reason = self.not_ready() if self.not_ready is not None else None
        if reason is not None:
            return _text(request, 503, f"not ready: {reason}\n".encode(), b"text/plain")
        return _text(request, 200, b"ok\n", b"text/plain")


# A key in a query string: refused (it belongs in the body), and masked in the access log.
_KEY_IN_QUERY = re.compile(r"([?&]key=)[^&\s\"]*")


def masking_log_formatter(timestamp: str, request: Request) -> str:
    """The combined log format, with any `key=` in the URL masked: a browser key sent in
    the query string by mistake is refused, and must not stay in the log either."""
    return _KEY_IN_QUERY.sub(r"\1***", combinedLogFormatter(timestamp, request))


class QuietSite(Site):
    """A Site that keeps probes and scrapes, every few seconds each, out of the access log,
    and keys out of the URLs it logs."""

    QUIET = (b"/metrics", b"/healthz", b"/readyz")
    noisy = False  # no "Starting factory" line: the start banner names the listener

    def __init__(self, resource: Resource, **kwargs: Any):
        kwargs.setdefault("logFormatter", masking_log_formatter)
        super().__init__(resource, **kwargs)

    def log(self, request: Request) -> None:
        if request.path not in self.QUIET:
            super().log(request)


class Routes(Resource):
    """The three pages, and every other path to `fallback` (the tokens API) or a 404.
    `metrics` is a `MetricsPage`, or in the parent of worker processes the page gathering
    theirs (relay.service.workers)."""

    def __init__(self, metrics: Resource, not_ready: NotReady,
                 fallback: Optional[Resource] = None, not_live: Optional[NotReady] = None):
        super().__init__()
        self.fallback = fallback
        self.putChild(b"metrics", metrics)
        self.putChild(b"healthz", HealthPage(not_live))
        self.putChild(b"readyz", HealthPage(not_ready))

    def getChild(self, path: bytes, request: Request) -> Resource:
        if self.fallback is None:
            return super().getChild(path, request)
        # The fallback is a leaf that routes the whole path itself: give it back this segment.
        request.postpath.insert(0, request.prepath.pop())
        return self.fallback

    def render(self, request: Request) -> bytes:
        if self.fallback is not None:
            return self.fallback.render(request)
        return _text(request, 404, b"not found\n", b"text/plain")
