"""relay.util.keyed_hmac: the same MAC as the standard library's `hmac`, for any key, from
`hashlib` copies and from keyed_hmac.c alike."""
from __future__ import annotations

import hashlib
import hmac

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.util import keyed_hmac
from relay.util.keyed_hmac import hmac_digest, in_hashlib, native

KEYS = st.binary(max_size=200)  # shorter and longer than the block: a long one is hashed first
DATA = st.binary(max_size=2000)
DIGESTS = st.sampled_from([hashlib.sha1, hashlib.sha256])


@pytest.fixture(scope="module")
def built():
    """keyed_hmac.c's module, which `scripts/test.sh` installs OpenSSL's headers to build."""
    assert keyed_hmac.lib is not None, "relay.util._keyed_hmac was not built: install libssl-dev"


@settings(max_examples=100, derandomize=True, database=None)
@given(KEYS, st.binary(max_size=200), DIGESTS)
def test_it_equals_the_standard_librarys_hmac(key, data, digestmod):
    """Twice each: the second time from the kept states."""
    expected = hmac.new(key, data, digestmod).digest()
    assert hmac_digest(key, data, digestmod) == expected
    assert hmac_digest(key, data, digestmod) == expected


@settings(max_examples=300, derandomize=True, database=None)
@given(KEYS, DATA, DIGESTS)
def test_both_ways_equal_the_standard_librarys_hmac(built, key, data, digestmod):
    expected = hmac.new(key, data, digestmod).digest()
    keyed = native(key, digestmod)
    assert keyed is not None
    assert keyed(data) == expected
    assert keyed(data + b"!") == hmac.new(key, data + b"!", digestmod).digest()
    assert in_hashlib(key, digestmod)(data) == expected


def test_another_digest_is_made_by_hashlib(built, monkeypatch):
    monkeypatch.setattr(keyed_hmac, "NATIVE_FIRST", True)
    monkeypatch.setattr(keyed_hmac, "_keyed", {})
    assert native(b"key", hashlib.md5) is None
    assert hmac_digest(b"key", b"data", hashlib.md5) == hmac.new(b"key", b"data", hashlib.md5).digest()


@pytest.mark.parametrize("native_first", [True, False])
def test_the_runtimes_choice_and_the_fallback_agree(built, monkeypatch, native_first):
    """PyPy's way (native first) and CPython's, and either without the module."""
    monkeypatch.setattr(keyed_hmac, "NATIVE_FIRST", native_first)
    for lib in (keyed_hmac.lib, None):
        monkeypatch.setattr(keyed_hmac, "lib", lib)
        monkeypatch.setattr(keyed_hmac, "_keyed", {})
        for n in range(3):
            key = bytes([n]) * 20
            assert hmac_digest(key, b"message", hashlib.sha1) == hmac.new(key, b"message", hashlib.sha1).digest()


def test_kept_states_are_forgotten_past_the_bound(monkeypatch):
    monkeypatch.setattr(keyed_hmac, "KEPT", 3)
    monkeypatch.setattr(keyed_hmac, "_keyed", {})
    for n in range(7):
        key = bytes([n]) * 16
        assert hmac_digest(key, b"message", hashlib.sha1) == hmac.new(key, b"message", hashlib.sha1).digest()
        assert len(keyed_hmac._keyed) <= 3
