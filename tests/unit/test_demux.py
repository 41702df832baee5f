"""Telling TURN from HTTP by a connection's first bytes (relay.proto.demux), on generated input:
every STUN message and every HTTP request line is told right, and once a prefix is told, any
longer one is told the same (so TCP may cut the first bytes anywhere)."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from relay.proto.demux import HTTP, HTTP_METHODS, TURN, stream_kind
from support.stun_strategies import wire_messages

SETTINGS = settings(max_examples=200, deadline=1000, derandomize=True, database=None)
request_lines = st.tuples(st.sampled_from(HTTP_METHODS),
                          st.from_regex(rb"/[a-z0-9/]{0,20} HTTP/1\.[01]\r\n", fullmatch=True)
                          ).map(b"".join)


def told(data: bytes) -> str:
    """The answer for `data`, checking every prefix gives None or that same answer."""
    answer = stream_kind(data)
    for cut in range(len(data)):
        assert stream_kind(data[:cut]) in (None, answer)
    return answer


@SETTINGS
@given(wire_messages())
def test_stun_is_turn(wire):
    assert told(wire) == TURN


@SETTINGS
@given(request_lines)
def test_request_lines_are_http(line):
    assert told(line) == HTTP


@SETTINGS
@given(st.binary(min_size=8, max_size=64))
def test_any_eight_bytes_are_told(data):
    assert told(data) in (TURN, HTTP)


def test_channel_data_and_near_misses_are_turn():
    assert stream_kind(b"\x40\x00\x00\x04abcd") == TURN
    assert stream_kind(b"GETX / HTTP/1.1") == TURN
    assert stream_kind(b"get / HTTP/1.1") == TURN
    assert stream_kind(b"POS") is None and stream_kind(b"") is None
