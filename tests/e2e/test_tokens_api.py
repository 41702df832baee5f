"""The tokens API over real sockets: a relay with --api-port, real HTTP, both account stores.

One relay per account store serves the module's API tests: the SQLite one speaks plain HTTP
on loopback, the PostgreSQL one HTTPS (--api-cert), so each store and each transport is
covered without a third server.  Every test speaks from its own loopback source address,
since failed API keys are throttled per source and one test's failures must not throttle
another.  The log test comes last in the file, so it greps what every other test caused.
"""
from __future__ import annotations

import asyncio
import re
import ssl
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Iterator

import pytest
from aioice.stun import TransactionFailed
from aioice.turn import create_turn_endpoint

from relay.net.tls import self_signed
from relay.service.options import Options
from relay.web.api import FAILED_KEY_BURST
from support.aioice_client import Collector, Echo
from support.api import Api, Response, tokens_path
from support.db import create_accounts
from support.postgres import fresh_schema
from support.servers import TWISTD, free_port, start_server

SECRET = "tokens-api-mint-secret"
OLD_SECRET = "tokens-api-previous-secret"
MAX_TTL = 2 * 86400
REGIONS = """
[regions.eu-west]
host = "turn-eu.example.org"
port = 443
tls-port = 5350

[regions.lab6]
host = "2001:db8::7"
"""


def refusal_code(err: TransactionFailed) -> int:
    """The ERROR-CODE of the answer that made aioice give up."""
    return err.response.attributes["ERROR-CODE"][0]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def api(request, tmp_path_factory, in_reactor) -> Iterator[Api]:  # noqa: F811
    tmp = tmp_path_factory.mktemp(request.param)
    if request.param == "sqlite":
        dsn = f"sqlite:///{tmp / 'accounts.db'}"
    else:
        dsn = fresh_schema(request.getfixturevalue("postgres_dsn"))
    keys = in_reactor(create_accounts, dsn, ("acme", "globex", "initech"), ("initech",))
    secret_file = tmp / "mint.secret"
    secret_file.write_text(f"{SECRET}\n{OLD_SECRET}\n")
    regions = tmp / "regions.toml"
    regions.write_text(REGIONS)
    port = free_port()
    extra = ["--auth", f"db:dsn={dsn},secret-file={secret_file}", "--api-port", str(port),
             "--api-max-ttl", str(MAX_TTL), "--regions-file", str(regions),
             # One failure refilled a minute: the throttling test cannot be outrun by a slow machine.
             "--api-key-failures-per-minute", "1"]
    context = None
    if request.param == "postgresql":
        cert, key, _ = self_signed(str(tmp / "api-tls"))
        extra += ["--api-cert", cert, "--api-pkey", key]
        context = ssl.create_default_context(cafile=cert)
        context.check_hostname = False  # the certificate names this host, we dial 127.0.0.1
    server = start_server(*extra, users=(), state_dir=str(tmp / "state"))
    try:
        server.read_until(f"tokens API listening on {'https' if context else 'http'} "
                          f"[127.0.0.1]:{port}")
        api = Api(server, port, context, keys, [SECRET, OLD_SECRET, *keys.values()])
        server.read_until("account database loaded")  # before it, a login is answered 500
        yield api
    finally:
        server.stop()


def rfc3339(text: str) -> int:
    """Unix seconds of an RFC 3339 UTC timestamp, whose exact form is checked first."""
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", text), text
    return int(datetime.fromisoformat(text[:-1] + "+00:00").timestamp())


def test_a_token_relays_and_its_revocation_ends_it(api):
    before = time.time()
    minted = api.mint(ttl="600", label="call-1", source="127.0.0.10")
    assert minted.status == 201, minted.body
    assert minted.headers["Cache-Control"] == "no-store"
    assert minted.headers["Content-Type"] == "application/json"
    token = minted.body
    username, password = token["username"], token["password"]
    assert set(token) == {"account", "username", "password", "ttl", "date_created",
                          "date_expires", "region", "region_reason", "fallback_region",
                          "region_note", "ice_servers", "regions"}
    assert (token["account"], token["ttl"], token["region"]) == ("acme", 600, "default")
    # Three regions and no GeoIP database: the relay's own, then the others by name.
    assert (token["region_reason"], token["fallback_region"], token["region_note"]) == (
        "default", "eu-west", "no GeoIP database (--geoip-db): the default region")
    expires = int(username.split(":")[0])
    assert username == f"{expires}:acme:call-1" and before + 600 - 1 <= expires <= time.time() + 600
    assert rfc3339(token["date_expires"]) == expires
    assert rfc3339(token["date_expires"]) - rfc3339(token["date_created"]) == 600
    assert minted.headers["Location"] == tokens_path("acme", username)
    host, port, tls_port = api.server.host, api.server.port, api.server.tls_port
    assert token["ice_servers"][:4] == [
        {"urls": f"stun:{host}:{port}"},
        {"urls": f"turn:{host}:{port}?transport=udp", "username": username, "credential": password},
        {"urls": f"turn:{host}:{port}?transport=tcp", "username": username, "credential": password},
        {"urls": f"turns:{host}:{tls_port}?transport=tcp", "username": username,
         "credential": password},
    ]

    async def relay_then_revoke() -> None:
        loop = asyncio.get_running_loop()
        echo, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
        turn, collector = await create_turn_endpoint(Collector, (host, port), username, password)
        try:
            turn.sendto(b"minted by the tokens API", echo.get_extra_info("sockname"))
            echoed, _ = await asyncio.wait_for(collector.received.get(), 5)
            assert echoed == b"minted by the tokens API"
            revoked = await asyncio.to_thread(api.request, "DELETE", tokens_path("acme", username),
                                              api.auth("acme"), source="127.0.0.10")
            assert (revoked.status, revoked.body) == (204, None)
            # The relay applies the revocation it polled to the open allocation, then refuses
            # the username for new ones from the same snapshot.
            closed = await asyncio.to_thread(api.server.read_until,
                                             f"allocation closed user={username} ", 10)
            assert "reason=revoked" in closed
            with pytest.raises(TransactionFailed) as refused:
                await create_turn_endpoint(Collector, (host, port), username, password)
            assert refusal_code(refused.value) == 401
        finally:
            turn.close()
            echo.close()

    asyncio.run(relay_then_revoke())
    again = api.request("DELETE", tokens_path("acme", username), api.auth("acme"),
                        source="127.0.0.10")
    assert again.status == 204  # revoking twice changes nothing


def test_ttl_default_maximum_and_bad_values_name_the_field(api):
    source = "127.0.0.11"
    default = api.mint(source=source).body
    assert default["ttl"] == 86400
    assert rfc3339(default["date_expires"]) - rfc3339(default["date_created"]) == 86400
    longest = api.request("POST", tokens_path("acme"), api.auth("acme"),
                          json_body={"ttl": MAX_TTL}, source=source)
    assert (longest.status, longest.body["ttl"]) == (201, MAX_TTL)
    for value in ("abc", "", "1.5", "1e3", " 60", "0", "-60", str(MAX_TTL + 1)):
        refused = api.mint(ttl=value, source=source)
        assert refused.status == 400 and refused.body["code"] == 400, (value, refused.body)
        assert refused.body["message"].startswith("ttl: "), refused.body
    for value in (True, 3.5, [60], "sixty", 0, MAX_TTL + 1):
        refused = api.request("POST", tokens_path("acme"), api.auth("acme"),
                              json_body={"ttl": value}, source=source)
        assert refused.status == 400 and refused.body["message"].startswith("ttl: "), value
    twice = api.request("POST", tokens_path("acme", query="ttl=60"), api.auth("acme"),
                        form={"ttl": "60"}, source=source)
    assert (twice.status, twice.body["message"]) == (400, "ttl: given more than once")
    not_json = api.request("POST", tokens_path("acme"), api.auth("acme"), json_body=[1],
                           source=source)
    assert not_json.status == 400 and not_json.body["message"].startswith("body: ")


def test_label_and_regions(api):
    source = "127.0.0.12"
    labelled = api.mint(label="phone-7", source=source).body
    assert labelled["username"].endswith(":acme:phone-7")
    bad_label = api.mint(label="no spaces", source=source)
    assert bad_label.status == 400 and bad_label.body["message"].startswith("label: ")

    eu = api.request("POST", tokens_path("acme", query="region=eu-west&ttl=60"),
                     api.auth("acme"), source=source).body
    assert (eu["region"], eu["region_reason"], eu["ttl"]) == ("eu-west", "pinned", 60)
    assert [s["urls"] for s in eu["ice_servers"]][:4] == [
        "stun:turn-eu.example.org:443", "turn:turn-eu.example.org:443?transport=udp",
        "turn:turn-eu.example.org:443?transport=tcp",
        "turns:turn-eu.example.org:5350?transport=tcp"]
    lab6 = api.request("POST", tokens_path("acme", query="region=lab6"), api.auth("acme"),
                       source=source).body
    assert [s["urls"] for s in lab6["ice_servers"]][:4] == [
        "stun:[2001:db8::7]:3478", "turn:[2001:db8::7]:3478?transport=udp",
        "turn:[2001:db8::7]:3478?transport=tcp", "turns:[2001:db8::7]:5349?transport=tcp"]
    unknown = api.request("POST", tokens_path("acme", query="region=mars"), api.auth("acme"),
                          source=source)
    assert (unknown.status, unknown.body) == (400, {
        "code": 400, "message": "region: expected auto or one of default, eu-west, lab6"})


def test_credentials_accounts_and_methods(api):
    source = "127.0.0.13"
    anonymous = api.request("POST", tokens_path("acme"), source=source)
    assert (anonymous.status, anonymous.body["code"]) == (401, 401)
    assert anonymous.headers["WWW-Authenticate"] == 'Basic realm="turnrelay"'
    for auth, account in ((("acme", "not-the-key"), "acme"),
                          (("globex", api.keys["acme"]), "globex"),  # a key of another account
                          (("nosuch", "any-key"), "nosuch")):  # anonymous callers see only 401
        wrong = api.request("POST", tokens_path(account), auth, source=source)
        assert (wrong.status, wrong.body) == (401, {"code": 401,
                                                    "message": "wrong account id or API key"})
        assert wrong.headers["WWW-Authenticate"] == 'Basic realm="turnrelay"'
    # Authenticated, an account cannot tell another account from no account.
    for account in ("nosuch", "globex"):
        other = api.request("POST", tokens_path(account), api.auth("acme"), source=source)
        assert (other.status, other.body["message"]) == (
            404, f"no account {account!r} for these credentials")
    suspended = api.mint("initech", source=source)
    assert (suspended.status, suspended.body["message"]) == (403, "account 'initech' is suspended")
    leaked = f"{int(time.time()) + 3600}:initech:leaked"
    assert api.request("DELETE", tokens_path("initech", leaked), api.auth("initech"),
                       source=source).status == 204  # revoking works while suspended
    globex_token = f"{int(time.time()) + 3600}:globex"
    for username in (globex_token, "not-a-rest-username"):
        missing = api.request("DELETE", tokens_path("acme", username), api.auth("acme"),
                              source=source)
        assert missing.status == 404 and missing.body["code"] == 404, username

    for method, path, allowed in (("GET", tokens_path("acme"), "POST"),
                                  ("PUT", tokens_path("acme"), "POST"),
                                  ("POST", tokens_path("acme", globex_token), "DELETE")):
        wrong_method = api.request(method, path, api.auth("acme"), source=source)
        assert (wrong_method.status, wrong_method.headers["Allow"]) == (405, allowed)
        assert wrong_method.body["code"] == 405
    for path in ("/", "/v1/accounts/acme", "/v1/accounts/acme/tokens/a/b",
                 "/v2/accounts/acme/tokens"):
        elsewhere = api.request("POST", path, api.auth("acme"), source=source)
        assert (elsewhere.status, elsewhere.body["code"]) == (404, 404), path


def test_failed_keys_are_throttled_per_source_before_any_hashing(api):
    source = "127.0.0.14"
    for _ in range(FAILED_KEY_BURST + 2):  # successes are never charged
        assert api.mint(ttl="60", source=source).status == 201

    def guess(_: int) -> Response:
        return api.request("POST", tokens_path("acme"), ("acme", "guessed-key"), source=source)

    # Concurrent guesses all arrive before the first failure is answered: each pays on arrival.
    with ThreadPoolExecutor(max_workers=2 * FAILED_KEY_BURST) as pool:
        answers = list(pool.map(guess, range(2 * FAILED_KEY_BURST)))
    statuses = sorted(answer.status for answer in answers)
    assert statuses == [401] * FAILED_KEY_BURST + [429] * FAILED_KEY_BURST, statuses
    throttled = next(answer for answer in answers if answer.status == 429)
    assert throttled.headers["Retry-After"] == "60" and throttled.body["code"] == 429
    # The right key is not even checked while the source is throttled...
    assert api.mint(ttl="60", source=source).status == 429
    # ...and another source is not throttled at all.
    assert api.mint(ttl="60", source="127.0.0.15").status == 201


def test_no_key_password_or_secret_in_the_log(api):
    """Last in the file: greps the log of everything the tests above made the relay do."""
    probe = api.request("GET", "/v1/log-probe", source="127.0.0.16")
    assert probe.status == 404
    api.server.read_until('"GET /v1/log-probe HTTP/1.1" 404')
    log = "".join(api.server.log)
    assert "tokens API: revoked" in log and "wrong account id or API key from" in log
    assert '"POST /v1/accounts/acme/tokens?region=eu-west&ttl=60 HTTP/1.1" 201' in log
    assert len(api.secrets) > 10
    for secret in api.secrets:
        assert secret not in log


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


@pytest.mark.parametrize("argv, option", [
    # With a credential configured: without one, the first-run account is the API's.
    (["--api-port", "8080", "--user", "a:b"], "--api-db"),
    (["--api-port", "8080", "--user", "a:b", "--api-db", "sqlite:///tmp/accounts.db"],
     "--api-secret-file"),
    (["--api-port", "8080", "--api-listening-ip", "0.0.0.0"], "--api-cert"),
    (["--api-port", "8080", "--api-listening-ip", "2001:db8::1"], "--api-cert"),
    (["--api-port", "8080", "--api-listening-ip", "localhost"], "--api-listening-ip"),
    (["--api-port", "99999"], "--api-port"),
    (["--api-port", "8080", "--api-max-ttl", "0"], "--api-max-ttl"),
    (["--api-cert", "cert.pem"], "--api-pkey"),
    (["--public-host", "not a host"], "--public-host"),
    (["--regions-file", "/no/such/regions.toml"], "--regions-file"),
])
def test_bad_api_options_name_the_option(argv, option):
    with pytest.raises(SystemExit) as exit_:
        parse(*argv)
    message = str(exit_.value.code)
    assert message.startswith(f"turnrelay: {option}: "), message
    assert "\n" not in message


@pytest.mark.parametrize("content, problem", [
    ('[regions.eu]\nport = 3478\n', "region 'eu': host = \"...\" is required"),
    ('[regions.eu]\nhost = "a b"\n', "region 'eu': 'a b' is not a host name or an IP address"),
    ('[regions.eu]\nhost = "eu.example.org"\nport = 0\n', "region 'eu': port: 0 is not a port"),
    ('[regions.eu]\nhost = "eu.example.org"\ntls_port = 5349\n', "region 'eu': unknown key"),
    ('host = "eu.example.org"\n', "expected [regions.NAME] tables"),
])
def test_regions_file_errors_name_region_and_key(tmp_path, content, problem):
    regions = tmp_path / "regions.toml"
    regions.write_text(content)
    with pytest.raises(SystemExit) as exit_:
        parse("--regions-file", str(regions))
    assert str(exit_.value.code).startswith(f"turnrelay: --regions-file: {problem}"), exit_.value


def test_api_options_come_from_the_config_file_too(tmp_path):
    config = tmp_path / "turnrelay.toml"
    config.write_text('region = "eu-west"\npublic-host = "turn.example.org"\n'
                      'api-listening-ip = "::1"\napi-max-ttl = 3600\n')
    options = parse("--config", str(config))
    assert (options["region"], options["public-host"]) == ("eu-west", "turn.example.org")
    assert (options["api-listening-ip"], options["api-max-ttl"]) == ("::1", 3600)


def test_twistd_refuses_an_api_off_loopback_without_tls_in_one_line(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("s\n")
    result = subprocess.run(
        [TWISTD, "-n", "turnrelay", "--api-port", "8080", "--api-listening-ip", "0.0.0.0",
         "--auth", f"db:dsn=sqlite:///{tmp_path / 'accounts.db'},secret-file={secret}"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "turnrelay: --api-cert: required when --api-listening-ip 0.0.0.0 is not a loopback "
        "address: API keys must not cross a network in clear"]


def test_help_documents_the_api_options():
    result = subprocess.run([TWISTD, "-n", "turnrelay", "--help"], capture_output=True,
                            text=True, timeout=60)
    for option in ("--api-port", "--api-listening-ip", "--api-cert", "--api-pkey", "--api-db",
                   "--api-secret-file", "--api-max-ttl", "--region", "--public-host",
                   "--regions-file", "--geoip-db"):
        assert f"{option}=" in result.stdout, option
