"""Regions: the --regions-file format with locations and readiness, the sans-IO choice of the
nearest serving region, and the GeoIP adapter on a database written by the test."""
from __future__ import annotations

import os
import sys
from dataclasses import replace
from typing import Any, Dict

import pytest

from relay.service.build import regions_watch
from relay.service.options import Options
from relay.web.geoip import GeoIP
from relay.web.regions import (
    NoRegionServing,
    Region,
    choose,
    great_circle_km,
    regions_from_table,
)
from support.config_volume import kubelet_write
from support.geoip import CITIES, COUNTRY_ONLY, REGIONS_TOML, UNKNOWN, address, write_database

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@pytest.fixture(scope="module")
def regions() -> Dict[str, Region]:
    return regions_from_table(tomllib.loads(REGIONS_TOML))


@pytest.fixture(scope="module")
def geoip(tmp_path_factory) -> GeoIP:
    path = str(tmp_path_factory.mktemp("geoip") / "cities.mmdb")
    write_database(path)
    return GeoIP(path)


def table(**entry: Any) -> Dict[str, Any]:
    return {"regions": {"eu-west": {"host": "turn-eu.example.org", **entry}}}


def test_a_region_knows_where_it_is_and_whether_it_serves(regions) -> None:
    eu = regions["eu-west"]
    assert (eu.location, eu.country, eu.continent, eu.ready, eu.draining) == \
        ((53.35, -6.26), "IE", "EU", True, False)
    parsed = regions_from_table(table(ready=False))["eu-west"]
    assert (parsed.location, parsed.serving, parsed.state) == (None, False, "not ready")
    assert regions_from_table(table(draining=True))["eu-west"].state == "draining"


@pytest.mark.parametrize("entry, message", [
    ({"latitude": 91, "longitude": 0}, "region 'eu-west': latitude: 91 is not a number of "
                                       "degrees from -90 to 90"),
    ({"latitude": 10, "longitude": "east"}, "longitude: 'east' is not a number of degrees"),
    ({"latitude": 10}, "longitude: required with latitude"),
    ({"longitude": 10}, "latitude: required with longitude"),
    ({"latitude": True, "longitude": 0}, "latitude: True is not a number"),
    ({"country": "Ireland"}, "country: 'Ireland' is not an ISO 3166 code"),
    ({"continent": "Europe"}, "continent: 'Europe' is not one of AF AN AS EU NA OC SA"),
    ({"ready": "yes"}, "ready: 'yes' is not true or false"),
    ({"draining": 1}, "draining: 1 is not true or false"),
    ({"lat": 1}, "unknown key 'lat'"),
])
def test_a_bad_value_names_the_region_and_the_field(entry, message) -> None:
    with pytest.raises(ValueError, match="^region 'eu-west': ") as err:
        regions_from_table(table(**entry))
    assert message in str(err.value)


def test_auto_is_not_a_region_name() -> None:
    with pytest.raises(ValueError, match="region 'auto': 'auto' is the tokens API's word"):
        regions_from_table({"regions": {"auto": {"host": "turn.example.org"}}})


def test_great_circle_distance() -> None:
    # New York to London: 5,570 km.
    assert great_circle_km((40.7128, -74.0060), (51.5074, -0.1278)) == pytest.approx(5570, 5)
    assert great_circle_km((10, 20), (10, 20)) == 0


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("city", sorted(CITIES))
def test_every_continent_gets_its_nearest_region_then_the_next(regions, geoip, city,
                                                               family) -> None:
    choice = choose(regions, "us-east", "auto", geoip.locate(address(city, family)))
    assert (choice.first, choice.second, choice.reason, choice.note) == \
        (CITIES[city][3], CITIES[city][4], "geoip", None)


def test_the_order_holds_every_serving_region_first_and_fallback_first(regions, geoip) -> None:
    choice = choose(regions, "us-east", "auto", geoip.locate(address("paris")))
    assert choice.order == ("eu-west", "us-east", "ap-south", "us-west")  # Mumbai, then Oregon
    pinned = choose(regions, "us-east", "ap-south", (48.86, 2.35))
    assert pinned.order == ("ap-south", "eu-west", "us-west", "us-east")  # from Mumbai
    down = {**regions, "us-east": replace(regions["us-east"], draining=True)}
    assert choose(down, "us-east", "auto", None).order == ("us-west", "eu-west", "ap-south")


def test_auto_is_the_default_with_more_than_one_region(regions, geoip) -> None:
    assert choose(regions, "us-east", None, geoip.locate(address("paris"))).first == "eu-west"
    only = {"home": Region("turn.example.org")}
    assert choose(only, "home", None, (48.86, 2.35)) == choose(only, "home", None, None) == \
        choose(only, "home", "auto", None)
    assert choose(only, "home", None, None).reason == "default"


def test_a_region_not_serving_is_skipped(regions, geoip) -> None:
    paris = geoip.locate(address("paris"))
    down = {**regions, "eu-west": replace(regions["eu-west"], ready=False)}
    choice = choose(down, "us-east", "auto", paris)
    assert (choice.first, choice.second) == ("us-east", "ap-south")  # Mumbai before Oregon
    draining = {**regions, "us-west": replace(regions["us-west"], draining=True)}
    choice = choose(draining, "us-east", "auto", geoip.locate(address("los-angeles")))
    assert (choice.first, choice.second) == ("us-east", "eu-west")


def test_a_pin_holds_and_its_fallback_is_the_region_nearest_it(regions) -> None:
    choice = choose(regions, "us-east", "ap-south", (48.86, 2.35))
    assert (choice.first, choice.second, choice.reason, choice.note) == \
        ("ap-south", "eu-west", "pinned", None)


def test_a_pinned_region_not_serving_gives_the_nearest_serving_one_and_says_so(regions) -> None:
    draining = {**regions, "us-west": replace(regions["us-west"], draining=True)}
    choice = choose(draining, "us-east", "us-west", (48.86, 2.35))
    assert (choice.first, choice.second, choice.reason) == ("us-east", "eu-west", "pinned")
    assert choice.note == "us-west is draining: the nearest serving region"


def test_an_unlocated_client_gets_the_default_region_and_is_told(regions) -> None:
    choice = choose(regions, "eu-west", "auto", None, "198.18.200.1 is not in the database")
    assert (choice.first, choice.second, choice.reason, choice.note) == \
        ("eu-west", "us-east", "default", "198.18.200.1 is not in the database")
    down = {**regions, "eu-west": replace(regions["eu-west"], ready=False)}
    choice = choose(down, "eu-west", "auto", None, "no database")
    assert (choice.first, choice.reason) == ("us-east", "default")
    assert choice.note == "no database; eu-west is not ready: the nearest serving region"


def test_no_region_serving(regions) -> None:
    with pytest.raises(NoRegionServing):
        choose({name: replace(region, ready=False) for name, region in regions.items()},
               "us-east", "auto", (0.0, 0.0))


def test_geoip_reads_ipv4_mapped_addresses_as_ipv4(geoip) -> None:
    assert geoip.locate("::ffff:" + address("paris")) == geoip.locate(address("paris")) \
        == (48.86, 2.35)


def test_geoip_unknown_and_country_only_addresses_have_no_place(geoip) -> None:
    assert geoip.locate(UNKNOWN) is None
    assert geoip.locate(COUNTRY_ONLY.replace("0/24", "9")) is None
    assert geoip.locate("not an address") is None


def test_a_missing_or_garbled_database_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"cannot read .*absent.mmdb as a MaxMind/DB-IP .mmdb "
                                         r"database: .*No such file"):
        GeoIP(str(tmp_path / "absent.mmdb"))
    garbled = tmp_path / "garbled.mmdb"
    garbled.write_bytes(b"\x00" * 4096)
    with pytest.raises(ValueError, match="garbled.mmdb as a MaxMind/DB-IP .mmdb database"):
        GeoIP(str(garbled))


def test_the_geoip_db_option_opens_the_database_or_names_itself(tmp_path, geoip) -> None:
    options = Options()
    options.parseOptions(["--geoip-db", geoip.path])
    assert options["geoip"].locate(address("paris")) == (48.86, 2.35)
    garbled = tmp_path / "garbled.mmdb"
    garbled.write_text("not a database")
    with pytest.raises(SystemExit) as exit_:
        Options().parseOptions(["--geoip-db", str(garbled)])
    assert str(exit_.value.code).startswith(
        f"turnrelay: --geoip-db: cannot read {garbled} as a MaxMind/DB-IP .mmdb database")


def test_an_empty_regions_file_holds_no_regions_yet(tmp_path) -> None:
    """What the Kubernetes operator's directory is until a region has a public address."""
    assert regions_from_table({}) == {}
    empty = tmp_path / "regions.toml"
    empty.write_text("")
    options = Options()
    options.parseOptions(["--regions-file", str(empty)])
    assert options["regions"] == {}


class _Api:
    """The part of the tokens API the watch hands regions to."""

    def __init__(self) -> None:
        self.regions: Dict[str, Region] = {}
        self.handed: list = []

    def set_regions(self, regions: Dict[str, Region]) -> None:
        self.regions = dict(regions)
        self.handed.append(self.regions)


def test_the_watch_follows_a_config_map_volume_through_the_kubelets_symlink_swap(tmp_path) -> None:
    directory = tmp_path / "regions"
    directory.mkdir()
    serving = '[regions.eu-west]\nhost = "turn-eu.example.org"\nready = true \n'
    kubelet_write(directory, serving, "2026_12_03_10_00_00.000000001")
    path = str(directory / "regions.toml")
    home = {"us-east": Region("turn-us.example.org")}
    api = _Api()
    look = regions_watch(path, home, api)
    look()
    assert api.handed == []  # unchanged since the watch began
    # The same size and the same modification time, as a swap within one clock tick gives.
    before = os.stat(path)
    down = serving.replace("ready = true ", "ready = false")
    kubelet_write(directory, down, "2026_12_03_10_00_01.000000002")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (os.stat(path).st_size, os.stat(path).st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    look()
    assert [sorted(handed) for handed in api.handed] == [["eu-west", "us-east"]]
    assert api.regions["eu-west"].state == "not ready" and api.regions["us-east"].serving
    look()
    assert len(api.handed) == 1  # looked at again, unchanged: nothing handed out twice
    kubelet_write(directory, "[regions.eu-west]\nhost = 7\n", "2026_12_03_10_00_02.000000003")
    look()
    assert len(api.handed) == 1 and api.regions["eu-west"].state == "not ready"  # kept
    kubelet_write(directory, "", "2026_12_03_10_00_03.000000004")
    look()
    assert api.regions == home  # the directory emptied: this region alone
