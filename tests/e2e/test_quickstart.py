"""The README's quick start works as written: its server command, on the embedded defaults
(several workers, the default ports), and its `turnrelay probe` relaying through the `turn:`
URL it gives over UDP, TCP and TLS.  The commands are read from the README itself, so the front
page cannot drift from what runs (tests/support/quickstart.py runs them in a network namespace
of their own, where the default ports are free)."""
import json
import os
import subprocess
import sys

from support.quickstart import commands
from support.servers import ROOT, tool

README = os.path.join(ROOT, "README.md")


def namespace() -> list:
    """`unshare` into a new network namespace; without root, as root of a new user namespace."""
    if os.geteuid() == 0:
        return [tool("unshare"), "--net"]
    return [tool("unshare"), "--user", "--map-root-user", "--net"]


def test_the_quick_start_relays_through_its_turn_url():
    with open(README) as readme:
        arguments, clients = commands(readme.read())
    assert clients and any(argv[1:2] == ["probe"] for argv in clients), clients

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
    done = subprocess.run([*namespace(), sys.executable, "-m", "support.quickstart", README],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    ran = json.loads(done.stdout)
    for client in ran["clients"]:
        assert client["status"] == 0, (client, ran["log"])
    probe = next(c for c in ran["clients"] if c["command"][1:2] == ["probe"])["output"]
    rows = {line.split()[0]: line.split()[2] for line in probe.splitlines()[1:4]}
    assert rows == {"UDP": "ok", "TCP": "ok", "TLS": "ok"}, probe
    # The relay itself saw the probe's packets through it, on each transport, in its workers.
    for transport in ("udp", "tcp", "tls"):
        assert f"transport={transport} relay=11.0.0.1:" in ran["log"], ran["log"]
    assert "from_client=20/" in ran["log"]
