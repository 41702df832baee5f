"""STUN wire format (RFC 8489) with the TURN attributes (RFC 8656): no sockets, no clock.

A parsed `Message` keeps every attribute as raw bytes, in wire order, including attributes
this module does not know: whether an unknown comprehension-required attribute earns a 420 is
a decision of request processing, not of parsing.  Values are decoded on demand through one
table, `ATTRIBUTES`, so a message relayed without being looked at costs only its framing.

Addresses are `(host, port)` tuples with the host in the text form `socket.inet_ntop` gives,
which is the form Twisted hands to `datagramReceived`; so an address from an attribute and an
address from a socket compare equal without normalising either.
"""
from __future__ import annotations

import binascii
import hashlib
import hmac
import os
import socket
import struct
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

from relay.util.keyed_hmac import hmac_digest

MAGIC_COOKIE = 0x2112A442
_COOKIE_BYTES = struct.pack("!I", MAGIC_COOKIE)
_FINGERPRINT_XOR = 0x5354554E
HEADER = struct.Struct("!HHI12s")
_ATTR_HEADER = struct.Struct("!HH")
_TYPE_LENGTH_COOKIE = struct.Struct("!HHI")  # the header but the transaction id
_U32 = struct.Struct("!I")
_XOR_V4 = struct.Struct("!2sHI")  # an IPv4 XOR-*-ADDRESS value: prefix, port, address
_IPV4_PREFIX = b"\x00\x01"
_PORT_MASK = MAGIC_COOKIE >> 16
# The zero bytes after a value of length n, to the next multiple of 4: PADDING[n & 3].  STUN
# attributes are padded (RFC 8489 section 14), and so is ChannelData on a stream (RFC 8656
# section 12.5).  A table, not `b"\x00" * n`: the relay pads per packet.
PADDING = (b"", b"\x00\x00\x00", b"\x00\x00", b"\x00")

Address = Tuple[str, int]

# Classes (RFC 8489 section 5).
REQUEST, INDICATION, SUCCESS, ERROR = 0b00, 0b01, 0b10, 0b11

# Methods (RFC 8489, RFC 8656, RFC 6062).
BINDING = 0x001
ALLOCATE = 0x003
REFRESH = 0x004
SEND = 0x006
DATA_METHOD = 0x007
CREATE_PERMISSION = 0x008
CHANNEL_BIND = 0x009
CONNECT = 0x00A
CONNECTION_BIND = 0x00B
CONNECTION_ATTEMPT = 0x00C

# Address families as carried in address attributes and REQUESTED-ADDRESS-FAMILY.
FAMILY_IPV4 = 0x01
FAMILY_IPV6 = 0x02
_SOCKET_FAMILY = {FAMILY_IPV4: socket.AF_INET, FAMILY_IPV6: socket.AF_INET6}
_ADDRESS_LENGTH = {FAMILY_IPV4: 4, FAMILY_IPV6: 16}

# Password algorithms (RFC 8489 section 18.5).
ALGORITHM_MD5 = 0x0001
ALGORITHM_SHA256 = 0x0002


class StunDecodeError(ValueError):
    """The bytes are not a well-formed STUN message: the receiver drops them silently."""


class StunError(Exception):
    """A request failed; `code` and `reason` go into the ERROR-CODE of the answer."""

    def __init__(self, code: int, reason: str, attributes: Sequence[Tuple[int, Any]] = ()):
        super().__init__(f"{code} {reason}")
        self.code = code
        self.reason = reason
        self.attributes = list(attributes)


class Attribute(NamedTuple):
    name: str
    decode: Callable[[bytes, bytes], Any]
    encode: Callable[[Any, bytes], bytes]


def _decode_text(value: bytes, tid: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise StunError(400, "Bad Request") from None


def _encode_text(value: str, tid: bytes) -> bytes:
    return value.encode("utf-8")


def _decode_raw(value: bytes, tid: bytes) -> bytes:
    return value


def _encode_raw(value: bytes, tid: bytes) -> bytes:
    return bytes(value)


def _decode_flag(value: bytes, tid: bytes) -> bool:
    return True


def _encode_flag(value: bool, tid: bytes) -> bytes:
    return b""


def _decode_u32(value: bytes, tid: bytes) -> int:
    if len(value) != 4:
        raise StunError(400, "Bad Request")
    return struct.unpack("!I", value)[0]


def _encode_u32(value: int, tid: bytes) -> bytes:
    return struct.pack("!I", value)


def _decode_first_byte(value: bytes, tid: bytes) -> int:
    """REQUESTED-TRANSPORT and the address-family attributes: one byte, then RFFU."""
    if len(value) != 4:
        raise StunError(400, "Bad Request")
    return value[0]


def _encode_first_byte(value: int, tid: bytes) -> bytes:
    return bytes((value, 0, 0, 0))


def _decode_channel_number(value: bytes, tid: bytes) -> int:
    if len(value) != 4:
        raise StunError(400, "Bad Request")
    return struct.unpack("!H", value[:2])[0]


def _encode_channel_number(value: int, tid: bytes) -> bytes:
    return struct.pack("!HH", value, 0)


def _decode_even_port(value: bytes, tid: bytes) -> bool:
    """EVEN-PORT: True when the R bit asks to reserve the next port too."""
    if len(value) != 1:
        raise StunError(400, "Bad Request")
    return bool(value[0] & 0x80)


def _encode_even_port(value: bool, tid: bytes) -> bytes:
    return b"\x80" if value else b"\x00"


def _decode_address(value: bytes, tid: bytes) -> Address:
    if len(value) < 4 or value[0] != 0:
        raise StunError(400, "Bad Request")
    family, port = value[1], struct.unpack("!H", value[2:4])[0]
    if family not in _ADDRESS_LENGTH or len(value) != 4 + _ADDRESS_LENGTH[family]:
        raise StunError(400, "Bad Request")
    return socket.inet_ntop(_SOCKET_FAMILY[family], value[4:]), port


def _encode_address(value: Address, tid: bytes) -> bytes:
    host, port = value
    family = address_family(host)
    return struct.pack("!BBH", 0, family, port) + socket.inet_pton(_SOCKET_FAMILY[family], host)


def _xor(data: bytes, tid: bytes) -> bytes:
    """XOR with the magic cookie and transaction id, as whole integers (no per-byte loop)."""
    size = len(data)
    mask = int.from_bytes((_COOKIE_BYTES + tid)[:size], "big")
    return (int.from_bytes(data, "big") ^ mask).to_bytes(size, "big")


def _decode_xor_address(value: bytes, tid: bytes) -> Address:
    if len(value) == 8 and value[:2] == _IPV4_PREFIX:  # the common case, in one unpack
        _, port, address = _XOR_V4.unpack(value)
        return socket.inet_ntop(socket.AF_INET, _U32.pack(address ^ MAGIC_COOKIE)), port ^ _PORT_MASK
    if len(value) < 4:
        raise StunError(400, "Bad Request")
    return _decode_address(value[:2] + _xor(value[2:4], tid) + _xor(value[4:], tid), tid)


def _encode_xor_address(value: Address, tid: bytes) -> bytes:
    host, port = value
    if ":" not in host:  # IPv4, the common case, in one pack
        address = _U32.unpack(socket.inet_pton(socket.AF_INET, host))[0]
        return _XOR_V4.pack(_IPV4_PREFIX, port ^ _PORT_MASK, address ^ MAGIC_COOKIE)
    plain = _encode_address(value, tid)
    return plain[:2] + _xor(plain[2:4], tid) + _xor(plain[4:], tid)


def _decode_error_code(value: bytes, tid: bytes) -> Tuple[int, str]:
    if len(value) < 4:
        raise StunError(400, "Bad Request")
    return (value[2] & 0x7) * 100 + value[3], value[4:].decode("utf-8", "replace")


def _encode_error_code(value: Tuple[int, str], tid: bytes) -> bytes:
    code, reason = value
    return struct.pack("!HBB", 0, code // 100, code % 100) + reason.encode("utf-8")


def _decode_address_error_code(value: bytes, tid: bytes) -> Tuple[int, int, str]:
    """ADDRESS-ERROR-CODE (RFC 8656 section 18.14): the family, then an ERROR-CODE body."""
    if len(value) < 4:
        raise StunError(400, "Bad Request")
    code, reason = _decode_error_code(value, tid)
    return value[0], code, reason


def _encode_address_error_code(value: Tuple[int, int, str], tid: bytes) -> bytes:
    family, code, reason = value
    return bytes((family,)) + _encode_error_code((code, reason), tid)[1:]


def _decode_attribute_list(value: bytes, tid: bytes) -> List[int]:
    return [struct.unpack_from("!H", value, i)[0] for i in range(0, len(value) - 1, 2)]


def _encode_attribute_list(value: Sequence[int], tid: bytes) -> bytes:
    return b"".join(struct.pack("!H", t) for t in value)


def _decode_algorithm(value: bytes, tid: bytes) -> Tuple[int, bytes]:
    if len(value) < 4:
        raise StunError(400, "Bad Request")
    algorithm, length = struct.unpack("!HH", value[:4])
    return algorithm, value[4:4 + length]


def _encode_algorithm(value: Tuple[int, bytes], tid: bytes) -> bytes:
    algorithm, params = value
    return struct.pack("!HH", algorithm, len(params)) + params + PADDING[len(params) & 3]


def _decode_algorithms(value: bytes, tid: bytes) -> List[Tuple[int, bytes]]:
    algorithms, offset = [], 0
    while offset + 4 <= len(value):
        algorithm, length = struct.unpack_from("!HH", value, offset)
        algorithms.append((algorithm, value[offset + 4:offset + 4 + length]))
        offset += 4 + length + (-length % 4)
    return algorithms


def _encode_algorithms(value: Sequence[Tuple[int, bytes]], tid: bytes) -> bytes:
    return b"".join(_encode_algorithm(item, tid) for item in value)


MAPPED_ADDRESS = 0x0001
USERNAME = 0x0006
MESSAGE_INTEGRITY = 0x0008
ERROR_CODE = 0x0009
UNKNOWN_ATTRIBUTES = 0x000A
CHANNEL_NUMBER = 0x000C
LIFETIME = 0x000D
XOR_PEER_ADDRESS = 0x0012
DATA = 0x0013
REALM = 0x0014
NONCE = 0x0015
XOR_RELAYED_ADDRESS = 0x0016
REQUESTED_ADDRESS_FAMILY = 0x0017
EVEN_PORT = 0x0018
REQUESTED_TRANSPORT = 0x0019
DONT_FRAGMENT = 0x001A
MESSAGE_INTEGRITY_SHA256 = 0x001C
PASSWORD_ALGORITHM = 0x001D
USERHASH = 0x001E
XOR_MAPPED_ADDRESS = 0x0020
RESERVATION_TOKEN = 0x0022
PRIORITY = 0x0024
USE_CANDIDATE = 0x0025
CONNECTION_ID = 0x002A
ADDITIONAL_ADDRESS_FAMILY = 0x8000
ADDRESS_ERROR_CODE = 0x8001
PASSWORD_ALGORITHMS = 0x8002
ALTERNATE_DOMAIN = 0x8003
SOFTWARE = 0x8022
ALTERNATE_SERVER = 0x8023
FINGERPRINT = 0x8028
ICE_CONTROLLED = 0x8029
ICE_CONTROLLING = 0x802A

ATTRIBUTES: Dict[int, Attribute] = {
    MAPPED_ADDRESS: Attribute("MAPPED-ADDRESS", _decode_address, _encode_address),
    USERNAME: Attribute("USERNAME", _decode_text, _encode_text),
    MESSAGE_INTEGRITY: Attribute("MESSAGE-INTEGRITY", _decode_raw, _encode_raw),
    ERROR_CODE: Attribute("ERROR-CODE", _decode_error_code, _encode_error_code),
    UNKNOWN_ATTRIBUTES: Attribute("UNKNOWN-ATTRIBUTES", _decode_attribute_list, _encode_attribute_list),
    CHANNEL_NUMBER: Attribute("CHANNEL-NUMBER", _decode_channel_number, _encode_channel_number),
    LIFETIME: Attribute("LIFETIME", _decode_u32, _encode_u32),
    XOR_PEER_ADDRESS: Attribute("XOR-PEER-ADDRESS", _decode_xor_address, _encode_xor_address),
    DATA: Attribute("DATA", _decode_raw, _encode_raw),
    REALM: Attribute("REALM", _decode_text, _encode_text),
    NONCE: Attribute("NONCE", _decode_text, _encode_text),
    XOR_RELAYED_ADDRESS: Attribute("XOR-RELAYED-ADDRESS", _decode_xor_address, _encode_xor_address),
    REQUESTED_ADDRESS_FAMILY: Attribute("REQUESTED-ADDRESS-FAMILY", _decode_first_byte, _encode_first_byte),
    EVEN_PORT: Attribute("EVEN-PORT", _decode_even_port, _encode_even_port),
    REQUESTED_TRANSPORT: Attribute("REQUESTED-TRANSPORT", _decode_first_byte, _encode_first_byte),
    DONT_FRAGMENT: Attribute("DONT-FRAGMENT", _decode_flag, _encode_flag),
    MESSAGE_INTEGRITY_SHA256: Attribute("MESSAGE-INTEGRITY-SHA256", _decode_raw, _encode_raw),
    PASSWORD_ALGORITHM: Attribute("PASSWORD-ALGORITHM", _decode_algorithm, _encode_algorithm),
    USERHASH: Attribute("USERHASH", _decode_raw, _encode_raw),
    XOR_MAPPED_ADDRESS: Attribute("XOR-MAPPED-ADDRESS", _decode_xor_address, _encode_xor_address),
    RESERVATION_TOKEN: Attribute("RESERVATION-TOKEN", _decode_raw, _encode_raw),
    PRIORITY: Attribute("PRIORITY", _decode_u32, _encode_u32),
    USE_CANDIDATE: Attribute("USE-CANDIDATE", _decode_flag, _encode_flag),
    CONNECTION_ID: Attribute("CONNECTION-ID", _decode_u32, _encode_u32),
    ADDITIONAL_ADDRESS_FAMILY: Attribute("ADDITIONAL-ADDRESS-FAMILY", _decode_first_byte, _encode_first_byte),
    ADDRESS_ERROR_CODE: Attribute("ADDRESS-ERROR-CODE", _decode_address_error_code,
                                  _encode_address_error_code),
    PASSWORD_ALGORITHMS: Attribute("PASSWORD-ALGORITHMS", _decode_algorithms, _encode_algorithms),
    ALTERNATE_DOMAIN: Attribute("ALTERNATE-DOMAIN", _decode_text, _encode_text),
    SOFTWARE: Attribute("SOFTWARE", _decode_text, _encode_text),
    ALTERNATE_SERVER: Attribute("ALTERNATE-SERVER", _decode_address, _encode_address),
    FINGERPRINT: Attribute("FINGERPRINT", _decode_u32, _encode_u32),
    ICE_CONTROLLED: Attribute("ICE-CONTROLLED", _decode_raw, _encode_raw),
    ICE_CONTROLLING: Attribute("ICE-CONTROLLING", _decode_raw, _encode_raw),
}


def address_family(host: str) -> int:
    """The STUN family code of a textual IP address."""
    return FAMILY_IPV6 if ":" in host else FAMILY_IPV4


def format_address(address: Address) -> str:
    """`host:port`, an IPv6 host in brackets (RFC 3986): a transport address as a report or
    a log line shows it."""
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def message_type(method: int, cls: int) -> int:
    """Interleave the class bits into the method bits (RFC 8489 figure 3)."""
    return ((method & 0xF80) << 2) | ((method & 0x070) << 1) | (method & 0x00F) \
        | ((cls & 0b10) << 7) | ((cls & 0b01) << 4)


def split_type(value: int) -> Tuple[int, int]:
    method = ((value & 0x3E00) >> 2) | ((value & 0x00E0) >> 1) | (value & 0x000F)
    cls = ((value & 0x0100) >> 7) | ((value & 0x0010) >> 4)
    return method, cls


def new_transaction_id() -> bytes:
    return os.urandom(12)


@dataclass
class Message:
    """One STUN message: raw attributes in wire order, decoded on demand."""

    method: int
    cls: int
    transaction_id: bytes = field(default_factory=new_transaction_id)
    attributes: List[Tuple[int, bytes]] = field(default_factory=list)
    # Set by `parse`: the bytes as received and where each integrity attribute began, which is
    # what checking MESSAGE-INTEGRITY(-SHA256) needs.
    raw: bytes = b""
    integrity_offsets: Dict[int, int] = field(default_factory=dict)

    def add(self, attr_type: int, value: Any) -> "Message":
        self.attributes.append((attr_type, ATTRIBUTES[attr_type].encode(value, self.transaction_id)))
        return self

    def has(self, attr_type: int) -> bool:
        for t, _ in self.attributes:  # a loop: any() over a generator costs twice as much
            if t == attr_type:
                return True
        return False

    def get(self, attr_type: int, default: Any = None) -> Any:
        """The first value of `attr_type`, decoded; a malformed value raises StunError(400)."""
        for t, value in self.attributes:
            if t == attr_type:
                return ATTRIBUTES[attr_type].decode(value, self.transaction_id)
        return default

    def get_all(self, attr_type: int) -> List[Any]:
        decode = ATTRIBUTES[attr_type].decode
        return [decode(value, self.transaction_id) for t, value in self.attributes if t == attr_type]

    def unknown_required(self) -> List[int]:
        """Comprehension-required attributes (type < 0x8000) that this codec does not know."""
        return sorted({t for t, _ in self.attributes if t < 0x8000 and t not in ATTRIBUTES})

    def response(self, cls: int = SUCCESS) -> "Message":
        return Message(self.method, cls, self.transaction_id)

    def error(self, code: int, reason: str) -> "Message":
        return self.response(ERROR).add(ERROR_CODE, (code, reason))

    def encode(self, key: Optional[bytes] = None, sha256: bool = False,
               fingerprint: bool = False) -> bytes:
        """Serialise, adding MESSAGE-INTEGRITY (or -SHA256) under `key` and FINGERPRINT."""
        parts = []
        for attr_type, value in self.attributes:
            parts.append(_ATTR_HEADER.pack(attr_type, len(value)))
            parts.append(value)
            parts.append(PADDING[len(value) & 3])
        body = b"".join(parts)
        msg_type = message_type(self.method, self.cls)
        if key is not None:
            attr_type, digest, size = ((MESSAGE_INTEGRITY_SHA256, hashlib.sha256, 32) if sha256
                                       else (MESSAGE_INTEGRITY, hashlib.sha1, 20))
            header = HEADER.pack(msg_type, len(body) + 4 + size, MAGIC_COOKIE, self.transaction_id)
            mac = hmac_digest(key, header + body, digest)
            body += _ATTR_HEADER.pack(attr_type, size) + mac
        if fingerprint:
            header = HEADER.pack(msg_type, len(body) + 8, MAGIC_COOKIE, self.transaction_id)
            crc = (binascii.crc32(header + body) ^ _FINGERPRINT_XOR) & 0xFFFFFFFF
            body += _ATTR_HEADER.pack(FINGERPRINT, 4) + struct.pack("!I", crc)
        return HEADER.pack(msg_type, len(body), MAGIC_COOKIE, self.transaction_id) + body

    def check_integrity(self, key: bytes) -> bool:
        """Verify MESSAGE-INTEGRITY-SHA256 if present, else MESSAGE-INTEGRITY (RFC 8489 14.5/14.6)."""
        for attr_type, digest in ((MESSAGE_INTEGRITY_SHA256, hashlib.sha256),
                                  (MESSAGE_INTEGRITY, hashlib.sha1)):
            offset = self.integrity_offsets.get(attr_type)
            if offset is None:
                continue
            received = self.get(attr_type)
            if len(received) < 16 or (digest is hashlib.sha1 and len(received) != 20):
                return False
            covered = self.raw[:offset]
            length = offset - HEADER.size + 4 + len(received)
            header = covered[:2] + struct.pack("!H", length) + covered[4:HEADER.size]
            mac = hmac_digest(key, header + covered[HEADER.size:], digest)
            return hmac.compare_digest(mac[:len(received)], received)
        return False


def is_stun(data: bytes) -> bool:
    """Cheap demultiplexing test: top two bits zero and the magic cookie in place."""
    return len(data) >= HEADER.size and data[0] < 0x40 and data[4:8] == _COOKIE_BYTES


def parse(data: bytes) -> Message:
    """Parse one complete STUN message; raise StunDecodeError for anything malformed.

    Attributes after MESSAGE-INTEGRITY other than MESSAGE-INTEGRITY-SHA256 and FINGERPRINT,
    and any after MESSAGE-INTEGRITY-SHA256 other than FINGERPRINT, are ignored as RFC 8489
    section 14 asks.  A FINGERPRINT that is present must be last and must match.
    """
    if not is_stun(data):
        raise StunDecodeError("not a STUN message")
    msg_type, length, _, tid = HEADER.unpack_from(data)
    end = len(data)
    if length % 4 or end != HEADER.size + length:
        raise StunDecodeError("bad STUN length")
    data = bytes(data)
    attributes: List[Tuple[int, bytes]] = []
    integrity: Dict[int, int] = {}
    unpack = _ATTR_HEADER.unpack_from
    # The length is a multiple of 4, and so is each attribute with its padding: every offset
    # below has a whole attribute header before `end`, and the last padding ends at `end`.
    offset = HEADER.size
    while offset < end:
        attr_type, attr_len = unpack(data, offset)
        value_end = offset + 4 + attr_len
        if value_end > end:
            raise StunDecodeError("truncated attribute")
        if attr_type == FINGERPRINT:
            if value_end + (-attr_len & 3) != end or attr_len != 4:
                raise StunDecodeError("FINGERPRINT is not last")
            if _U32.unpack_from(data, offset + 4)[0] != \
                    (binascii.crc32(data[:offset]) ^ _FINGERPRINT_XOR) & 0xFFFFFFFF:
                raise StunDecodeError("FINGERPRINT mismatch")
            attributes.append((attr_type, data[offset + 4:value_end]))
        elif not integrity or (attr_type == MESSAGE_INTEGRITY_SHA256
                               and MESSAGE_INTEGRITY_SHA256 not in integrity):
            if attr_type == MESSAGE_INTEGRITY or attr_type == MESSAGE_INTEGRITY_SHA256:
                integrity[attr_type] = offset
            attributes.append((attr_type, data[offset + 4:value_end]))
        offset = value_end + (-attr_len & 3)
    method, cls = split_type(msg_type)
    return Message(method, cls, tid, attributes, data, integrity)


# Send and Data indications carry the relayed packets that have no channel: they get a
# parser and a builder of their own that make no `Message` (RFC 8656 sections 11.4, 11.6).
SEND_INDICATION = message_type(SEND, INDICATION)
DATA_INDICATION = message_type(DATA_METHOD, INDICATION)
_DATA_INDICATION_V4 = struct.Struct("!HHI12sHHBBHIHH")  # header, XOR-PEER-ADDRESS, DATA header


def parse_send_indication(data: bytes) -> Optional[Tuple[Address, bytes]]:
    """The (peer, payload) of a Send indication, or None for anything `parse` would refuse
    or that lacks XOR-PEER-ADDRESS or DATA.  Same checks and same first-value-wins rule as
    `parse`, without building a `Message`: this runs once per packet sent by indication."""
    end = len(data)
    if end < HEADER.size or end % 4:
        return None
    msg_type, length, cookie = _TYPE_LENGTH_COOKIE.unpack_from(data)
    if msg_type != SEND_INDICATION or length != end - HEADER.size or cookie != MAGIC_COOKIE:
        return None
    peer = payload = None
    protected = False  # after MESSAGE-INTEGRITY(-SHA256), `parse` keeps only FINGERPRINT
    offset = HEADER.size
    while offset < end:  # whole attribute headers, as in `parse`: the length is a multiple of 4
        attr_type, attr_len = _ATTR_HEADER.unpack_from(data, offset)
        value_end = offset + 4 + attr_len
        if value_end > end:
            return None
        if attr_type == FINGERPRINT:
            if value_end + (-attr_len % 4) != end or attr_len != 4 or _U32.unpack_from(data, offset + 4)[0] \
                    != (binascii.crc32(data[:offset]) ^ _FINGERPRINT_XOR) & 0xFFFFFFFF:
                return None
        elif protected:
            pass
        elif attr_type == XOR_PEER_ADDRESS:
            if peer is None:
                peer = data[offset + 4:value_end]
        elif attr_type == DATA:
            if payload is None:
                payload = data[offset + 4:value_end]
        elif attr_type in (MESSAGE_INTEGRITY, MESSAGE_INTEGRITY_SHA256):
            protected = True
        offset = value_end + (-attr_len % 4)
    if peer is None or payload is None:
        return None
    try:
        return _decode_xor_address(peer, data[8:20]), payload
    except StunError:
        return None


def data_indication(payload: bytes, peer: Address, tid: bytes) -> bytes:
    """A Data indication carrying `payload` from `peer`: one pack for an IPv4 peer."""
    size = len(payload)
    pad = -size % 4
    host, port = peer
    if ":" in host:
        value = _encode_xor_address(peer, tid)
        return b"".join((
            HEADER.pack(DATA_INDICATION, 8 + len(value) + size + pad, MAGIC_COOKIE, tid),
            _ATTR_HEADER.pack(XOR_PEER_ADDRESS, len(value)), value,
            _ATTR_HEADER.pack(DATA, size), payload, PADDING[size & 3]))
    address = _U32.unpack(socket.inet_pton(socket.AF_INET, host))[0] ^ MAGIC_COOKIE
    head = _DATA_INDICATION_V4.pack(DATA_INDICATION, 16 + size + pad, MAGIC_COOKIE, tid,
                                    XOR_PEER_ADDRESS, 8, 0, FAMILY_IPV4, port ^ _PORT_MASK,
                                    address, DATA, size)
    return head + payload + PADDING[size & 3] if pad else head + payload


class TransactionIds:
    """Cryptographically random transaction ids, drawn 4,096 at a time: one getrandom call
    where `new_transaction_id` makes one per id, which a Data indication per packet cannot
    afford.  A process draws its own: make one after forking, never before."""

    BATCH = 4096

    def __init__(self) -> None:
        self._pool = b""
        self._offset = 0

    def __call__(self) -> bytes:
        offset = self._offset
        if offset >= len(self._pool):
            self._pool, offset = os.urandom(12 * self.BATCH), 0
        self._offset = offset + 12
        return self._pool[offset:offset + 12]


def long_term_key(username: str, realm: str, password: str, algorithm: int = ALGORITHM_MD5) -> bytes:
    """The long-term credential key (RFC 8489 section 9.2.2), password already SASLprep'ed."""
    digest = hashlib.sha256 if algorithm == ALGORITHM_SHA256 else hashlib.md5
    return digest(f"{username}:{realm}:{password}".encode("utf-8")).digest()


def userhash(username: str, realm: str) -> bytes:
    """USERHASH (RFC 8489 section 14.4): SHA-256 of username:realm."""
    return hashlib.sha256(f"{username}:{realm}".encode("utf-8")).digest()


# ChannelData (RFC 8656 section 12.4): a 4-byte header.  RFC 8656 narrowed channel numbers
# to 0x4000-0x4FFF; RFC 5766 allowed up to 0x7FFF, and RFC 5766 clients still pick numbers
# there (coturn's turnutils_uclient does, at random), so the server accepts the old range only
# when told to (`--rfc5766-channels`).  Framing accepts both: the binding decides.
CHANNEL_HEADER = struct.Struct("!HH")
MIN_CHANNEL, MAX_CHANNEL = 0x4000, 0x4FFF
RFC5766_MAX_CHANNEL = 0x7FFF


def stream_frame_length(buffer: bytes, offset: int = 0) -> Optional[int]:
    """Length of the whole STUN or ChannelData frame at `offset` in a stream buffer.

    None means more bytes are needed.  ChannelData on a stream is padded to a multiple of 4
    (RFC 8656 section 12.5), STUN always is; anything else is a protocol error: -1.
    """
    if len(buffer) - offset < 4:
        return None
    first = buffer[offset]
    length = (buffer[offset + 2] << 8) | buffer[offset + 3]
    if first < 0x40:
        size = HEADER.size + length
    elif first < 0x80:
        size = 4 + length + (-length % 4)
    else:
        return -1
    return size if len(buffer) - offset >= size else None
