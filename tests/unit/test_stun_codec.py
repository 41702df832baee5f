"""The STUN codec against the RFC 5769 test vectors, byte for byte, and its edge cases."""
import json
import pathlib

import pytest

from relay.proto import stun
from relay.proto.saslprep import saslprep

# RFC 5769's sample messages, kept in the repository so a clean clone tests on its own.
VECTORS = json.loads(
    (pathlib.Path(__file__).resolve().parent / "vectors" / "rfc5769.json").read_text()
)["vectors"]


def test_rfc5769_request_parses_and_verifies():
    v = VECTORS["request"]
    msg = stun.parse(bytes.fromhex(v["hex"]))
    assert (msg.method, msg.cls) == (stun.BINDING, stun.REQUEST)
    assert msg.get(stun.SOFTWARE) == v["software"]
    assert msg.get(stun.USERNAME) == v["username"]
    assert msg.get(stun.PRIORITY) == 0x6E0001FF
    assert msg.get(stun.ICE_CONTROLLED) == bytes.fromhex("932ff9b151263b36")
    assert msg.check_integrity(v["password"].encode())
    assert not msg.check_integrity(b"wrong password")


@pytest.mark.parametrize("name", ["response_ipv4", "response_ipv6"])
def test_rfc5769_responses(name):
    v = VECTORS[name]
    msg = stun.parse(bytes.fromhex(v["hex"]))
    assert (msg.method, msg.cls) == (stun.BINDING, stun.SUCCESS)
    assert msg.get(stun.XOR_MAPPED_ADDRESS) == tuple(v["xor_mapped_address"])
    assert msg.get(stun.SOFTWARE) == v["software"].rstrip()
    assert msg.check_integrity(v["password"].encode())


def test_rfc5769_long_term_request():
    v = VECTORS["request_long_term"]
    assert saslprep(v["password_before_saslprep"]) == v["password"]
    msg = stun.parse(bytes.fromhex(v["hex"]))
    assert msg.get(stun.USERNAME) == v["username"]
    assert msg.get(stun.REALM) == v["realm"]
    assert msg.get(stun.NONCE) == v["nonce"]
    key = stun.long_term_key(v["username"], v["realm"], saslprep(v["password_before_saslprep"]))
    assert msg.check_integrity(key)


def test_encoded_response_reparses_byte_for_byte():
    """What we encode parses back to the same attributes and verifies under the same key."""
    v = VECTORS["response_ipv6"]
    original = stun.parse(bytes.fromhex(v["hex"]))
    again = stun.Message(stun.BINDING, stun.SUCCESS, original.transaction_id)
    again.add(stun.SOFTWARE, "test vector").add(stun.XOR_MAPPED_ADDRESS, tuple(v["xor_mapped_address"]))
    wire = again.encode(key=v["password"].encode(), fingerprint=True)
    # Same length and same bytes as the vector except SOFTWARE's padding byte, MI and FINGERPRINT.
    vector = bytes.fromhex(v["hex"])
    assert len(wire) == len(vector)
    assert wire[:20 + 4 + 11] == vector[:20 + 4 + 11]
    assert wire[36:36 + 24] == vector[36:36 + 24]  # XOR-MAPPED-ADDRESS, bit for bit
    parsed = stun.parse(wire)
    assert parsed.check_integrity(v["password"].encode())
    assert parsed.get(stun.XOR_MAPPED_ADDRESS) == tuple(v["xor_mapped_address"])


def test_sha256_integrity_round_trip_and_truncation_rules():
    msg = stun.Message(stun.ALLOCATE, stun.REQUEST).add(stun.USERNAME, "u")
    wire = msg.encode(key=b"k" * 16, sha256=True, fingerprint=True)
    parsed = stun.parse(wire)
    assert parsed.check_integrity(b"k" * 16)
    assert not parsed.check_integrity(b"x" * 16)


def test_attributes_after_integrity_are_ignored():
    msg = stun.Message(stun.BINDING, stun.REQUEST).add(stun.USERNAME, "u")
    wire = bytearray(msg.encode(key=b"key"))
    extra = stun.Message(stun.BINDING, stun.REQUEST).add(stun.SOFTWARE, "late").encode()[20:]
    wire[2:4] = (len(wire) - 20 + len(extra)).to_bytes(2, "big")
    parsed = stun.parse(bytes(wire) + extra)
    assert not parsed.has(stun.SOFTWARE)
    assert parsed.check_integrity(b"key")


@pytest.mark.parametrize("data", [
    b"",
    b"\x00\x01\x00\x00" + b"\x00" * 16,                      # no magic cookie
    b"\x00\x01\x00\x03\x21\x12\xa4\x42" + b"\x00" * 12,      # length not a multiple of 4
    b"\x00\x01\x00\x08\x21\x12\xa4\x42" + b"\x00" * 12 + b"\x00\x06\x00\x08abcd",  # truncated
    b"\xc0\x01\x00\x00\x21\x12\xa4\x42" + b"\x00" * 12,      # top bits set
])
def test_malformed_messages_are_decode_errors(data):
    with pytest.raises(stun.StunDecodeError):
        stun.parse(data)


def test_bad_fingerprint_is_rejected():
    wire = bytearray(stun.Message(stun.BINDING, stun.REQUEST).encode(fingerprint=True))
    wire[-1] ^= 1
    with pytest.raises(stun.StunDecodeError):
        stun.parse(bytes(wire))


def test_unknown_comprehension_required_attributes_are_kept():
    msg = stun.Message(stun.BINDING, stun.REQUEST)
    msg.attributes += [(0x0777, b"abcd"), (0x8777, b"")]
    parsed = stun.parse(msg.encode())
    assert parsed.unknown_required() == [0x0777]
    assert parsed.has(0x8777)


def test_malformed_attribute_value_is_a_400():
    msg = stun.Message(stun.ALLOCATE, stun.REQUEST)
    msg.attributes.append((stun.XOR_PEER_ADDRESS, b"\x00\x01\x00"))
    with pytest.raises(stun.StunError) as err:
        stun.parse(msg.encode()).get(stun.XOR_PEER_ADDRESS)
    assert err.value.code == 400


def test_method_and_class_interleaving():
    for method in (stun.BINDING, stun.ALLOCATE, stun.CHANNEL_BIND, 0xFFF):
        for cls in (stun.REQUEST, stun.INDICATION, stun.SUCCESS, stun.ERROR):
            assert stun.split_type(stun.message_type(method, cls)) == (method, cls)
    assert stun.message_type(stun.BINDING, stun.SUCCESS) == 0x0101
    assert stun.message_type(stun.ALLOCATE, stun.ERROR) == 0x0113


def test_stream_framing_pads_channel_data():
    assert stun.stream_frame_length(b"\x40\x00\x00\x05hello\x00\x00\x00") == 12
    assert stun.stream_frame_length(b"\x40\x00\x00\x05hel") is None
    assert stun.stream_frame_length(b"\x00\x01\x00\x00") is None
    assert stun.stream_frame_length(b"\x80\x00\x00\x00") == -1


def test_of_repeated_attributes_the_first_is_read_before_and_after_an_add():
    """RFC 8489 section 14: the first of repeated attributes counts, also in a parsed message
    something was added to."""
    msg = stun.Message(stun.ALLOCATE, stun.REQUEST).add(stun.USERNAME, "first").add(stun.USERNAME, "second")
    parsed = stun.parse(msg.encode())
    assert parsed.get(stun.USERNAME) == "first"
    assert parsed.get_all(stun.USERNAME) == ["first", "second"]
    assert not parsed.has(stun.SOFTWARE) and parsed.get(stun.SOFTWARE, "none") == "none"
    parsed.add(stun.SOFTWARE, "added")
    assert parsed.has(stun.SOFTWARE) and parsed.get(stun.SOFTWARE) == "added"
    assert parsed.get(stun.USERNAME) == "first"
