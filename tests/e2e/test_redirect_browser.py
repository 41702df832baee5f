"""Chromium (libwebrtc's TURN port) follows a full relay's 300 Try Alternate to the nearest
serving region and relays its call there (tests/support/redirect_browser.py runs it in a
network namespace of its own: libwebrtc never follows a redirect to a loopback address)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from support.servers import ROOT, tool

MESSAGES = 10


def test_chromium_follows_a_full_relays_redirect_to_the_other_region(tmp_path):
    unshare = [tool("unshare"), "--net"] if os.geteuid() == 0 \
        else [tool("unshare"), "--user", "--map-root-user", "--net"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
    done = subprocess.run([*unshare, sys.executable, "-m", "support.redirect_browser", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    result = report["result"]
    assert result["connected"], (result["errors"], result.get("failure"))
    assert (result["sent"], result["received"], result["inOrder"]) == (MESSAGES, MESSAGES, True)
    for pair in result["pairs"]:  # both peer connections relay through eu-west's relay
        assert pair["localType"] == "relay" and pair["localAddress"].startswith("11.0.0.2:"), result
    opened = re.compile(r"allocation opened user=alice .*transport=udp")
    assert len(opened.findall(report["far"])) >= 2, report["far"]
    assert len(opened.findall(report["full"])) == 1, report["full"]  # the held allocation only
