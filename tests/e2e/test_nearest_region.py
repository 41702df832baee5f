"""The nearest region, end to end: a real `twistd turnrelay` (its default workers; the tokens
API lives in the parent) with four regions at their real places and a GeoIP city database
written by the test, asked for tokens for end users of every continent."""
from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from relay.service.host import usable_cpus
from support.api import Api, Response
from support.db import create_accounts
from support.geoip import CITIES, REGIONS_TOML, UNKNOWN, address, write_database
from support.servers import TWISTD, free_port, start_server

SECRET = "regions-mint-secret"
HOSTS = {name: f"turn-{name}.example.org" for name in ("us-east", "us-west", "eu-west", "ap-south")}


@pytest.fixture(scope="module")
def regions_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("regions-file") / "regions.toml"
    path.write_text(REGIONS_TOML)
    return path


@pytest.fixture(scope="module")
def api(tmp_path_factory, in_reactor, regions_file) -> Iterator[Api]:  # noqa: F811
    tmp = tmp_path_factory.mktemp("regions")
    dsn = f"sqlite:///{tmp / 'accounts.db'}"
    keys = in_reactor(create_accounts, dsn, ("acme",))
    secret_file = tmp / "mint.secret"
    secret_file.write_text(f"{SECRET}\n")
    geoip = tmp / "cities.mmdb"
    write_database(str(geoip))
    port = free_port()
    server = start_server("--auth", f"db:dsn={dsn},secret-file={secret_file}",
                          "--api-port", str(port), "--region", "us-east",
                          "--regions-file", str(regions_file), "--geoip-db", str(geoip),
                          "--workers", str(usable_cpus()),  # the default, after start_server's 1
                          users=(), state_dir=str(tmp / "state"))
    try:
        server.read_until(f"tokens API listening on http [127.0.0.1]:{port}")
        server.read_until("account database loaded")
        yield Api(server, port, None, keys, [SECRET, *keys.values()])
    finally:
        server.stop()


def hosts(token: dict) -> list:
    """The hosts of the ICE servers in order, one per run of a host's entries."""
    seen: list = []
    for server in token["ice_servers"]:
        host = server["urls"].split(":")[1]
        if not seen or seen[-1] != host:
            seen.append(host)
    return seen


def mint(api: Api, **form: str) -> Response:
    return api.mint(source="127.0.0.31", **form)


@pytest.mark.parametrize("family", [4, 6])
def test_every_continent_gets_its_nearest_region_then_the_next(api, family) -> None:
    for city, (_, _, _, nearest, second) in CITIES.items():
        token = mint(api, client_ip=address(city, family)).body
        assert (token["region"], token["fallback_region"], token["region_reason"]) == \
            (nearest, second, "geoip"), city
        assert "region_note" not in token, city
        assert hosts(token) == [HOSTS[nearest], HOSTS[second]], city
        assert [s["urls"] for s in token["ice_servers"]][:4] == [
            f"stun:{HOSTS[nearest]}:3478", f"turn:{HOSTS[nearest]}:3478?transport=udp",
            f"turn:{HOSTS[nearest]}:3478?transport=tcp",
            f"turns:{HOSTS[nearest]}:5349?transport=tcp"]
        assert all(s["username"] == token["username"] for s in token["ice_servers"][1:]
                   if s["urls"].startswith("turn")), city


def test_an_unknown_address_gets_the_default_region_and_is_told(api) -> None:
    token = mint(api, client_ip=UNKNOWN).body
    assert (token["region"], token["fallback_region"], token["region_reason"]) == \
        ("us-east", "us-west", "default")
    assert token["region_note"] == f"{UNKNOWN} is not in the GeoIP database: the default region"
    # Without client_ip, the request's own source is located: loopback is in no database.
    token = mint(api).body
    assert (token["region"], token["region_reason"]) == ("us-east", "default")
    assert token["region_note"] == \
        "127.0.0.31 is not in the GeoIP database: the default region"


def test_region_pins(api) -> None:
    token = mint(api, client_ip=address("paris"), region="ap-south").body
    assert (token["region"], token["fallback_region"], token["region_reason"]) == \
        ("ap-south", "eu-west", "pinned")
    assert hosts(token) == [HOSTS["ap-south"], HOSTS["eu-west"]]
    auto = mint(api, client_ip=address("paris"), region="auto").body
    assert (auto["region"], auto["region_reason"]) == ("eu-west", "geoip")


def test_regions_n_returns_that_many_regions_each_with_its_servers(api) -> None:
    token = mint(api, client_ip=address("paris"), regions="3").body
    assert [region["name"] for region in token["regions"]] == ["eu-west", "us-east", "ap-south"]
    assert (token["region"], token["fallback_region"]) == ("eu-west", "us-east")
    for region in token["regions"]:
        assert [s["urls"].split(":")[1] for s in region["ice_servers"]] == \
            [HOSTS[region["name"]]] * 4
    assert token["ice_servers"] == [s for region in token["regions"]
                                    for s in region["ice_servers"]]
    assert [r["name"] for r in mint(api, client_ip=address("paris"), regions="10").body[
        "regions"]] == ["eu-west", "us-east", "ap-south", "us-west"]
    one = mint(api, client_ip=address("paris"), regions="1").body
    assert hosts(one) == [HOSTS["eu-west"]] and one["fallback_region"] == "us-east"
    assert len(mint(api, client_ip=address("paris")).body["regions"]) == 2  # the default
    for bad in ("0", "11", "two"):
        refused = mint(api, regions=bad)
        assert (refused.status, refused.body["message"]) == \
            (400, "regions: expected a whole number from 1 to 10"), bad


def test_bad_fields_are_named(api) -> None:
    bad_ip = mint(api, client_ip="paris")
    assert (bad_ip.status, bad_ip.body["message"]) == \
        (400, "client_ip: expected an IPv4 or IPv6 address")
    bad_region = mint(api, region="mars")
    assert (bad_region.status, bad_region.body["message"]) == \
        (400, "region: expected auto or one of ap-south, eu-west, us-east, us-west")


def test_a_region_marked_not_ready_or_draining_is_skipped_within_seconds(api,
                                                                        regions_file) -> None:
    paris = address("paris")
    assert mint(api, client_ip=paris).body["region"] == "eu-west"
    try:
        regions_file.write_text(REGIONS_TOML.replace(
            'continent = "EU"', 'continent = "EU"\nready = false'))
        api.server.read_until("--regions-file changed: ap-south ready, eu-west not ready, "
                              "us-east ready, us-west ready", timeout=5)
        token = mint(api, client_ip=paris).body
        assert (token["region"], token["fallback_region"], token["region_reason"]) == \
            ("us-east", "ap-south", "geoip")
        assert HOSTS["eu-west"] not in hosts(token)
        pinned = mint(api, client_ip=paris, region="eu-west").body
        assert (pinned["region"], pinned["region_reason"], pinned["region_note"]) == \
            ("us-east", "pinned", "eu-west is not ready: the nearest serving region")

        regions_file.write_text(REGIONS_TOML.replace(
            'continent = "NA"', 'continent = "NA"\ndraining = true', 1))
        api.server.read_until("--regions-file changed: ap-south ready, eu-west ready, "
                              "us-east draining, us-west ready", timeout=5)
        token = mint(api, client_ip=address("new-york")).body
        assert (token["region"], token["fallback_region"]) == ("us-west", "eu-west")
        default = mint(api, client_ip=UNKNOWN).body
        assert (default["region"], default["region_reason"]) == ("us-west", "default")
        assert default["region_note"] == f"{UNKNOWN} is not in the GeoIP database: the " \
            "default region; us-east is draining: the nearest serving region"

        regions_file.write_text(REGIONS_TOML.replace("latitude = 53.35", "latitude = 530"))
        api.server.read_until("--regions-file changed but does not load, keeping the old "
                              "regions: region 'eu-west': latitude: 530", timeout=5)
        assert mint(api, client_ip=address("new-york")).body["region"] == "us-west"
    finally:
        regions_file.write_text(REGIONS_TOML)
        api.server.read_until("--regions-file changed: ap-south ready, eu-west ready, "
                              "us-east ready, us-west ready", timeout=5)
    assert mint(api, client_ip=paris).body["region"] == "eu-west"


@pytest.mark.parametrize("content, message", [
    (None, "No such file or directory"),
    (b"\x00garbled" * 100, "Is this a valid MaxMind DB file?"),
])
def test_a_missing_or_garbled_database_is_a_start_up_error(tmp_path, content, message) -> None:
    database = tmp_path / "cities.mmdb"
    if content is not None:
        database.write_bytes(content)
    secret = tmp_path / "secret"
    secret.write_text("s\n")
    result = subprocess.run(
        [TWISTD, "-n", "turnrelay", "--api-port", str(free_port()), "--geoip-db", str(database),
         "--auth", f"db:dsn=sqlite:///{tmp_path / 'accounts.db'},secret-file={secret}"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and result.stdout == ""
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"turnrelay: --geoip-db: cannot read {database} as a MaxMind/DB-IP "
                           ".mmdb database: "), line
    assert message in line, line
