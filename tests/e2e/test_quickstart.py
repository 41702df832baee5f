"""The first five minutes, as the README's quick start has them: `bash scripts/serve.sh` alone
(the embedded defaults: several workers, the default ports, a first-run credential), then what
its start banner says to paste, run exactly as printed: the `turnutils_uclient` line relays
with no loss, the `/test` URL completes its relay-only check in headless Chromium, and the
`curl` line mints a credential.  The commands are read from the README and the banner
themselves, so neither can drift from what runs (tests/support/quickstart.py runs them in a
network namespace of their own, where the default ports are free)."""
import json
import os
import re
import subprocess
import sys

from support.quickstart import commands
from support.servers import ROOT, tool

README = os.path.join(ROOT, "README.md")
START_LINES = 15  # the bound for the whole start at the default --log-level


def namespace() -> list:
    """`unshare` into a new network namespace; without root, as root of a new user namespace."""
    if os.geteuid() == 0:
        return [tool("unshare"), "--net"]
    return [tool("unshare"), "--user", "--map-root-user", "--net"]


def test_the_quick_start_and_its_banner_work_as_printed():
    with open(README) as readme:
        arguments, _ = commands(readme.read())
    assert arguments == [], "the quick start is serve.sh with no options"

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
    done = subprocess.run([*namespace(), sys.executable, "-m", "support.quickstart", README],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=400)
    assert done.returncode == 0, done.stderr
    ran = json.loads(done.stdout)
    log = ran["log"]
    assert ran["start_lines"] <= START_LINES, log
    assert not re.search(r"#(error|critical)\]|Traceback", log), log
    for client in ran["clients"]:
        assert client["status"] == 0, (client, log)

    uclient = next(c for c in ran["clients"] if c["command"][0] == "turnutils_uclient")
    sent = re.findall(r"tot_send_msgs=(\d+), tot_recv_msgs=(\d+)", uclient["output"])
    assert sent and sent[-1][0] == sent[-1][1] != "0", uclient
    assert "Total lost packets 0 (" in uclient["output"], uclient

    curl = next(c for c in ran["clients"] if c["command"][0] == "curl")
    token = json.loads(curl["output"])
    assert token["username"].endswith(":" + uclient["command"][uclient["command"].index("-u") + 1])
    assert token["password"] and token["ice_servers"], token

    browser = ran["browser"]
    assert browser["status"] == "Done.", browser
    assert [(row["transport"], row["ok"]) for row in browser["rows"]] == [
        ("udp", True), ("tcp", True)], browser
    assert "apikey" not in browser["address"], browser  # the key left the address bar
    # The relay saw both: the uclient pair and the browsers' allocations, relaying to each
    # other on the namespace's one address.
    assert re.search(r"allocation opened user=turn-\w+ .*relay=11\.0\.0\.1:", log), log
    assert re.search(r"allocation opened user=\d+:turn-\w+:self-test .*relay=11\.0\.0\.1:", log), log
