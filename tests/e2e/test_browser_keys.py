"""Browser keys over real HTTP: a relay with --api-port (its default workers), keys made and
revoked with the `turnrelay` tool, and requests as a browser makes them (an Origin header, a
form body).  What a key may do (short credentials for its account, from its origins) and what
it may not (anything else) are both asserted.  Every test speaks from its own loopback source
address, since requests are limited per source."""
from __future__ import annotations

import json
from typing import Dict, Iterator, Optional

import pytest

from relay.auth.tokens import parse_username
from support.api import Api, Response
from support.cli import run_cli
from support.db import create_accounts
from support.servers import free_port, start_server

SECRET = "browser-keys-mint-secret"
ORIGIN = "https://app.example.org"
PER_SOURCE = 12  # --api-browser-requests-per-minute


@pytest.fixture(scope="module")
def api(tmp_path_factory, in_reactor) -> Iterator[Api]:  # noqa: F811
    tmp = tmp_path_factory.mktemp("browser-keys")
    dsn = f"sqlite:///{tmp / 'accounts.db'}"
    keys = in_reactor(create_accounts, dsn, ("acme", "initech"), ("initech",))
    secret_file = tmp / "mint.secret"
    secret_file.write_text(f"{SECRET}\n")
    port = free_port()
    server = start_server("--auth", f"db:dsn={dsn},secret-file={secret_file}",
                          "--api-port", str(port),
                          "--api-browser-requests-per-minute", str(PER_SOURCE),
                          users=(), state_dir=str(tmp / "state"))
    try:
        server.read_until(f"tokens API listening on http [127.0.0.1]:{port}")
        server.read_until("account database loaded")
        api = Api(server, port, None, keys, [SECRET, *keys.values()])
        api.dsn = dsn  # type: ignore[attr-defined]
        yield api
    finally:
        server.stop()


def add_key(api: Api, account: str = "acme", *options: str) -> str:
    key = run_cli("browser-key", "add", account, "--origin", ORIGIN, "--name", "web",
                  *options, "--db", api.dsn).stdout.strip()  # type: ignore[attr-defined]
    api.secrets.append(key)
    return key


def ask(api: Api, key: Optional[str], source: str, origin: Optional[str] = ORIGIN,
        query: str = "", **form: str) -> Response:
    headers: Dict[str, str] = {} if origin is None else {"Origin": origin}
    return api.request("POST", "/v1/ice-servers" + query, form={
        **({} if key is None else {"key": key}), **form}, source=source, headers=headers)


def test_a_key_mints_a_short_credential_for_its_own_origin(api) -> None:
    key = add_key(api, "acme", "--max-ttl", "120")
    answer = ask(api, key, "127.0.2.1")
    assert answer.status == 201, answer.body
    assert answer.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert answer.headers["Vary"] == "Origin" and answer.headers["Cache-Control"] == "no-store"
    token = answer.body
    parsed = parse_username(token["username"])
    assert (parsed.account_id, parsed.label, token["ttl"]) == ("acme", "web", 120)  # the cap
    assert [region["name"] for region in token["regions"]] == ["default"]
    assert token["ice_servers"] == token["regions"][0]["ice_servers"]
    assert token["ice_servers"][1]["credential"] == token["password"]
    assert ask(api, key, "127.0.2.1", ttl="60").body["ttl"] == 60


def test_the_ttl_is_capped_and_nothing_but_minting_is_allowed(api) -> None:
    source = "127.0.2.2"
    key = add_key(api, "acme", "--max-ttl", "120")
    too_long = ask(api, key, source, ttl="121")
    assert (too_long.status, too_long.body["message"]) == \
        (400, "ttl: must be from 1 to 120 seconds")
    assert too_long.headers["Access-Control-Allow-Origin"] == ORIGIN  # the page may read why
    for field, message in (("client_ip", "client_ip: not with a browser key: the address "
                                         "located is the request's own"),
                           ("label", "label: not with a browser key: the label is the key's "
                                     "name")):
        refused = ask(api, key, source, **{field: "198.51.100.7" if field == "client_ip"
                                           else "other"})
        assert (refused.status, refused.body["message"]) == (400, message)
    in_url = ask(api, None, source, query=f"?key={key}")
    assert (in_url.status, in_url.body["message"]) == \
        (400, "key: send it in the body, not in the URL (which logs record)")
    # The key is not an API key: usage, sessions, tokens and triggers all refuse it.
    for method, path in (("GET", "/v1/accounts/acme/usage"), ("GET", "/v1/accounts/acme/sessions"),
                         ("POST", "/v1/accounts/acme/tokens"),
                         ("GET", "/v1/accounts/acme/triggers")):
        refused = api.request(method, path, ("acme", key), source=source,
                              headers={"Origin": ORIGIN})
        assert (refused.status, refused.body["message"]) == \
            (401, "wrong account id or API key"), path
        assert "Access-Control-Allow-Origin" not in refused.headers


def test_another_origin_or_no_origin_is_refused(api) -> None:
    source = "127.0.2.3"
    key = add_key(api)
    for origin in ("https://evil.example", "http://app.example.org",
                   "https://app.example.org:8443", "null"):
        refused = ask(api, key, source, origin=origin)
        assert (refused.status, refused.body["message"]) == (403, (
            f"origin {origin} may not use this browser key (its origins are set by turnrelay "
            "browser-key add --origin)")), origin
        assert "Access-Control-Allow-Origin" not in refused.headers  # hidden from the page
    no_origin = ask(api, key, source, origin=None)
    assert (no_origin.status, no_origin.body["message"]) == \
        (403, "a browser key is for web pages: the request has no Origin header")
    assert api.server.read_until(
        f"browser key {key[5:21]} used from origin 'null', not one of its own, by {source}")


def test_a_revoked_or_wrong_key_is_refused(api) -> None:
    source = "127.0.2.4"
    key = add_key(api)
    assert ask(api, key, source).status == 201
    run_cli("browser-key", "revoke", key[5:21], "--db", api.dsn)
    for wrong in (key, key[:-1] + ("0" if key[-1] != "0" else "1"), "trbk_short", ""):
        refused = ask(api, wrong, source)
        assert (refused.status, "Access-Control-Allow-Origin" in refused.headers) == \
            (401, False), wrong
    assert ask(api, key, source).body["message"] == "unknown or revoked browser key"
    assert ask(api, None, source).body["message"] == \
        "a browser key is required: key=trbk_... in the body"


def test_a_suspended_account_gets_403(api) -> None:
    key = add_key(api, "initech")
    refused = ask(api, key, "127.0.2.5")
    assert (refused.status, refused.body["message"]) == (403, "account 'initech' is suspended")


def test_requests_are_limited_per_key_and_per_source(api) -> None:
    key = add_key(api, "acme", "--requests-per-minute", "3")
    # The key's three requests of the minute, from three sources: the fourth is refused.
    assert [ask(api, key, f"127.0.2.{10 + n}").status for n in range(4)] == [201, 201, 201, 429]
    limited = ask(api, key, "127.0.2.20")
    assert (limited.status, limited.headers["Retry-After"], limited.body["message"]) == \
        (429, "20", "this browser key made its 3 requests of the minute; retry later")
    assert limited.headers["Access-Control-Allow-Origin"] == ORIGIN
    # A source's PER_SOURCE requests, whatever the key (good, wrong or none), then 429.
    source, other = "127.0.2.30", add_key(api)
    statuses = [ask(api, other if n % 2 else "trbk_wrong", source).status
                for n in range(PER_SOURCE + 1)]
    assert statuses == [401, 201] * (PER_SOURCE // 2) + [429]
    assert ask(api, other, source).headers["Retry-After"] == "5"
    assert ask(api, other, "127.0.2.31").status == 201  # another source is not limited


def test_ice_js_is_served_to_any_origin_and_cached(api) -> None:
    script = api.request("GET", "/v1/ice.js", source="127.0.2.40",
                         headers={"Origin": "https://anywhere.example"})
    assert script.status == 200
    assert script.headers["Content-Type"] == "text/javascript; charset=utf-8"
    assert script.headers["Access-Control-Allow-Origin"] == "*"
    assert script.headers["Cache-Control"] == "public, max-age=3600"
    assert b"export async function nearestIceServers(" in script.body
    wrong_method = api.request("POST", "/v1/ice.js", source="127.0.2.40")
    assert (wrong_method.status, wrong_method.headers["Allow"]) == (405, "GET")
    assert api.request("GET", "/v1/ice-servers", source="127.0.2.40").headers["Allow"] == "POST"


def test_the_accounts_backend_adds_lists_and_revokes_keys_with_its_api_key(api) -> None:
    source = "127.0.2.50"
    added = api.request("POST", "/v1/accounts/acme/browser-keys", api.auth("acme"), source=source,
                        json_body={"origins": [ORIGIN, "http://127.0.0.1:8080"], "name": "app",
                                   "max_ttl": 90})
    assert added.status == 201, added.body
    key = added.body["key"]
    api.secrets.append(key)
    key_id = key[5:21]
    assert added.headers["Location"] == f"/v1/accounts/acme/browser-keys/{key_id}"
    assert {k: v for k, v in added.body.items() if k not in ("key", "date_created")} == {
        "key_id": key_id, "account": "acme", "name": "app", "max_ttl": 90,
        "origins": [ORIGIN, "http://127.0.0.1:8080"], "requests_per_minute": 600}
    token = ask(api, key, source).body
    assert (token["ttl"], token["username"].endswith(":acme:app")) == (90, True)
    form = api.request("POST", "/v1/accounts/acme/browser-keys", api.auth("acme"), source=source,
                       form={"origins": f"{ORIGIN}, https://b.example"})
    assert form.body["origins"] == [ORIGIN, "https://b.example"]
    assert form.body["max_ttl"] == 600 and form.body["name"] == "browser"
    api.secrets.append(form.body["key"])

    listed = api.request("GET", "/v1/accounts/acme/browser-keys", api.auth("acme"), source=source)
    assert listed.status == 200
    assert key_id in [k["key_id"] for k in listed.body["browser_keys"]]
    assert not any("key" in described for described in listed.body["browser_keys"])
    assert key not in json.dumps(listed.body)
    # Another account sees none of acme's keys, and cannot revoke them.
    other = api.request("GET", "/v1/accounts/initech/browser-keys", api.auth("initech"),
                        source=source)
    assert {k["account"] for k in other.body["browser_keys"]} <= {"initech"}  # its own only
    assert key_id not in [k["key_id"] for k in other.body["browser_keys"]]
    assert api.request("DELETE", f"/v1/accounts/initech/browser-keys/{key_id}",
                       api.auth("initech"), source=source).status == 404
    assert api.request("DELETE", f"/v1/accounts/acme/browser-keys/{key_id}", api.auth("acme"),
                       source=source).status == 204
    assert ask(api, key, source).status == 401
    assert api.request("DELETE", f"/v1/accounts/acme/browser-keys/{key_id}", api.auth("acme"),
                       source=source).body["message"] == \
        f"no browser key '{key_id}' of account 'acme'"
    # A browser key cannot manage keys.
    assert api.request("GET", "/v1/accounts/acme/browser-keys", ("acme", form.body["key"]),
                       source=source).status == 401


@pytest.mark.parametrize("form, message", [
    ({}, "origins: expected origins such as https://app.example.org, separated by spaces, or "
         "a JSON list of them"),
    ({"origins": "app.example.org"}, "origins: origin 'app.example.org': expected http:// or "
                                     "https:// and a host"),
    ({"origins": ORIGIN, "name": "a b"}, "name: expected 1 to 64 letters"),
    ({"origins": ORIGIN, "max_ttl": "86401"}, "max_ttl: expected a whole number from 1 to 86400"),
    ({"origins": ORIGIN, "requests_per_minute": "0"},
     "requests_per_minute: expected a whole number from 1 to 100000"),
])
def test_a_bad_key_field_is_named(api, form, message) -> None:
    refused = api.request("POST", "/v1/accounts/acme/browser-keys", api.auth("acme"), form=form,
                          source="127.0.2.51")
    assert refused.status == 400 and refused.body["message"].startswith(message), refused.body


def test_no_browser_key_reaches_the_log(api) -> None:
    log = api.server.stop()
    assert "POST /v1/ice-servers" in log and "POST /v1/ice-servers?key=*** HTTP/1.1" in log
    for secret in api.secrets:  # of a browser key, the part after its id
        assert (secret[22:] if secret.startswith("trbk_") else secret) not in log

