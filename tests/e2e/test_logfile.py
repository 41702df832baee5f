"""`twistd --logfile` with workers: the relay's lines in the file, and SIGUSR1 rotating it."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time

from relay.proto import stun
from support.servers import PASSWORD, REALM, RELAY_PORTS, TWISTD, USER, free_port, stop_process
from support.wire_client import WireClient

OPENED = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[turnrelay#info\] \[worker [01]\] "
                    r"allocation opened user=alice .* session=(\S+)$", re.MULTILINE)


def _wait_for(path: str, pattern: str, timeout: float = 30.0) -> str:
    """The file's text once it matches `pattern` (a file has no event to wait on: polled)."""
    deadline = time.monotonic() + timeout
    while True:
        text = open(path).read() if os.path.exists(path) else ""
        if re.search(pattern, text, re.MULTILINE) or time.monotonic() > deadline:
            assert re.search(pattern, text, re.MULTILINE), f"{pattern!r} not in {path}:\n{text}"
            return text
        time.sleep(0.05)


def _allocate(port: int) -> None:
    client = WireClient(("127.0.0.1", port), USER, PASSWORD, REALM)
    assert client.request(stun.ALLOCATE, (stun.REQUESTED_TRANSPORT, 17)).cls == stun.SUCCESS


def test_the_log_file_has_the_workers_lines_and_rotates_on_sigusr1(tmp_path):
    logfile, port = str(tmp_path / "relay.log"), free_port()
    process = subprocess.Popen(
        [TWISTD, "-n", "--pidfile=", "--logfile", logfile, "turnrelay", "--log-level", "debug",
         "--listening-ip", "127.0.0.1", "--listening-port", str(port), "--no-tcp", "--no-tls",
         "--relay-ip", "127.0.0.1", "--min-port", str(RELAY_PORTS[0]),
         "--max-port", str(RELAY_PORTS[1]), "--realm", REALM, "--user", f"{USER}:{PASSWORD}",
         "--allow-loopback-peers", "--drain-grace", "0", "--workers", "2",
         "--state-dir", str(tmp_path / "state")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        _wait_for(logfile, r"all 2 workers ready")
        _allocate(port)
        before = OPENED.findall(_wait_for(logfile, OPENED.pattern))
        process.send_signal(signal.SIGUSR1)
        _wait_for(logfile + ".1", OPENED.pattern)
        _allocate(port)
        after = OPENED.findall(_wait_for(logfile, OPENED.pattern))
    finally:
        stop_process(process)
    assert OPENED.findall(open(logfile + ".1").read()) == before and len(before) == 1
    assert after and not set(after) & set(before)
    assert "listening" in open(logfile + ".1").read()  # the start, before the rotation
    assert process.stdout.read() == b""  # everything went to the file
