"""Real servers on loopback: `twistd turnrelay` and coturn's echo peer, started per test.

Readiness is an event, not a sleep: the server is ready when its log has announced every
listener it was asked for; the echo peer is ready when it has echoed a probe.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator, List, Optional, Tuple

import pytest

from relay.service.host import usable_cpus

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
# Relay ports above Linux's ephemeral client ports (32768-60999), so the kernel never hands
# a relay port to a test client.
RELAY_PORTS = (61000, 65000)
USER, PASSWORD = "alice", "wonderland"
REALM = "turnrelay.test"


def tool(name: str) -> str:
    """A real third-party binary the suite needs: missing is a failure, never a skip."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: run `bash scripts/test.sh`, which installs it")
    return path


def _ephemeral_low() -> int:
    """The lowest port Linux hands out to binds of port 0 (32768 unless tuned)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


# Listening ports below the ephemeral range: a port found free there cannot be handed by the
# kernel to some other socket's bind(port 0) between this check and the server's own bind.  And
# above 10000-30000, where bench/ scripts put their relays' ports: a benchmark run beside the
# suite must not take a port a test has just found free.
LISTEN_PORTS = range(30000, max(_ephemeral_low(), 32768))
# Handed out in turn from a random start, so that calls in a row never give the same port (a
# test asking for 65 at once got one twice about half the time when each was drawn at random).
_start = random.randrange(len(LISTEN_PORTS))
_next_port = itertools.cycle([*LISTEN_PORTS[_start:], *LISTEN_PORTS[:_start]])


def free_port(host: str = "127.0.0.1") -> int:
    """A port free for both UDP and TCP on `host` (TURN listens on both with one number)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(len(LISTEN_PORTS)):
        port = next(_next_port)
        with socket.socket(family, socket.SOCK_STREAM) as tcp, \
                socket.socket(family, socket.SOCK_DGRAM) as udp:
            try:
                tcp.bind((host, port))
                udp.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


@dataclass
class Server:
    """A running server and its log.  A thread reads the log pipe as it comes, so the pipe
    never fills while a test is busy elsewhere, and a wait for a line the server never
    writes ends at its deadline instead of blocking on a silent pipe."""
    process: subprocess.Popen
    host: str
    port: int
    tls_port: int
    log: List[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._grown = threading.Condition()
        self._ended = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            with self._grown:
                self.log.append(line)
                self._grown.notify_all()
        with self._grown:
            self._ended = True  # the process has exited: no line will come
            self._grown.notify_all()

    def read_until(self, needle: str, timeout: float = 20.0) -> str:
        return self.search(re.escape(needle), timeout).string

    def search(self, pattern: str, timeout: float = 20.0) -> re.Match:
        """The first log line matching `pattern`, waiting for it if need be."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._grown:
            while True:
                for line in self.log[seen:]:
                    match = re.search(pattern, line)
                    if match:
                        return match
                seen = len(self.log)
                left = deadline - time.monotonic()
                if self._ended or left <= 0:
                    break
                self._grown.wait(left)
        raise AssertionError(f"server never logged {pattern!r} within {timeout} s; log:\n"
                             + "".join(self.log))

    def read_everywhere(self, needle: str, timeout: float = 20.0) -> None:
        """Wait until every worker process has logged `needle` (the one process, without
        workers): what each worker does by itself, such as a reload."""
        workers = re.search(r"for (\d+) workers", "".join(self.log[:50]))
        if workers is None:
            self.read_until(needle, timeout)
            return
        for index in range(int(workers.group(1))):
            self.search(rf"\[worker {index}\] .*{re.escape(needle)}", timeout)

    def usage_recorded(self, session: str, backend: Optional[str] = None,
                       timeout: float = 20.0) -> None:
        """Wait until `backend` (any, if None) has stored the end of `session`: the ledger names
        the ended sessions of each write, several to a line."""
        name = r"\S+" if backend is None else re.escape(backend)
        self.search(rf"usage recorded in {name} for ended sessions .*\b{session}\b", timeout)

    def listening(self, *transports: str) -> None:
        """Wait until the log has announced the listener of each of `transports`."""
        for transport in transports:
            number = self.tls_port if transport == "tls" else self.port
            self.read_until(f"listening on {transport} [{self.host}]:{number}")

    def kill(self) -> None:
        """SIGKILL the relay whole, as a crash or a pod's SIGKILL would: its worker processes
        (each in a process group of its own) too."""
        for pid in re.findall(r"worker \d+ started, pid (\d+)", "".join(self.log)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        self.process.kill()
        self.process.wait()

    def stop(self) -> str:
        """SIGTERM (SIGKILL after 15 s), then the whole log."""
        stop_process(self.process)
        self._reader.join(timeout=10)
        return "".join(self.log)


def stop_process(process: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM, and SIGKILL if it has not exited within `timeout`: every process the tests and
    the bench scripts start ends this way."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def launch(args: List[str], host: str, port: int, tls_port: int,
           transports: Iterable[str] = ("udp", "tcp", "tls"), cwd: str = ROOT) -> Server:
    """`twistd turnrelay ARGS`, logging to a pipe; returned once every listener of
    `transports` is announced and, with workers, every worker is ready; stopped if not."""
    # --log-level debug: the tests wait for each listener, worker and backend coming up.
    process = subprocess.Popen([TWISTD, "-n", "--pidfile=", "-l", "-", "turnrelay",
                                "--log-level", "debug", *args],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd)
    server = Server(process, host, port, tls_port)
    try:
        server.listening(*transports)
        workers = re.search(r"listening on \S+ \[\S+\]:\d+ for (\d+) workers", "".join(server.log))
        if workers:
            server.read_until(f"all {workers.group(1)} workers ready")
    except BaseException:
        server.stop()
        raise
    return server


def start_server(*extra: str, host: str = "127.0.0.1", users=((USER, PASSWORD),),
                 udp: bool = True, tcp: bool = True, tls: bool = True,
                 state_dir: str = None, loopback_peers: bool = True,
                 relay_ports: Tuple[int, int] = RELAY_PORTS) -> Server:
    port, tls_port = free_port(host), free_port(host)
    args = ["--listening-ip", host, "--listening-port", str(port),
            "--tls-listening-port", str(tls_port), "--relay-ip", host,
            "--min-port", str(relay_ports[0]), "--max-port", str(relay_ports[1]),
            "--realm", REALM,
            # Stopped at once, live allocations or not; a drain test gives its own grace.
            "--drain-grace", "0"] + (["--allow-loopback-peers"] if loopback_peers else [])
    # The relay's default, one worker per CPU, which is what users run; two at least, so a
    # one-CPU machine still tests the workers.  A test of the single-process mode passes
    # --workers 1 (a later --workers wins).
    if usable_cpus() < 2:
        args += ["--workers", "2"]
    for name, password in users:
        args += ["--user", f"{name}:{password}"]
    for enabled, flag in ((udp, "--no-udp"), (tcp, "--no-tcp"), (tls, "--no-tls")):
        if not enabled:
            args.append(flag)
    if state_dir:
        args += ["--state-dir", state_dir]
    # scripts/test.sh runs the interop tests once more on the other data plane.
    if os.environ.get("TURNRELAY_TEST_DATAPLANE"):
        args += ["--dataplane", os.environ["TURNRELAY_TEST_DATAPLANE"]]
    args += list(extra)
    transports = [name for enabled, name in ((udp, "udp"), (tcp, "tcp"), (tls, "tls")) if enabled]
    return launch(args, host, port, tls_port, transports)


@pytest.fixture
def turnrelay(tmp_path) -> Iterator[Server]:
    server = start_server(state_dir=str(tmp_path / "state"))
    yield server
    server.stop()


@pytest.fixture
def server_factory(tmp_path) -> Iterator:
    started: List[Server] = []

    def start(*extra: str, **kwargs) -> Server:
        kwargs.setdefault("state_dir", str(tmp_path / "state"))
        server = start_server(*extra, **kwargs)
        started.append(server)
        return server
    yield start
    for server in started:
        server.stop()


def wait_for_udp_echo(host: str, port: int, timeout: float = 10.0) -> None:
    """Ready when a probe comes back: each wait is on the reply, not a fixed sleep."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    deadline = time.monotonic() + timeout
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.settimeout(0.2)
        while time.monotonic() < deadline:
            probe.sendto(b"probe", (host, port))
            try:
                if probe.recv(100) == b"probe":
                    return
            except OSError:
                continue
    raise AssertionError(f"echo peer on {host}:{port} never answered")


@contextlib.contextmanager
def running_echo_peer(host: str = "127.0.0.1") -> Iterator[tuple]:
    """coturn's turnutils_peer: a UDP echo server on loopback."""
    port = free_port(host)
    process = subprocess.Popen([tool("turnutils_peer"), "-L", host, "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_udp_echo(host, port)
        yield host, port
    finally:
        stop_process(process)


@pytest.fixture
def echo_peer() -> Iterator[tuple]:
    with running_echo_peer() as peer:
        yield peer
