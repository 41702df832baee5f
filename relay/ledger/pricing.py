"""What usage costs: each region's rate per MB, the instant each rate takes effect, and charges.

The rule, for every report and API answer:

- Billable bytes are the payload bytes the client sent plus those it received (`relay.ledger.records`);
  an MB is 10**6 bytes.
- Usage is charged at its region's rate in effect when it was used, that is at the time of the
  `UsageDelta` that carries it, not at the session's start: a session running across a rate
  change pays the old rate before it and the new one after, and a rate added to the table
  later, effective from its own date, never changes a charge for earlier usage.  A delta covers
  at most one --accounting-interval, so that is the rule's precision.
- Money is `Decimal`, never float.  A charge is computed exactly from byte sums (the bytes of
  each rate period times its rate, over 10**6) and rounded once, half up, to 6 decimal places:
  per row of a report, so a total is the exact total rounded, not a sum of rounded rows.
- Usage of a region with no rate in effect at its time has no charge (None): a report shows it
  blank rather than free.

Rates come from `--region NAME --rate-per-mb DECIMAL` (one rate, in effect since always) and
`--rate-table FILE`, a TOML file of the form

    [[rates.us-east]]
    rate_per_mb = "0.0004"              # a string or a bare number, read as an exact decimal
    effective = 2026-01-01T00:00:00Z    # UTC: a TOML date-time ending in Z, or a date

    [[rates.us-east]]
    rate_per_mb = "0.0005"
    effective = 2026-07-01T00:00:00Z

Times are RFC 3339 UTC text to the second, the form the ledger keeps (`relay.ledger.records`), so a rate
period is a pair of strings compared as text, in Python and in SQL alike.
"""
from __future__ import annotations

import bisect
import decimal
import re
from datetime import date, datetime, time, timezone
from decimal import Decimal
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from relay.util.tomlfile import read_toml

MB = 10 ** 6
CHARGE_PLACES = Decimal("0.000001")  # charges are rounded half up to this, once per row
MB_PLACES = Decimal("0.000001")      # bytes / 10**6 is exact at 6 places
# Wide enough that no product or sum of byte counts and rates is ever rounded before the end.
_EXACT = decimal.Context(prec=80, traps=[decimal.InvalidOperation, decimal.Inexact])
ALWAYS = "0001-01-01T00:00:00Z"      # when --rate-per-mb's rate takes effect
_UTC_TEXT = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


class RateError(ValueError):
    """A bad rate or rate table: `option` is the flag at fault, without its dashes."""

    def __init__(self, option: str, problem: str):
        super().__init__(f"--{option}: {problem}")
        self.option, self.problem = option, problem


def utc_text(moment: datetime) -> str:
    """`moment` (aware) as the ledger's RFC 3339 UTC form, `2026-11-23T12:00:00Z`."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_utc(value: Any) -> str:
    """A time given by a person or a TOML file, as the ledger's RFC 3339 UTC text.

    Takes `2026-11-23T12:00:00Z` (or another explicit offset, converted to UTC), a date
    `2026-11-23` (its midnight UTC), or the same as TOML date and date-time values.  A time of
    day without an offset is ambiguous and refused, as is a fraction of a second: the ledger
    keeps whole seconds.
    """
    if isinstance(value, str):
        text = value.strip()
        try:
            if len(text) == 10:
                value = date.fromisoformat(text)
            else:
                value = datetime.fromisoformat(text[:-1] + "+00:00" if text[-1:] in "zZ"
                                               else text)
        except (ValueError, IndexError):
            raise ValueError(f"{text!r} is not an RFC 3339 time such as 2026-11-23T12:00:00Z "
                             "or a date such as 2026-11-23") from None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError(f"{value.isoformat()!r} has no UTC offset: end it with Z")
        if value.microsecond:
            raise ValueError(f"{value.isoformat()!r}: whole seconds only")
        return utc_text(value)
    if isinstance(value, date):
        return utc_text(datetime.combine(value, time(), timezone.utc))
    raise ValueError(f"{value!r} is not a time")


def parse_rate(value: Any) -> Decimal:
    """A rate per MB: a non-negative decimal number, from text or an exact TOML number."""
    if isinstance(value, bool) or not isinstance(value, (str, int, Decimal)):
        raise ValueError(f"{value!r} is not a decimal number such as \"0.0004\"")
    try:
        rate = Decimal(value.strip() if isinstance(value, str) else value)
    except decimal.InvalidOperation:
        raise ValueError(f"{value!r} is not a decimal number such as 0.0004") from None
    if not rate.is_finite() or rate < 0:
        raise ValueError(f"{value!r}: a rate per MB is a finite number, 0 or more")
    return rate


def megabytes(byte_count: int) -> Decimal:
    """`byte_count` in MB, exact: an integer over 10**6 has at most 6 decimal places."""
    return Decimal(byte_count).scaleb(-6, _EXACT).quantize(MB_PLACES, context=_EXACT)


def charge(parts: Iterable[Tuple[int, Optional[Decimal]]]) -> Optional[Decimal]:
    """The charge for (billable bytes, rate per MB) parts, summed exactly and rounded once,
    half up, to CHARGE_PLACES; None when bytes were used where no rate was in effect."""
    total = Decimal(0)
    for byte_count, rate in parts:
        if not byte_count:
            continue
        if rate is None:
            return None
        total = _EXACT.add(total, _EXACT.multiply(Decimal(byte_count), rate))
    return total.scaleb(-6, _EXACT).quantize(CHARGE_PLACES, rounding=decimal.ROUND_HALF_UP)


def _check_times(times: List[str]) -> None:
    if not all(_UTC_TEXT.fullmatch(t) for t in times) or len(set(times)) != len(times):
        raise ValueError("effective times must be distinct UTC times")


class RateTable:
    """Each region's rates, in the order they take effect.  Every time is checked here to be
    RFC 3339 UTC text, the one check the usage reader relies on when it writes them into SQL."""

    def __init__(self, rates: Mapping[str, Sequence[Tuple[str, Decimal]]]):
        self._rates: Dict[str, List[Tuple[str, Decimal]]] = {}
        for region, entries in rates.items():
            ordered = sorted(entries)
            try:
                _check_times([effective for effective, _ in ordered])
            except ValueError as err:
                raise ValueError(f"region {region!r}: {err}") from None
            self._rates[region] = ordered
        self._times = {region: [effective for effective, _ in entries]
                       for region, entries in self._rates.items()}
        self._boundaries = sorted({effective for times in self._times.values()
                                   for effective in times})

    @property
    def regions(self) -> List[str]:
        return sorted(self._rates)

    def rate_at(self, region: str, at: str) -> Optional[Decimal]:
        """The rate of `region` in effect at `at` (RFC 3339 UTC text); None if none was."""
        i = bisect.bisect_right(self._times.get(region, []), at)
        return self._rates[region][i - 1][1] if i else None

    def boundaries(self) -> List[str]:
        """Every instant at which some region's rate changes, in order: between two of them
        every region has one rate, so usage summed per such period is charged exactly."""
        return list(self._boundaries)

    def period_start(self, period: int) -> str:
        """The first instant of period `period`: 0 is before the first boundary, i after the
        i-th (numbered as `boundaries()`), the periods SQL sums usage by.  Period 0 starts
        before any time, so no rate is in effect in it."""
        return self._boundaries[period - 1] if period else ""


def _table_rates(table: Mapping[str, Any]) -> Dict[str, List[Tuple[str, Decimal]]]:
    rates = table.get("rates")
    if not isinstance(rates, dict) or set(table) != {"rates"}:
        raise ValueError("expected [[rates.REGION]] entries with rate_per_mb and effective, "
                         "and nothing else")
    parsed: Dict[str, List[Tuple[str, Decimal]]] = {}
    for region, entries in rates.items():
        try:
            if not isinstance(entries, list) or not entries:
                raise ValueError("expected [[rates.REGION]] entries (an array of tables)")
            parsed[region] = []
            for entry in entries:
                if not isinstance(entry, dict) or set(entry) != {"rate_per_mb", "effective"}:
                    raise ValueError("each entry has rate_per_mb and effective, and only these")
                parsed[region].append((parse_utc(entry["effective"]),
                                       parse_rate(entry["rate_per_mb"])))
            _check_times([effective for effective, _ in parsed[region]])
        except ValueError as err:
            raise ValueError(f"region {region!r}: {err}") from None
    return parsed


def read_rate_table(path: str) -> Dict[str, List[Tuple[str, Decimal]]]:
    """The rates of a --rate-table file, every number read as an exact Decimal."""
    return _table_rates(read_toml(path, parse_float=Decimal))


def rates_from_options(region: str, rate_per_mb: Optional[str],
                       rate_table: Optional[str]) -> RateTable:
    """The rates that `--region`, `--rate-per-mb` and `--rate-table` give, for the relay and
    the `turnrelay usage` tool alike; RateError naming the flag at fault."""
    rates: Dict[str, List[Tuple[str, Decimal]]] = {}
    if rate_table is not None:
        try:
            rates = read_rate_table(rate_table)
        except ValueError as err:
            raise RateError("rate-table", str(err)) from None
    if rate_per_mb is not None:
        try:
            rate = parse_rate(rate_per_mb)
        except ValueError as err:
            raise RateError("rate-per-mb", str(err)) from None
        if region in rates:
            raise RateError("rate-per-mb", f"region {region!r} also has rates in --rate-table: "
                                           "give them in one place")
        rates[region] = [(ALWAYS, rate)]
    return RateTable(rates)
