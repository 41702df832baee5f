"""SASLprep (RFC 4013) for passwords, as RFC 8489 section 9.2.2 asks before hashing a key."""
from __future__ import annotations

import stringprep
import unicodedata

_PROHIBITED = (
    stringprep.in_table_c12, stringprep.in_table_c21_c22, stringprep.in_table_c3,
    stringprep.in_table_c4, stringprep.in_table_c5, stringprep.in_table_c6,
    stringprep.in_table_c7, stringprep.in_table_c8, stringprep.in_table_c9,
)


def saslprep(text: str) -> str:
    """Map, normalise (NFKC) and check `text`; raise ValueError when it is not allowed."""
    mapped = "".join(
        " " if stringprep.in_table_c12(ch) else ch
        for ch in text if not stringprep.in_table_b1(ch)
    )
    normal = unicodedata.normalize("NFKC", mapped)
    for ch in normal:
        if any(check(ch) for check in _PROHIBITED) or stringprep.in_table_a1(ch):
            raise ValueError(f"character U+{ord(ch):04X} is not allowed in a password")
    rtl = [stringprep.in_table_d1(ch) for ch in normal]
    if any(rtl):
        if any(stringprep.in_table_d2(ch) for ch in normal) or not (rtl[0] and rtl[-1]):
            raise ValueError("password mixes right-to-left and left-to-right text")
    return normal
