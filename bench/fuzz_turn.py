"""Coverage-guided fuzzing (atheris/libFuzzer) of the sans-IO TURN state machine.

    bash bench/fuzz.sh 600 turn turn-sequences     # each mode for 600 s

Two modes, the second chosen by `--sequences` (fuzz.sh's target `turn-sequences`):
- datagrams: each input is one datagram from a client whose allocation holds a permission
  and a channel, then the same bytes as stream ChannelData.  Fast: thousands a second.
- sequences: libFuzzer's bytes choose, through Hypothesis's `fuzz_one_input`, the
  operations of tests/unit/test_turn_properties.py: two clients sending signed TURN requests with
  arbitrary attributes, damaged bytes, ChannelData, Send indications and peer datagrams while
  the clock jumps.  Signing happens inside the target, so the fuzzer reaches the
  authenticated handlers instead of stopping at 401.  Slow: a whole sequence per input.
Crash conditions: anything raised, a reply that does not parse, a relay to a peer the default
policy forbids, and (sequences) an allocation or relay socket left behind after expiry.
"""
from __future__ import annotations

import os
import sys

import atheris

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), os.path.join(ROOT, "tests", "unit")]

with atheris.instrument_imports(include=["relay"]):
    from hypothesis import HealthCheck, given, settings
    from test_turn_properties import SEQUENCES, run_sequence

    from relay.core.peers import PeerPolicy
    from relay.proto import stun
    from support.core_harness import PEER, PEER_V6, RELAY_V4, RELAY_V6, Harness

# No deadline: instrumented code on a shared machine is slow, and slowness is not a bug here.
sequence = settings(deadline=None, database=None, suppress_health_check=list(HealthCheck))(
    given(*SEQUENCES)(run_sequence))
POLICY = PeerPolicy()
RESET_EVERY = 20_000


class Allocated:
    """One client with an allocation, a permission and a channel, remade now and then."""

    def __init__(self) -> None:
        self.harness = Harness(relay_ips={stun.FAMILY_IPV4: RELAY_V4, stun.FAMILY_IPV6: RELAY_V6})
        self.client = self.harness.client("alice")
        self.client.allocate_ok((stun.ADDITIONAL_ADDRESS_FAMILY, stun.FAMILY_IPV6))
        assert self.client.create_permission(PEER, PEER_V6).cls == stun.SUCCESS
        assert self.client.channel_bind(0x4000, PEER).cls == stun.SUCCESS
        self.inputs = 0


state = Allocated()


def datagram(data: bytes) -> None:
    global state
    state.inputs += 1
    if state.inputs > RESET_EVERY or state.client.allocation is None:
        state = Allocated()
    client = state.client
    for reply in client.exchange(data):
        if reply[0] < 0x40:
            stun.parse(reply)
    if len(data) >= 4 and 0x40 <= data[0] < 0x80:
        state.harness.server.channel_data(client.client, data)
    for endpoint in state.harness.binder.endpoints:
        for _, peer in endpoint.sent:
            assert POLICY.permits(peer[0]), peer
        endpoint.sent.clear()


if __name__ == "__main__":
    if "--sequences" in sys.argv:
        sys.argv.remove("--sequences")
        atheris.Setup(sys.argv, sequence.hypothesis.fuzz_one_input)
    else:
        atheris.Setup(sys.argv, datagram)
    atheris.Fuzz()
