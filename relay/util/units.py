"""Megabytes as quotas, rates and reports count them: 10^6 bytes."""
from __future__ import annotations

from decimal import Decimal, InvalidOperation

MB = 10 ** 6


def parse_megabytes(text: str) -> int:
    """Bytes in `text` megabytes (10^6 bytes; decimals allowed down to one byte)."""
    try:
        value = Decimal(text.strip()) * MB
    except InvalidOperation:
        raise ValueError("not a number of megabytes") from None
    if not value.is_finite() or value < 0:
        raise ValueError("must be 0 (unlimited) or more megabytes")
    if value != value.to_integral_value():
        raise ValueError("must be whole bytes: at most 6 decimals")
    return int(value)
