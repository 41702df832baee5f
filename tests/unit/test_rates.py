"""Rates and charges (relay/rates.py): exact Decimal arithmetic, the rounding rule, rate
periods, and one clear line for every bad rate or rate table, from the relay itself."""
import subprocess
from decimal import Decimal

import pytest

from relay.ledger.pricing import RateTable, charge, megabytes, parse_utc, rates_from_options
from support.servers import TWISTD

TABLE = """
[[rates.us-east]]
rate_per_mb = 0.0004
effective = 2026-01-01T00:00:00Z

[[rates.us-east]]
rate_per_mb = "0.00055"
effective = 2026-11-23T12:00:00Z

[[rates.eu-west]]
rate_per_mb = "0.001"
effective = 2026-06-01
"""


def test_a_rate_is_in_effect_from_its_own_instant(tmp_path):
    (tmp_path / "rates.toml").write_text(TABLE)
    rates = rates_from_options("ap-south", "0.0002", str(tmp_path / "rates.toml"))
    assert rates.regions == ["ap-south", "eu-west", "us-east"]
    assert rates.rate_at("us-east", "2025-12-31T23:59:59Z") is None
    assert rates.rate_at("us-east", "2026-01-01T00:00:00Z") == Decimal("0.0004")
    assert rates.rate_at("us-east", "2026-11-23T11:59:59Z") == Decimal("0.0004")
    assert rates.rate_at("us-east", "2026-11-23T12:00:00Z") == Decimal("0.00055")
    assert rates.rate_at("eu-west", "2026-06-01T00:00:00Z") == Decimal("0.001")
    assert rates.rate_at("ap-south", "1999-01-01T00:00:00Z") == Decimal("0.0002")
    assert rates.rate_at("nowhere", "2026-11-23T12:00:00Z") is None
    bounds = rates.boundaries()
    assert bounds == ["0001-01-01T00:00:00Z", "2026-01-01T00:00:00Z", "2026-06-01T00:00:00Z",
                      "2026-11-23T12:00:00Z"]
    assert [rates.period_start(i) for i in range(5)] == ["", *bounds]
    assert rates.rate_at("ap-south", rates.period_start(0)) is None


def test_charges_are_exact_sums_rounded_once_half_up():
    # 1 byte at 0.5 per MB is 0.0000005: half, rounded up; three such rows summed rounded would
    # be 0.000003, the exact total rounded once is 0.000002.
    assert charge([(1, Decimal("0.5"))]) == Decimal("0.000001")
    assert charge([(1, Decimal("0.5"))] * 3) == Decimal("0.000002")
    assert charge([(1, Decimal("0.4"))]) == Decimal("0.000000")
    big = 123_456_789_012_345
    assert charge([(big, Decimal("0.0004")), (7, Decimal("0.00055"))]) == Decimal("49382.715605")
    assert charge([(0, None), (10, Decimal("1"))]) == Decimal("0.000010")
    assert charge([(5, None), (10, Decimal("1"))]) is None
    assert megabytes(1_234_567) == Decimal("1.234567") and megabytes(0) == Decimal("0.000000")
    assert str(charge([])) == "0.000000"


@pytest.mark.parametrize("given, expected", [
    ("2026-11-23T12:00:00Z", "2026-11-23T12:00:00Z"),
    ("2026-11-23T13:30:00+01:30", "2026-11-23T12:00:00Z"),
    ("2026-11-23", "2026-11-23T00:00:00Z"),
])
def test_times_are_utc_to_the_second(given, expected):
    assert parse_utc(given) == expected


@pytest.mark.parametrize("given", ["2026-11-23T12:00:00", "2026-11-23T12:00:00.5Z", "yesterday",
                                   "2026-13-01", ""])
def test_an_ambiguous_or_bad_time_is_refused(given):
    with pytest.raises(ValueError):
        parse_utc(given)


def test_a_rate_table_must_have_distinct_times():
    with pytest.raises(ValueError):
        RateTable({"x": [("2026-01-01T00:00:00Z", Decimal(1)), ("2026-01-01T00:00:00Z", Decimal(2))]})


@pytest.mark.e2e  # runs twistd turnrelay, which must refuse to start
@pytest.mark.parametrize("rates, arguments, error", [
    (None, ["--rate-per-mb", "cheap"],
     "--rate-per-mb: 'cheap' is not a decimal number such as 0.0004"),
    (None, ["--rate-per-mb", "-1"], "--rate-per-mb: '-1': a rate per MB is a finite number, 0 or more"),
    (None, ["--rate-table", "/nonexistent/rates.toml"],
     "--rate-table: cannot read /nonexistent/rates.toml: No such file or directory"),
    ("[[rates.us-east]]\nrate_per_mb = 0.1\neffective = 2026-01-01T00:00:00\n", [],
     "--rate-table: region 'us-east': '2026-01-01T00:00:00' has no UTC offset: end it with Z"),
    ("[[rates.us-east]]\nrate_per_mb = 0.1\n", [],
     "--rate-table: region 'us-east': each entry has rate_per_mb and effective, and only these"),
    ("[rates.us-east]\nrate_per_mb = 0.1\n", [],
     "--rate-table: region 'us-east': expected [[rates.REGION]] entries (an array of tables)"),
    ("[[rates.us-east]]\nrate_per_mb = inf\neffective = 2026-01-01\n", [],
     "--rate-table: region 'us-east': Decimal('Infinity'): a rate per MB is a finite number, 0 "
     "or more"),
    ("[[rates.us-east]]\nrate_per_mb = 1\neffective = 2026-01-01\n"
     "[[rates.us-east]]\nrate_per_mb = 2\neffective = 2026-01-01T00:00:00Z\n", [],
     "--rate-table: region 'us-east': effective times must be distinct UTC times"),
    ("[[rates.us-east]]\nrate_per_mb = 1\neffective = 2026-01-01\n",
     ["--region", "us-east", "--rate-per-mb", "0.1"],
     "--rate-per-mb: region 'us-east' also has rates in --rate-table: give them in one place"),
])
def test_a_bad_rate_is_one_clear_line_naming_the_flag(tmp_path, rates, arguments, error):
    if rates is not None:
        (tmp_path / "rates.toml").write_text(rates)
        arguments = [*arguments, "--rate-table", str(tmp_path / "rates.toml")]
    result = subprocess.run([TWISTD, "-n", "turnrelay", "--no-tls", *arguments],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and result.stderr.strip() == f"turnrelay: {error}"
