"""The README's quick start, run as written inside a network namespace of its own.

The quick start uses the embedded defaults (ports 3478 and 5349 on every address, relay
addresses found from the host's route, several workers): in a fresh network namespace those
ports are free whatever else runs on the machine, and the namespace gets one routable address
(on loopback, with a default route through it) for the relay to find, as a host would have.

`python -m support.quickstart README` must run inside that namespace (`unshare --net`); it
prints, as JSON, each client command's exit status and output and the server's whole log.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from typing import Dict, List, Tuple

from support.servers import ROOT, Server

BEGIN, END = "<!-- quick-start", "<!-- /quick-start -->"
SERVE = "bash scripts/serve.sh"
# An address no documentation or private range covers (the peer rules would refuse those), on
# loopback: the namespace's only interface, so nothing leaves it.
ADDRESS = "11.0.0.1"
# One process logs its last listener; the parent of several workers logs when all are ready.
READY = r"all \d+ workers ready|\] listening on tls \[::\]:5349$"
BIN = os.path.dirname(sys.executable)


def commands(readme: str) -> Tuple[List[str], List[List[str]]]:
    """The server's arguments and the client commands of the README's quick start: every line
    of its `sh` blocks, comments removed."""
    text = readme.split(BEGIN, 1)[1].split(END, 1)[0]
    lines = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        lines += [shlex.split(line, comments=True) for line in block.splitlines()]
    lines = [line for line in lines if line]
    server = [line for line in lines if shlex.join(line).startswith(SERVE)]
    assert len(server) == 1, f"one `{SERVE}` line expected in the quick start: {lines}"
    return server[0][2:], [line for line in lines if line is not server[0]]


def serve_command(arguments: List[str]) -> List[str]:
    """What scripts/serve.sh runs once it has installed turnrelay into .venv (its install is
    the packaging test's part): its last line, checked here, with this suite's venv."""
    with open(os.path.join(ROOT, "scripts", "serve.sh")) as script:
        last = script.read().strip().splitlines()[-1]
    assert last == 'exec .venv/bin/twistd -n --pidfile= turnrelay "$@"', last
    return [os.path.join(BIN, "twistd"), "-n", "--pidfile=", "turnrelay", *arguments]


def client_command(argv: List[str]) -> List[str]:
    assert argv[0].startswith(".venv/bin/"), f"a quick start command outside .venv: {argv}"
    return [os.path.join(BIN, argv[0][len(".venv/bin/"):]), *argv[1:]]


def main(readme_path: str) -> None:
    for command in (["ip", "link", "set", "lo", "up"],
                    ["ip", "addr", "add", f"{ADDRESS}/32", "dev", "lo"],
                    ["ip", "route", "add", "default", "dev", "lo", "src", ADDRESS]):
        subprocess.run(command, check=True, timeout=30)
    with open(readme_path) as readme:
        arguments, clients = commands(readme.read())
    home = tempfile.mkdtemp(prefix="quickstart-home-")  # the default --state-dir is under $HOME
    env = dict(os.environ, HOME=home)
    process = subprocess.Popen(serve_command(arguments), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)
    server = Server(process, ADDRESS, 3478, 5349)
    results: List[Dict[str, object]] = []
    try:
        server.search(READY, timeout=60)
        for argv in clients:
            done = subprocess.run(client_command(argv), capture_output=True, text=True,
                                  cwd=ROOT, env=env, timeout=120)
            results.append({"command": argv, "status": done.returncode,
                            "output": done.stdout + done.stderr})
    finally:
        server.stop()
    json.dump({"clients": results, "log": "".join(server.log)}, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1])
