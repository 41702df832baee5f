"""The tokens API of a running relay, spoken over real HTTP(S)."""
from __future__ import annotations

import base64
import http.client
import json
import ssl
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import quote, urlencode

from support.servers import Server


@dataclass
class Response:
    status: int
    headers: http.client.HTTPMessage
    body: Any


@dataclass
class Api:
    """A running relay with its tokens API, the accounts' API keys, and every secret seen."""
    server: Server
    port: int
    context: Optional[ssl.SSLContext]
    keys: Dict[str, str]
    secrets: List[str] = field(default_factory=list)

    def request(self, method: str, path: str, auth: Optional[Tuple[str, str]] = None,
                form: Optional[Dict[str, str]] = None, json_body: Any = None,
                source: str = "127.0.0.1", headers: Optional[Dict[str, str]] = None) -> Response:
        headers = dict(headers or {})
        body = None
        if auth is not None:
            headers["Authorization"] = "Basic " + base64.b64encode(":".join(auth).encode()).decode()
        if form is not None:
            body = urlencode(form)
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        if json_body is not None:
            body = json.dumps(json_body)
            headers["Content-Type"] = "application/json"
        if self.context is None:
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10,
                                                    source_address=(source, 0))
        else:
            connection = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=10,
                                                     source_address=(source, 0),
                                                     context=self.context)
        try:
            connection.request(method, path, body, headers)
            response = connection.getresponse()
            data = response.read()
        finally:
            connection.close()
        is_json = response.headers.get("content-type") == "application/json"
        parsed = json.loads(data) if data and is_json else data or None
        if isinstance(parsed, dict) and "password" in parsed:
            self.secrets.append(parsed["password"])
        return Response(response.status, response.headers, parsed)

    def auth(self, account: str) -> Tuple[str, str]:
        return account, self.keys[account]

    def mint(self, account: str = "acme", source: str = "127.0.0.1", **form: str) -> Response:
        return self.request("POST", tokens_path(account), self.auth(account), form=form,
                            source=source)


def tokens_path(account: str, username: Optional[str] = None, query: str = "") -> str:
    path = f"/v1/accounts/{quote(account, safe='')}/tokens"
    if username is not None:
        path += "/" + quote(username, safe=":")
    return path + (f"?{query}" if query else "")
