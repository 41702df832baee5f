"""A GeoIP city database written by the test (mmdb-writer) and four regions at their real
places, for the nearest-region tests: one network per city, an IPv4 and an IPv6 one."""
from __future__ import annotations

import ipaddress
from typing import Dict, Tuple

from mmdb_writer import MMDBWriter
from netaddr import IPSet

# The regions, where the cloud regions of these names are (N. Virginia, Oregon, Dublin, Mumbai).
REGIONS_TOML = """
[regions.us-east]
host = "turn-us-east.example.org"
latitude = 38.94
longitude = -77.46
country = "US"
continent = "NA"

[regions.us-west]
host = "turn-us-west.example.org"
latitude = 45.84
longitude = -119.70
country = "US"
continent = "NA"

[regions.eu-west]
host = "turn-eu-west.example.org"
latitude = 53.35
longitude = -6.26
country = "IE"
continent = "EU"

[regions.ap-south]
host = "turn-ap-south.example.org"
latitude = 19.08
longitude = 72.88
country = "IN"
continent = "AS"
"""

# City: (its coordinates, its IPv4 network, its IPv6 network, the nearest region, the next).
CITIES: Dict[str, Tuple[Tuple[float, float], str, str, str, str]] = {
    "new-york": ((40.71, -74.01), "198.18.1.0/24", "2001:db8:1::/48", "us-east", "us-west"),
    "los-angeles": ((34.05, -118.24), "198.18.2.0/24", "2001:db8:2::/48", "us-west", "us-east"),
    "paris": ((48.86, 2.35), "198.18.3.0/24", "2001:db8:3::/48", "eu-west", "us-east"),
    "singapore": ((1.35, 103.82), "198.18.4.0/24", "2001:db8:4::/48", "ap-south", "eu-west"),
    "sao-paulo": ((-23.55, -46.63), "198.18.5.0/24", "2001:db8:5::/48", "us-east", "eu-west"),
    "nairobi": ((-1.29, 36.82), "198.18.6.0/24", "2001:db8:6::/48", "ap-south", "eu-west"),
    "sydney": ((-33.87, 151.21), "198.18.7.0/24", "2001:db8:7::/48", "ap-south", "us-west"),
}
COUNTRY_ONLY = "198.18.9.0/24"  # a record without coordinates
UNKNOWN = "198.18.200.1"  # in no network of the database


def address(city: str, family: int = 4) -> str:
    """An address in `city`'s IPv4 or IPv6 network."""
    return str(ipaddress.ip_network(CITIES[city][1 if family == 4 else 2])[7])


def write_database(path: str) -> None:
    """A city database in MaxMind's layout (`location.latitude`, `location.longitude`)."""
    writer = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type="GeoIP2-City",
                        description="turnrelay test cities")
    for name, ((latitude, longitude), v4, v6, _, _) in CITIES.items():
        writer.insert_network(IPSet([v4, v6]), {
            "city": {"names": {"en": name}},
            "location": {"latitude": latitude, "longitude": longitude}})
    writer.insert_network(IPSet([COUNTRY_ONLY]), {"country": {"iso_code": "FR"}})
    writer.to_db_file(path)
