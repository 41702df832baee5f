"""Hypothesis strategies for STUN messages: every attribute kind of `relay.proto.stun.ATTRIBUTES`,
unknown attributes, and mutations of valid wire bytes.

A strategy is given per attribute type, drawing values that the codec's encoder accepts and
its decoder returns unchanged, so a round trip can compare values and not only bytes.
"""
from __future__ import annotations

import socket
from typing import Any, Dict, List, Tuple

from hypothesis import strategies as st

from relay.proto import stun

# Integrity and FINGERPRINT are added by `Message.encode`, never drawn as plain attributes.
SIGNATURES = (stun.MESSAGE_INTEGRITY, stun.MESSAGE_INTEGRITY_SHA256, stun.FINGERPRINT)

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
short_bytes = st.binary(max_size=64)
short_text = st.text(max_size=40)

ipv4 = st.binary(min_size=4, max_size=4).map(lambda b: socket.inet_ntop(socket.AF_INET, b))
ipv6 = st.binary(min_size=16, max_size=16).map(lambda b: socket.inet_ntop(socket.AF_INET6, b))
hosts = st.one_of(ipv4, ipv6)
addresses = st.tuples(hosts, u16)
error_codes = st.tuples(st.integers(300, 699), short_text)
algorithms = st.tuples(u16, short_bytes)

VALUES: Dict[int, st.SearchStrategy] = {}
_BY_DECODER = {
    stun._decode_address: addresses,
    stun._decode_xor_address: addresses,
    stun._decode_text: short_text,
    stun._decode_raw: short_bytes,
    stun._decode_flag: st.just(True),
    stun._decode_u32: u32,
    stun._decode_first_byte: st.integers(0, 255),
    stun._decode_channel_number: u16,
    stun._decode_even_port: st.booleans(),
    stun._decode_error_code: error_codes,
    stun._decode_address_error_code: st.tuples(st.integers(0, 255), st.integers(300, 699),
                                               short_text),
    stun._decode_attribute_list: st.lists(u16, max_size=8),
    stun._decode_algorithm: algorithms,
    stun._decode_algorithms: st.lists(algorithms, max_size=4),
}
for _type, _attribute in stun.ATTRIBUTES.items():
    if _type not in SIGNATURES:
        VALUES[_type] = _BY_DECODER[_attribute.decode]

known_attributes = st.sampled_from(sorted(VALUES)).flatmap(
    lambda t: st.tuples(st.just(t), VALUES[t]))
# Types the codec does not know, comprehension-required or not: carried as raw bytes.
# (No known type has bit 0x4000 set, so setting it moves a known type out of the table.)
unknown_types = u16.map(lambda t: t | 0x4000 if t in stun.ATTRIBUTES else t)
unknown_attributes = st.tuples(unknown_types, short_bytes)


@st.composite
def messages(draw) -> Tuple[stun.Message, List[Tuple[int, Any]]]:
    """A message with known attributes (added through the codec) and unknown ones (raw).

    Returns the message and the (type, value) pairs added through the codec, in wire order.
    """
    msg = stun.Message(draw(st.integers(0, 0xFFF)), draw(st.integers(0, 3)),
                       draw(st.binary(min_size=12, max_size=12)))
    added: List[Tuple[int, Any]] = []
    for known, item in draw(st.lists(st.one_of(known_attributes.map(lambda a: (True, a)),
                                               unknown_attributes.map(lambda a: (False, a))),
                                     max_size=12)):
        attr_type, value = item
        if known:
            msg.add(attr_type, value)
            added.append(item)
        else:
            msg.attributes.append((attr_type, value))
    return msg, added


signing = st.fixed_dictionaries({
    "key": st.one_of(st.none(), st.binary(min_size=1, max_size=32)),
    "sha256": st.booleans(),
    "fingerprint": st.booleans(),
})


@st.composite
def wire_messages(draw) -> bytes:
    """The bytes of a valid message, signed or not, with or without FINGERPRINT."""
    msg, _ = draw(messages())
    return msg.encode(**draw(signing))


@st.composite
def mutated(draw, valid: st.SearchStrategy = wire_messages()) -> bytes:
    """Valid bytes damaged the way a fuzzer damages them: flips, cuts, splices, bad lengths."""
    data = bytearray(draw(valid))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "cut", "insert", "length"]))
        if kind == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
        elif kind == "cut":
            i = draw(st.integers(0, len(data)))
            data = data[:i]
        elif kind == "insert":
            i = draw(st.integers(0, len(data)))
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "length" and len(data) >= 24:
            # An attribute length or the message length: where parsers overread.
            i = draw(st.sampled_from([2] + list(range(22, len(data) - 1, 4))))
            data[i:i + 2] = draw(u16).to_bytes(2, "big")
    return bytes(data)
