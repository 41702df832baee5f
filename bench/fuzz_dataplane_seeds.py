"""Seeds for bench/fuzz_dataplane.c: records (op, length, bytes) that permit the peers, bind
channels and relay valid ChannelData, Send indications and peer datagrams, so the fuzzer starts
from the forwarding paths rather than having to find a valid STUN message first.
    python bench/fuzz_dataplane_seeds.py CORPUS_DIR
"""
import struct
import sys
from pathlib import Path

from relay.proto import stun

PEER4, PEER6 = ("198.51.100.1", 9), ("2001:db8::1", 9)


def record(op: int, data: bytes) -> bytes:
    return bytes([op, len(data)]) + data


def send(peer, payload: bytes, fingerprint: bool) -> bytes:
    msg = stun.Message(stun.SEND, stun.INDICATION).add(stun.XOR_PEER_ADDRESS, peer)
    return msg.add(stun.DATA, payload).encode(fingerprint=fingerprint)


def seeds():
    permit = record(2 | 8, b"") + record(0x82 | 8, b"")
    bind = record(4, b"\x00\x09") + record(0x84, b"\x00\x09")
    yield permit + bind + record(0, struct.pack("!HH", 0x4009, 5) + b"hello\0\0\0")
    yield permit + record(0, send(PEER4, b"hello", False)) + record(0, send(PEER6, b"hi", True))
    yield permit + bind + record(1, b"\x00\x09peer") + record(0x81, b"\x00\x09peer") + record(7, b"")
    yield permit + record(6, b"\x00\x10\x01") + record(1, b"\x00\x08data") + record(7, send(PEER4, b"x", True))
    yield record(0 | 8, stun.Message(stun.BINDING, stun.REQUEST).encode()) + record(7, b"")


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for i, seed in enumerate(seeds()):
        (out / f"seed-{i}").write_bytes(seed)
