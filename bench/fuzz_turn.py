"""Coverage-guided fuzzing (atheris/libFuzzer) of the sans-IO TURN state machine.

    bash bench/fuzz.sh 600            # this target and fuzz_stun.py, 600 s each

libFuzzer's bytes choose, through Hypothesis's `fuzz_one_input`, the operations of
tests/test_turn_properties.py: two clients sending signed TURN requests with arbitrary
attributes, damaged bytes, ChannelData, Send indications and peer datagrams while the clock
jumps.  The property's checks (nothing raises, every reply parses, no relay to a forbidden
peer, everything released at the end) are the crash conditions.  Signing happens inside the
target, so the fuzzer reaches the authenticated handlers instead of stopping at 401.
"""
from __future__ import annotations

import os
import sys

import atheris

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

with atheris.instrument_imports(include=["relay"]):
    from hypothesis import HealthCheck, given, settings
    from test_turn_properties import SEQUENCES, run_sequence

# No deadline: instrumented code on a shared machine is slow, and slowness is not a bug here.
property_test = settings(deadline=None, database=None, suppress_health_check=list(HealthCheck))(
    given(*SEQUENCES)(run_sequence))

if __name__ == "__main__":
    atheris.Setup(sys.argv, property_test.hypothesis.fuzz_one_input)
    atheris.Fuzz()
