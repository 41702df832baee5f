"""Coverage-guided fuzzing (atheris/libFuzzer) of the STUN parser and the stream framer.

    bash bench/fuzz.sh 600            # this target and fuzz_turn.py, 600 s each

Each input is handed, as received bytes, to what the server does with a datagram or a stream
(tests/unit/test_codec_properties.py's `decode_everything`: parse, decode every attribute, check
integrity; then stream framing at every offset).  Anything but the codec's typed errors is a
crash; libFuzzer then stops and writes the input to crash-*.  Seeds: the RFC 5769 vectors and
one signed request of each TURN method.
"""
from __future__ import annotations

import json
import os
import sys

import atheris

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), os.path.join(ROOT, "tests", "unit")]

with atheris.instrument_imports(include=["relay", "test_codec_properties"]):
    from test_codec_properties import decode_everything

    from relay.proto import stun


def seeds() -> list:
    vectors = os.path.join(os.path.dirname(ROOT), "shared", "vectors", "rfc5769.json")
    found = []
    if os.path.exists(vectors):
        with open(vectors) as f:
            found = [bytes.fromhex(v["hex"]) for v in json.load(f)["vectors"].values()]
    for method in (stun.BINDING, stun.ALLOCATE, stun.REFRESH, stun.CREATE_PERMISSION,
                   stun.CHANNEL_BIND):
        msg = stun.Message(method, stun.REQUEST).add(stun.USERNAME, "alice")
        msg.add(stun.REALM, "turnrelay.test").add(stun.NONCE, "obMatJos2AAAAAAAAAA")
        msg.add(stun.REQUESTED_TRANSPORT, 17).add(stun.XOR_PEER_ADDRESS, ("8.8.8.8", 5000))
        msg.add(stun.CHANNEL_NUMBER, 0x4000).add(stun.LIFETIME, 600)
        found.append(msg.encode(key=b"k" * 16, sha256=method % 2 == 0, fingerprint=True))
    found.append(stun.CHANNEL_HEADER.pack(0x4000, 5) + b"hello\x00\x00\x00")
    return found


def test_one_input(data: bytes) -> None:
    decode_everything(data)
    offset = 0
    while offset < len(data):
        size = stun.stream_frame_length(data, offset)
        if size is None or size < 0:
            break
        decode_everything(data[offset:offset + size])
        offset += size


def write_seeds(corpus: str) -> None:
    os.makedirs(corpus, exist_ok=True)
    for i, seed in enumerate(seeds()):
        with open(os.path.join(corpus, f"seed-{i}"), "wb") as f:
            f.write(seed)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--write-seeds":
        write_seeds(sys.argv[2])
    else:
        atheris.Setup(sys.argv, test_one_input)
        atheris.Fuzz()
