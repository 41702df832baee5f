"""relay.util.keyed_hmac: the same MAC as the standard library's `hmac`, for any key."""
from __future__ import annotations

import hashlib
import hmac

from hypothesis import given, settings
from hypothesis import strategies as st

from relay.util import keyed_hmac
from relay.util.keyed_hmac import hmac_digest


@settings(max_examples=100, derandomize=True, database=None)
@given(st.binary(max_size=100), st.binary(max_size=200), st.sampled_from([hashlib.sha1, hashlib.sha256]))
def test_it_equals_the_standard_librarys_hmac(key, data, digestmod):
    """Keys shorter and longer than the block (a long one is hashed first), twice each: the
    second time from the kept states."""
    expected = hmac.new(key, data, digestmod).digest()
    assert hmac_digest(key, data, digestmod) == expected
    assert hmac_digest(key, data, digestmod) == expected


def test_kept_states_are_forgotten_past_the_bound(monkeypatch):
    monkeypatch.setattr(keyed_hmac, "KEPT", 3)
    monkeypatch.setattr(keyed_hmac, "_states", {})
    for n in range(7):
        key = bytes([n]) * 16
        assert hmac_digest(key, b"message", hashlib.sha1) == hmac.new(key, b"message", hashlib.sha1).digest()
        assert len(keyed_hmac._states) <= 3
