"""Line coverage of the sans-IO core reached by the fuzz corpora (after bench/fuzz.sh).

    .venv/bin/python bench/fuzz_coverage.py        # needs coverage (pip install coverage)

Replays every input kept in ~/.cache/turnrelay-fuzz/{stun,turn,turn-sequences} through the
same target functions, under coverage.py, and prints the line coverage of the modules the
targets exercise.  libFuzzer's own "cov:" counts edges of instrumented code; this says which
lines of relay/proto/stun.py, relay/core/server.py, ... the saved corpus reaches.
"""
from __future__ import annotations

import os
import sys

import coverage

CORE = ["stun", "turn", "allocation", "peers", "nonces"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
cov = coverage.Coverage(include=[os.path.join(ROOT, "relay", f"{m}.py") for m in CORE])
cov.start()
sys.path.insert(0, os.path.join(ROOT, "bench"))
import fuzz_stun  # noqa: E402
import fuzz_turn  # noqa: E402

cache = os.environ.get("TURNRELAY_FUZZ_CACHE", os.path.expanduser("~/.cache/turnrelay-fuzz"))
targets = {"stun": fuzz_stun.test_one_input, "turn": fuzz_turn.datagram,
           "turn-sequences": fuzz_turn.sequence.hypothesis.fuzz_one_input}
for name, target in targets.items():
    corpus = os.path.join(cache, name)
    inputs = sorted(os.listdir(corpus)) if os.path.isdir(corpus) else []
    for entry in inputs:
        with open(os.path.join(corpus, entry), "rb") as f:
            target(f.read())
    print(f"{name}: {len(inputs)} corpus inputs replayed")
cov.stop()
cov.report(show_missing=False)
