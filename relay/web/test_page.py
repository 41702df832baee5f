"""`/test` on the API port: the self-test page (test_page.html beside it, package data).

A static page: it mints a credential through the tokens API beside it (same origin, so no CORS
to open) or takes one pasted in, and makes the relay-only call in the visitor's own browser.
Its Content-Security-Policy allows only its own inline script and style, by hash, scripts of
this origin (/v1/ice.js, with which it measures the regions) and requests to this origin: an
API key typed into it can go nowhere else.
"""
from __future__ import annotations

import base64
import hashlib
import re
from importlib import resources

from twisted.web.resource import Resource
from twisted.web.server import Request


def _hashes(html: str, tag: str) -> str:
    """CSP source expressions for every inline <tag> of `html`."""
    return " ".join(
        "'sha256-%s'" % base64.b64encode(hashlib.sha256(body.encode("utf-8")).digest()).decode()
        for body in re.findall(rf"<{tag}>(.*?)</{tag}>", html, re.S))


class SelfTestPage(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        html = resources.files("relay.web").joinpath("test_page.html").read_text("utf-8")
        self.body = html.encode("utf-8")
        # 'self' for /v1/ice.js, which the page imports to measure the regions.
        self.policy = (f"default-src 'none'; script-src 'self' {_hashes(html, 'script')}; "
                       f"style-src {_hashes(html, 'style')}; connect-src 'self'; "
                       "form-action 'none'; frame-ancestors 'none'; base-uri 'none'").encode()

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"content-security-policy", self.policy)
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"referrer-policy", b"no-referrer")
        request.setHeader(b"cache-control", b"no-cache")
        return self.body
