"""Where an address is, from a MaxMind or DB-IP city database (`.mmdb`, --geoip-db).

A thin adapter over the `maxminddb` reader: the tokens API asks for a point and hands it to
the sans-IO `relay.web.regions.choose`.  Both vendors' city databases keep the coordinates
under `location`; an address the database does not hold, or holds without coordinates (a
country-only record), is unknown and the tokens API falls back to its default region.
"""
from __future__ import annotations

import ipaddress
from typing import Optional

import maxminddb
from maxminddb.errors import InvalidDatabaseError

from relay.web.regions import Point


class GeoIP:
    """An open --geoip-db: ValueError at start-up when the file is missing or is not one."""

    def __init__(self, path: str):
        try:
            self._reader = maxminddb.open_database(path)
        except (OSError, InvalidDatabaseError, ValueError) as err:
            raise ValueError(f"cannot read {path} as a MaxMind/DB-IP .mmdb database: {err}") \
                from None
        self.path = path

    def locate(self, address: str) -> Optional[Point]:
        """The latitude and longitude the database gives `address`, None when it has none."""
        try:
            ip = ipaddress.ip_address(address)
            # A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d, which not every
            # database aliases to its IPv4 tree.
            mapped = getattr(ip, "ipv4_mapped", None)
            record = self._reader.get(mapped or ip)
        except (ValueError, InvalidDatabaseError):  # an IPv6 address in an IPv4-only database
            return None
        location = record.get("location") if isinstance(record, dict) else None
        if not isinstance(location, dict):
            return None
        latitude, longitude = location.get("latitude"), location.get("longitude")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                   for v in (latitude, longitude)):
            return None
        return float(latitude), float(longitude)  # type: ignore[arg-type]

    def close(self) -> None:
        self._reader.close()
