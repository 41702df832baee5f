"""turnrelay beside coturn and pion/turn on this machine: the same client, the same load, one
after the other.

    .venv/bin/python bench/compare.py --rounds 3

Each round starts each server in turn (coturn's `turnserver` with one relay thread, pion/turn
(Go, bench/pion_server.go built from Debian's golang-github-pion-turn.v2-dev), turnrelay
on CPython on each `--dataplane` (python, native), turnrelay on PyPy when `--pypy` names one) on loopback, pinned to one core, and
drives it from the other core: `bench/loadgen.c` (built here with gcc) moves the packets,
coturn's `turnutils_peer` echoes them, and this script makes the allocations with relay.proto.stun.
The table gives the median over the rounds and each server's ratio to the first (coturn):

- CPU us per relayed packet at a fixed offered load: the server's CPU time (every thread and
  child, from /proc schedstat) over the packets relayed in both directions.  Noise-proof on a
  busy machine, unlike the figures below, which are wall-clock.
- the highest offered load (round trips a second) with < 0.1% lost, found by doubling then
  bisecting; ">=" when the load generator, not the server, ran out.
- round-trip p50/p99 at half that load.
- udp-spread: the CPU per relayed packet under load spread out as real clients make it (20
  turnutils_uclient clients, 200 messages a second each), where batching cannot help.
- Allocate + Refresh(0) cycles a second, and the server's CPU per cycle (UDP), each cycle by a
  new client of `bench/loadgen.c`; meanwhile, how long a Binding request (100 a second) waits
  for its answer: the server's stalls under that load.
- resident memory per idle allocation, over 10,000 UDP allocations, and the CPU those
  allocations cost while idle (each server's timers: expiry, permissions, rate limits).

Everything binds 127.0.0.1 and every run is bounded in packets and seconds.  Run it on demand;
it is not part of the test suite.  PyPy: see docs/performance.md.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, Dict, Iterator, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]  # the tests' support package
from relay.proto import stun  # noqa: E402
from relay.service.runtime import PYPY_GC  # noqa: E402
from support.servers import free_port, running_echo_peer, stop_process  # noqa: E402

USER, PASSWORD, REALM = "bench", "bench-password", "bench.turnrelay"
HOST = "127.0.0.1"
# Below the kernel's ephemeral ports, which the clients use, and below the ports the test suite
# listens on (tests/support/servers.LISTEN_PORTS), so a benchmark can run beside it.
RELAY_PORTS = (10000, 30000)
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "turnrelay-bench")
PYPY_TWISTD = os.path.join(CACHE, "pypy-venv", "bin", "twistd")  # docs/performance.md makes it
SYSTEM_PYTHON = "/usr/bin/python3"  # the one users run turnrelay on (see system_cpython)
MODES = ("udp-channel", "udp-send", "tcp-channel", "tls-channel", "udp-spread")
# udp-spread: load as a new user makes it, spread out rather than batched: SPREAD_CLIENTS
# turnutils_uclient clients (-c: no RTCP pair), each SPREAD_MESSAGES messages of 100 bytes
# at 200 a second (-z 5), through channels to turnutils_peer.
SPREAD_CLIENTS, SPREAD_MESSAGES = 20, 1500
LOSS_LIMIT = 0.001
MAX_RATE = 400_000


def _task_files(pid: int, name: str) -> Iterator[Tuple[int, str]]:
    """(process, text) of /proc/PROC/task/TASK/`name` for every thread of `pid` and of its child
    processes; a thread or process gone meanwhile is skipped."""
    for proc in [pid] + children(pid):
        for path in glob.glob(f"/proc/{proc}/task/*/{name}"):
            try:
                with open(path) as f:
                    yield proc, f.read()
            except (FileNotFoundError, ProcessLookupError):
                continue


def cpu_ns_by_process(pid: int) -> Dict[int, int]:
    """CPU time so far of `pid` and of each of its child processes, every thread counted, in
    nanoseconds."""
    found: Dict[int, int] = {}
    for proc, text in _task_files(pid, "schedstat"):
        found[proc] = found.get(proc, 0) + int(text.split()[0])
    return found


def cpu_ns(pid: int) -> int:
    return sum(cpu_ns_by_process(pid).values())


def context_switches(pid: int) -> int:
    """Context switches so far, voluntary and not, of every thread of `pid` and its children:
    a thread handing work to another costs the receiver's wake-up."""
    return sum(int(line.split()[1]) for _, text in _task_files(pid, "status")
               for line in text.splitlines() if "ctxt_switches" in line)


def user_system_ticks(pid: int) -> Tuple[int, int]:
    """User and system CPU time so far (clock ticks) of every thread of `pid` and its
    children: how much of a cost is the server's own code and how much the kernel's."""
    user = system = 0
    for _, text in _task_files(pid, "stat"):
        fields = text.rsplit(")", 1)[1].split()  # from the state, field 3 of proc(5)
        user, system = user + int(fields[11]), system + int(fields[12])
    return user, system


def children(pid: int) -> List[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
            if ppid == pid:
                found.append(int(entry))
                found.extend(children(int(entry)))
    return found


def rss_kib(pid: int) -> int:
    total = 0
    for proc in [pid] + children(pid):
        with open(f"/proc/{proc}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def wait_readable(socks, timeout: float) -> List[socket.socket]:
    """The sockets with a datagram waiting (poll: thousands of descriptors, unlike select)."""
    poller = select.poll()
    by_fd = {s.fileno(): s for s in socks}
    for fd in by_fd:
        poller.register(fd, select.POLLIN)
    return [by_fd[fd] for fd, _ in poller.poll(timeout * 1000)]


class Server:
    """One server process under test, pinned to `core`."""

    start_timeout = 60.0

    def __init__(self, name: str, argv: List[str], workdir: str, env: Optional[dict] = None,
                 workers: int = 1, logs_to_stdout: bool = False):
        self.name = name
        self.logs_to_stdout = logs_to_stdout  # its standard output is its log, else discarded
        self.workers = workers
        self.cores: Optional[str] = None  # a taskset list of its own, else --server-core
        self.log_path = os.path.join(workdir, name.replace(" ", "_") + ".log")
        self.template = argv
        self.env = env
        self.process: Optional[subprocess.Popen] = None

    def start(self, cores: str) -> None:
        """Start on fresh ports (a port free in one round may be a client's in the next),
        pinned to `cores` (a taskset list)."""
        for attempt in range(3):
            self.port, self.tls_port = free_port(), free_port()
            argv = [a.format(port=self.port, tls_port=self.tls_port, log=self.log_path)
                    for a in self.template]
            self.process = subprocess.Popen(["taskset", "-c", cores] + argv, cwd=ROOT,
                                            env=self.env,
                                            stdout=open(self.log_path, "w") if self.logs_to_stdout
                                            else subprocess.DEVNULL,
                                            stderr=open(self.log_path + ".err", "w"))
            deadline = time.monotonic() + self.start_timeout
            while time.monotonic() < deadline and self.process.poll() is None:
                if self._answers():
                    return
                time.sleep(0.2)  # polling a process we do not control for readiness
            self.stop()
        raise SystemExit(f"{self.name} did not start; see {self.log_path}(.err)")

    def _answers(self) -> bool:
        """Ready when a Binding request is answered over UDP and the TLS port accepts."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.2)
            try:
                s.sendto(stun.Message(stun.BINDING, stun.REQUEST).encode(), (HOST, self.port))
                s.recv(2048)
                socket.create_connection((HOST, self.tls_port), timeout=0.2).close()
                return True
            except OSError:
                return False

    @property
    def pid(self) -> int:
        return self.process.pid  # taskset execs the server, so this is the server's pid

    def stop(self) -> None:
        if self.process:
            stop_process(self.process, timeout=30)


def coturn(workdir: str, cert: str, key: str) -> Server:
    return Server("coturn", [
        shutil.which("turnserver"), "-n", "--listening-ip", HOST, "--listening-port", "{port}",
        "--tls-listening-port", "{tls_port}", "--relay-ip", HOST,
        "--min-port", str(RELAY_PORTS[0]), "--max-port", str(RELAY_PORTS[1]),
        "--lt-cred-mech", "--user", f"{USER}:{PASSWORD}", "--realm", REALM,
        "--relay-threads=1", "--allow-loopback-peers", "--no-dtls", "--no-cli",
        "--cert", cert, "--pkey", key, "--log-file", "{log}", "--simple-log",
        "--no-stdout-log", "--pidfile", os.path.join(workdir, "coturn.pid")], workdir)


def build_pion() -> Optional[str]:
    """bench/pion_server.go built offline against Debian's pion/turn sources, or None (and why,
    on stderr) where Go or those sources are missing."""
    source = os.path.join(ROOT, "bench", "pion_server.go")
    gopath = "/usr/share/gocode"
    if not shutil.which("go") or not os.path.isdir(os.path.join(gopath, "src/github.com/pion/turn/v2")):
        print("pion/turn skipped: apt-get install golang-go golang-github-pion-turn.v2-dev",
              file=sys.stderr)
        return None
    os.makedirs(CACHE, exist_ok=True)
    binary = os.path.join(CACHE, "pion-turn")
    if not os.path.exists(binary) or os.path.getmtime(binary) < os.path.getmtime(source):
        subprocess.run(["go", "build", "-o", binary, source], check=True,
                       env=dict(os.environ, GO111MODULE="off", GOPATH=gopath))
    return binary


def system_cpython() -> str:
    """twistd in a venv of the machine's own python3 (/usr/bin/python3), made here once.

    That is the CPython users run: `scripts/serve.sh` on Debian and the container image install
    into Debian's python3, which Debian builds with profile-guided and link-time optimisation,
    like the python:3.11 images.  The interpreter running the bench may be another build (a
    pyenv one, without those: the project machine's took 1.2x the CPU per Allocate cycle).
    Without /usr/bin/python3, or when it cannot make the venv, this interpreter's twistd."""
    venv = os.path.join(CACHE, "cpython-venv")
    twistd = os.path.join(venv, "bin", "twistd")
    if not os.path.exists(twistd) and os.path.exists(SYSTEM_PYTHON):
        try:
            subprocess.run([SYSTEM_PYTHON, "-m", "venv", venv], check=True)
            subprocess.run([os.path.join(venv, "bin", "pip"), "install", "-q", "-e", ROOT,
                            "--config-settings", "editable_mode=compat"], check=True)
        except subprocess.CalledProcessError:
            shutil.rmtree(venv, ignore_errors=True)
    if os.path.exists(twistd):
        return twistd
    print(f"no venv of {SYSTEM_PYTHON}: turnrelay runs on {sys.executable}", file=sys.stderr)
    return os.path.join(os.path.dirname(sys.executable), "twistd")


def interpreter(twistd: str) -> str:
    """The Python `twistd` runs on, as a line of the report: version and base interpreter."""
    python = os.path.join(os.path.dirname(twistd), "python")
    return subprocess.run(
        [python, "-c", "import platform, sys; print(platform.python_implementation(), "
         "platform.python_version(), getattr(sys, '_base_executable', sys.executable))"],
        capture_output=True, text=True, check=True).stdout.strip()


def pion(binary: str, workdir: str, cert: str, key: str) -> Server:
    """pion/turn pinned like the others: Go sizes GOMAXPROCS from the affinity, so one core."""
    return Server("pion", [
        binary, "-ip", HOST, "-port", "{port}", "-tls-port", "{tls_port}", "-user", USER,
        "-password", PASSWORD, "-realm", REALM, "-cert", cert, "-key", key,
        "-min-port", str(RELAY_PORTS[0]), "-max-port", str(RELAY_PORTS[1])], workdir)


def turnrelay(name: str, twistd: str, workdir: str, cert: str, key: str,
              workers: int = 1, dataplane: str = "python") -> Server:
    """turnrelay as its container runs it (docker/relay.Dockerfile): logging to standard output,
    which goes to the log file.  On PyPy a single process (`workers=1`) gets the collector
    settings the relay gives its worker processes (`PYPY_GC`), unless this environment has
    its own: what a worker runs, measured on one core."""
    state = os.path.join(workdir, name.replace(" ", "_") + "-state")
    env = dict(PYPY_GC, **os.environ)
    env["PYTHONPATH"] = ROOT
    return Server(name, [
        twistd, "-n", "--pidfile=", "--logfile=-", "turnrelay", "--listening-ip", HOST,
        "--listening-port", "{port}", "--tls-listening-port", "{tls_port}", "--relay-ip", HOST,
        "--min-port", str(RELAY_PORTS[0]), "--max-port", str(RELAY_PORTS[1]),
        "--user", f"{USER}:{PASSWORD}", "--realm", REALM, "--allow-loopback-peers",
        "--cert", cert, "--pkey", key, "--state-dir", state, "--workers", str(workers),
        "--dataplane", dataplane, "--rfc5766-channels"],  # uclient's channel numbers (udp-spread)
        workdir, env, workers, logs_to_stdout=True)


class LoadGen:
    """bench/loadgen.c: `nconn` connections to the server, driven over a pipe."""

    def __init__(self, binary: str, transport: str, port: int, nconn: int, core: int):
        self.process = subprocess.Popen(["taskset", "-c", str(core), binary, transport, HOST,
                                         str(port), str(nconn)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        if self.process.stdout.readline() != b"ready\n":
            raise SystemExit("loadgen could not connect")

    def exchange(self, idx: int, msg: stun.Message, key: Optional[bytes] = None) -> stun.Message:
        data = msg.encode(key=key)
        self.process.stdin.write(b"X %d %d\n" % (idx, len(data)) + data)
        self.process.stdin.flush()
        size = int(self.process.stdout.readline())
        if not size:
            raise SystemExit(f"no answer to {msg.method:#x} on connection {idx}")
        return stun.parse(self.process.stdout.read(size))

    def template(self, idx: int, data: bytes) -> None:
        self.process.stdin.write(b"T %d %d\n" % (idx, len(data)) + data)
        self.process.stdin.flush()

    def run(self, rate: float, seconds: float, size: int) -> Tuple[int, int, int, int]:
        self.process.stdin.write(b"R %f %f %d\n" % (rate, seconds, size))
        self.process.stdin.flush()
        sent, received, p50, p99, _ = map(int, self.process.stdout.readline().split())
        return sent, received, p50, p99

    def start_cycles(self, clients: int, warmup: float, seconds: float) -> None:
        """Allocate+Refresh(0) cycles by `clients` at once, each cycle by a new client; returns
        once `warmup` seconds of them are over and the `seconds` counted begin."""
        key = stun.long_term_key(USER, REALM, PASSWORD)
        self.process.stdin.write(b"A %d %f %f %s %s %s\n" % (
            clients, warmup, seconds, key.hex().encode(), USER.encode(), REALM.encode()))
        self.process.stdin.flush()
        if self.process.stdout.readline() != b"W\n":
            raise SystemExit("loadgen's Allocate cycles did not start")

    def cycles_done(self) -> Tuple[int, int, float]:
        """Once the counted seconds are over: cycles done, error answers, seconds taken."""
        done, errors, elapsed_ns = map(int, self.process.stdout.readline().split())
        return done, errors, elapsed_ns / 1e9

    def close(self) -> None:
        self.process.stdin.write(b"Q\n")
        self.process.stdin.close()
        self.process.wait(timeout=10)


def authenticated(send: Callable[[stun.Message, Optional[bytes]], stun.Message], method: int,
                  attrs: List[Tuple[int, object]], nonce: List[str]) -> stun.Message:
    """A request with long-term credentials, answering a 401/438 challenge first."""
    key = stun.long_term_key(USER, REALM, PASSWORD)
    for _ in range(3):
        msg = stun.Message(method, stun.REQUEST)
        for attr_type, value in attrs:
            msg.add(attr_type, value)
        if nonce:
            msg.add(stun.USERNAME, USER).add(stun.REALM, REALM).add(stun.NONCE, nonce[0])
        reply = send(msg, key if nonce else None)
        if reply.cls == stun.ERROR and reply.get(stun.ERROR_CODE)[0] in (401, 438):
            nonce[:] = [reply.get(stun.NONCE)]
            continue
        if reply.cls != stun.SUCCESS:
            raise SystemExit(f"request {method:#x} failed: {reply.get(stun.ERROR_CODE)}")
        return reply
    raise SystemExit("credentials refused")


def set_up(gen: LoadGen, nconn: int, peer: Tuple[str, int], channel: bool,
           size: int) -> List[List[str]]:
    """Each connection's allocation, permission and channel; the nonce each was given."""
    nonces = []
    for idx in range(nconn):
        nonce: List[str] = []
        nonces.append(nonce)

        def send(msg, key, idx=idx):
            return gen.exchange(idx, msg, key)
        authenticated(send, stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, 17)], nonce)
        authenticated(send, stun.CREATE_PERMISSION, [(stun.XOR_PEER_ADDRESS, peer)], nonce)
        if channel:
            number = 0x4000 + idx
            authenticated(send, stun.CHANNEL_BIND, [(stun.CHANNEL_NUMBER, number),
                                                    (stun.XOR_PEER_ADDRESS, peer)], nonce)
            gen.template(idx, stun.CHANNEL_HEADER.pack(number, size))
        else:
            msg = stun.Message(stun.SEND, stun.INDICATION)
            msg.add(stun.XOR_PEER_ADDRESS, peer).add(stun.DATA, bytes(size))
            gen.template(idx, msg.encode()[:-size])
    return nonces


def tear_down(gen: LoadGen, nonces: List[List[str]]) -> None:
    """Delete the UDP allocations (Refresh 0): a later run's socket that the kernel gives the
    same port would otherwise find its 5-tuple taken (437)."""
    for idx, nonce in enumerate(nonces):
        authenticated(lambda msg, key, idx=idx: gen.exchange(idx, msg, key), stun.REFRESH,
                      [(stun.LIFETIME, 0)], nonce)


def relay_figures(server: Server, gen: LoadGen, args) -> Dict[str, float]:
    """CPU per packet at the fixed load, the highest loss-free load, RTT at half of it."""
    out: Dict[str, float] = {}
    gen.run(args.rate, 1.0, args.size)  # warm-up: caches, PyPy's JIT
    before = cpu_ns_by_process(server.pid)
    sent, received, _, _ = gen.run(args.rate, args.seconds, args.size)
    after = cpu_ns_by_process(server.pid)
    used = {pid: after[pid] - before.get(pid, 0) for pid in after}
    out["cpu_us"] = sum(used.values()) / 1000 / (sent + received)
    out["fixed_loss"] = 1 - received / sent
    workers = [ns for pid, ns in used.items() if pid != server.pid]
    if server.workers > 1 and len(workers) == server.workers:
        # How evenly the kernel spread the load: the busiest worker's CPU over the idlest's.
        out["worker_cpu_spread"] = max(workers) / max(min(workers), 1)

    def clean(rate: float) -> Tuple[bool, bool]:
        sent, received, _, _ = gen.run(rate, args.probe_seconds, args.size)
        saturated = sent < 0.97 * rate * args.probe_seconds
        return received >= (1 - LOSS_LIMIT) * sent, saturated
    good, bad, limited = 0.0, 0.0, False
    rate = args.rate
    while rate <= MAX_RATE:
        ok, saturated = clean(rate)
        if saturated:
            limited = ok
            if ok:
                good = rate
            else:
                bad = rate
            break
        if not ok:
            bad = rate
            break
        good, rate = rate, rate * 2
    if bad:
        for _ in range(args.bisect):
            mid = (good + bad) / 2 if good else bad / 2
            ok, _ = clean(mid)
            good, bad = (mid, bad) if ok else (good, mid)
    out["max_rate"] = good
    out["max_rate_limited"] = float(limited)
    # Each server's half max is a load of its own: a faster one is timed under more.  The
    # same load for all, too, where each of them is loss-free.
    for suffix, rate in (("", good / 2), ("_same", args.rtt_rate if args.rtt_rate <= good else 0)):
        if rate:
            _, received, p50, p99 = gen.run(rate, args.probe_seconds, args.size)
            if received:
                out["rtt_p50" + suffix], out["rtt_p99" + suffix] = p50, p99
    return out


class UdpClients:
    """Many UDP clients of one server, each with one request in flight and its own nonce.

    coturn ties a nonce to the client's 5-tuple and turnrelay's does not, so each client
    learns its own from its first 401 (or a later 438) and the request is sent again: a
    challenge is not an error.
    """

    def __init__(self, port: int, count: int):
        self.key = stun.long_term_key(USER, REALM, PASSWORD)
        self.port = port
        self.socks = [self.new_socket() for _ in range(count)]
        self.nonces: Dict[socket.socket, str] = {}
        self.in_flight: Dict[socket.socket, Tuple[int, bytes, bytes, float]] = {}
        self.errors = 0
        self.error_codes: Dict[Tuple[int, int], int] = {}

    def new_socket(self) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.connect((HOST, self.port))
        s.setblocking(False)
        return s

    def replace(self, s: socket.socket) -> socket.socket:
        """A new client in place of `s`, which is closed."""
        self.socks.remove(s)
        self.nonces.pop(s, None)
        s.close()
        s = self.new_socket()
        self.socks.append(s)
        return s

    def send(self, s: socket.socket, method: int) -> None:
        msg = stun.Message(method, stun.REQUEST)
        if method == stun.ALLOCATE:
            msg.add(stun.REQUESTED_TRANSPORT, 17)
        else:
            msg.add(stun.LIFETIME, 0)
        nonce = self.nonces.get(s)
        if nonce is not None:
            msg.add(stun.USERNAME, USER).add(stun.REALM, REALM).add(stun.NONCE, nonce)
        data = msg.encode(key=self.key if nonce is not None else None)
        self.in_flight[s] = (method, msg.transaction_id, data, time.monotonic())
        s.send(data)

    def answers(self, timeout: float):
        """(socket, method) for each success that arrives within `timeout`."""
        now = time.monotonic()
        for s, (method, tid, data, at) in list(self.in_flight.items()):
            if now - at > 1.0:  # UDP: retransmit
                s.send(data)
                self.in_flight[s] = (method, tid, data, now)
        for s in wait_readable(list(self.in_flight), timeout):
            try:
                reply = stun.parse(s.recv(2048))
            except (OSError, stun.StunDecodeError):
                continue
            method, tid = self.in_flight[s][:2]
            if reply.transaction_id != tid:
                continue
            del self.in_flight[s]
            if reply.cls == stun.SUCCESS:
                yield s, method
                continue
            code = reply.get(stun.ERROR_CODE)[0]
            self.error_codes[method, code] = self.error_codes.get((method, code), 0) + 1
            if code in (401, 438) and reply.has(stun.NONCE):
                self.nonces[s] = reply.get(stun.NONCE)
                self.send(s, method)
            elif code == 437 and method == stun.ALLOCATE:
                # The kernel gave this new client the port of one whose allocation the server
                # has not freed yet: take another.
                self.send(self.replace(s), stun.ALLOCATE)
            else:
                self.errors += 1
                self.send(s, method)

    def cycles(self, seconds: float, limit: Optional[int] = None) -> int:
        """Allocate+Refresh(0) cycles, each by a new client, for `seconds` or until `limit`
        cycles are done; how many were.  The clients' first Allocates must have been sent."""
        done = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end and (limit is None or done < limit):
            for s, method in self.answers(0.5):
                if method == stun.ALLOCATE:
                    self.send(s, stun.REFRESH)
                else:
                    done += 1
                    self.send(self.replace(s), stun.ALLOCATE)
        return done

    def close(self) -> None:
        for s in self.socks:
            s.close()


class BindingProbe:
    """Binding requests to the server, one every `GAP` seconds from a thread of this process,
    while the Allocate cycles run: the server's answer time to a request that waits for no
    login or database, so the stalls of its event loop (a long read, a collection) show."""

    GAP = 0.01
    TIMEOUT = 1.0  # a lost request counts as this long

    def __init__(self, port: int):
        self.port = port
        self.rtts: List[float] = []
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect((HOST, self.port))
            sock.settimeout(self.TIMEOUT)
            while self.running:
                request = stun.Message(stun.BINDING, stun.REQUEST)
                sent = time.perf_counter()
                sock.send(request.encode())
                rtt = self.TIMEOUT
                try:
                    while time.perf_counter() - sent < self.TIMEOUT:
                        if stun.parse(sock.recv(2048)).transaction_id == request.transaction_id:
                            rtt = time.perf_counter() - sent
                            break
                except socket.timeout:
                    pass
                self.rtts.append(rtt)
                time.sleep(self.GAP)

    def figures(self) -> Dict[str, float]:
        self.running = False
        self.thread.join()
        ms = sorted(1000 * rtt for rtt in self.rtts)
        return {"probe_p50_ms": ms[len(ms) // 2], "probe_p99_ms": ms[int(len(ms) * 0.99)],
                "probe_max_ms": ms[-1]}


def allocation_figures(server: Server, args) -> Dict[str, float]:
    """Allocate + Refresh(0) cycles over UDP, `args.alloc_clients` in flight at once, from
    bench/loadgen.c on `args.load_core` (C: the load costs a small part of the answers).

    Each cycle is a new client, as in real use: an Allocate challenged with 401, the Allocate
    again with credentials, then Refresh(0).  (Reusing the 5-tuple at once is not comparable:
    coturn answers 437 until its timer has freed the old allocation.)  The server's CPU counts
    all its processes: with `--workers`, the parent's too.
    """
    gen = LoadGen(build_loadgen(), "udp", server.port, 1, args.load_core)
    try:
        # The warm-up gives every client its nonce, and PyPy's JIT its traces.
        gen.start_cycles(args.alloc_clients, args.alloc_warmup, args.seconds)
        before, switches = cpu_ns(server.pid), context_switches(server.pid)
        ticks = user_system_ticks(server.pid)
        probe = BindingProbe(server.port)
        cycles, errors, elapsed = gen.cycles_done()
        used = cpu_ns(server.pid) - before
        switched = context_switches(server.pid) - switches
        user, system = (after - earlier
                        for after, earlier in zip(user_system_ticks(server.pid), ticks))
        probed = probe.figures()
    finally:
        gen.close()
    return {"allocs_per_s": cycles / elapsed, "alloc_cpu_us": used / 1000 / max(cycles, 1),
            "alloc_system_pct": 100 * system / max(user + system, 1),
            "alloc_switches": switched / max(cycles, 1), "alloc_errors": errors, **probed}


IDLE_SECONDS = 10.0  # one usage-ledger pass (every 10 s) falls within it


def idle_allocations(port: int, count: int, batches: List[UdpClients]) -> int:
    """`count` new clients each make an allocation and keep it (their sockets stay open, in
    `batches`, until the caller closes them); how many were made within 60 s."""
    clients = UdpClients(port, count)
    batches.append(clients)
    for s in clients.socks:
        clients.send(s, stun.ALLOCATE)
    made = 0
    deadline = time.monotonic() + 60
    while clients.in_flight and time.monotonic() < deadline:
        made += sum(1 for _ in clients.answers(1.0))
    return made


def memory_figure(server: Server, args) -> Dict[str, float]:
    """Resident memory per idle UDP allocation: the growth over `args.idle` allocations."""
    batches: List[UdpClients] = []
    idle_allocations(server.port, 200, batches)  # warm: the first ones grow pools and caches
    base = rss_kib(server.pid)
    made = sum(idle_allocations(server.port, 200, batches) for _ in range(args.idle // 200))
    grown = rss_kib(server.pid) - base
    before = cpu_ns(server.pid)
    time.sleep(IDLE_SECONDS)  # the window measured: nothing is sent
    idle_cpu = cpu_ns(server.pid) - before
    for clients in batches:
        clients.close()
    return {"rss_per_alloc_b": grown * 1024 / max(made, 1), "idle_made": made,
            "idle_cpu_pct": 100 * idle_cpu / (IDLE_SECONDS * 1e9)}


def spread_figures(server: Server, peer: Tuple[str, int], args) -> Dict[str, float]:
    """The udp-spread mode: the server's CPU per relayed packet, and the loss uclient saw."""
    argv = ["taskset", "-c", str(args.load_core), "turnutils_uclient", "-c", "-z", "5",
            "-n", str(SPREAD_MESSAGES), "-m", str(SPREAD_CLIENTS), "-l", str(args.size),
            "-p", str(server.port), "-u", USER, "-w", PASSWORD, "-e", peer[0], "-r", str(peer[1]),
            HOST]
    before = cpu_ns(server.pid)
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    used = cpu_ns(server.pid) - before
    output = result.stdout + result.stderr
    totals = re.findall(r"tot_send_msgs=(\d+), tot_recv_msgs=(\d+)", output)
    if not totals:
        raise SystemExit(f"uclient failed against {server.name}:\n{output[-2000:]}")
    sent, received = map(int, totals[-1])
    # Each message crosses the relay twice: to the peer and, echoed, back.
    return {"udp-spread cpu_us": used / 1000 / max(sent + received, 1),
            "udp-spread loss_pct": 100 * (1 - received / max(sent, 1))}


def measure(server: Server, loadgen: str, peer: Tuple[str, int], args) -> Dict[str, float]:
    figures: Dict[str, float] = {}
    server.start(server.cores or str(args.server_core))
    try:
        for mode in args.modes:
            if mode == "udp-spread":
                figures.update(spread_figures(server, peer, args))
                continue
            transport, kind = mode.split("-")
            port = server.tls_port if transport == "tls" else server.port
            gen = LoadGen(loadgen, transport, port, args.allocations, args.load_core)
            try:
                nonces = set_up(gen, args.allocations, peer, kind == "channel", args.size)
                for name, value in relay_figures(server, gen, args).items():
                    figures[f"{mode} {name}"] = value
                if transport == "udp":
                    tear_down(gen, nonces)
            finally:
                gen.close()
        if not args.no_alloc:
            figures.update(allocation_figures(server, args))
    finally:
        server.stop()
    if not args.no_alloc and args.idle:
        server.start(server.cores or str(args.server_core))
        try:
            figures.update(memory_figure(server, args))
        finally:
            server.stop()
    return figures


def build_loadgen() -> str:
    os.makedirs(CACHE, exist_ok=True)
    source = os.path.join(ROOT, "bench", "loadgen.c")
    binary = os.path.join(CACHE, "loadgen")
    if not os.path.exists(binary) or os.path.getmtime(binary) < os.path.getmtime(source):
        subprocess.run(["gcc", "-O2", "-Wall", "-o", binary, source, "-lssl", "-lcrypto"],
                       check=True)
    return binary


def self_signed_cert(workdir: str) -> Tuple[str, str]:
    cert, key = os.path.join(workdir, "cert.pem"), os.path.join(workdir, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj",
                    "/CN=localhost", "-keyout", key, "-out", cert], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return cert, key


ROWS = [
    ("cpu_us", "CPU us/relayed packet @ {rate} rt/s", "{:.2f}"),
    ("max_rate", "max round trips/s, <0.1% loss", "{:.0f}"),
    ("rtt_p50", "RTT p50 us @ half max", "{:.0f}"),
    ("rtt_p99", "RTT p99 us @ half max", "{:.0f}"),
    ("rtt_p50_same", "RTT p50 us @ {rtt_rate:.0f} rt/s", "{:.0f}"),
    ("rtt_p99_same", "RTT p99 us @ {rtt_rate:.0f} rt/s", "{:.0f}"),
    ("worker_cpu_spread", "busiest/idlest worker's CPU (--workers)", "{:.2f}"),
]


def table(results: Dict[str, List[Dict[str, float]]], args) -> str:
    names = list(results)
    widths = [max(19, len(n) + 2) for n in names]
    ratio_names = [n.replace("turnrelay ", "") + "/" + names[0] for n in names[1:]]
    ratio_widths = [max(16, len(n) + 2) for n in ratio_names]
    lines = [f"{'':44}" + "".join(f"{n:>{w}}" for n, w in zip(names, widths))
             + "".join(f"{n:>{w}}" for n, w in zip(ratio_names, ratio_widths))]

    def median(name: str, key: str) -> Optional[float]:
        values = [r[key] for r in results[name] if key in r]
        return statistics.median(values) if values else None

    def row(label: str, key: str, fmt: str) -> None:
        values = [median(n, key) for n in names]
        cells = []
        for n, v, w in zip(names, values, widths):
            text = "-" if v is None else fmt.format(v)
            if key.endswith("max_rate") and median(n, key + "_limited"):
                text = ">=" + text
            cells.append(f"{text:>{w}}")
        ratios = [f"{(v / values[0]) if v is not None and values[0] else float('nan'):>{w}.2f}"
                  for v, w in zip(values[1:], ratio_widths)]
        lines.append(f"{label:44}" + "".join(cells) + "".join(ratios))

    for mode in args.modes:
        if mode == "udp-spread":
            row(f"{mode}: CPU us/relayed packet, {SPREAD_CLIENTS} uclient x 200/s", f"{mode} cpu_us",
                "{:.2f}")
            row(f"{mode}: messages lost, %", f"{mode} loss_pct", "{:.2f}")
            continue
        for key, label, fmt in ROWS:
            row(f"{mode}: {label.format(rate=args.rate, rtt_rate=args.rtt_rate)}",
                f"{mode} {key}", fmt)
    if not args.no_alloc:
        row("Allocate+Refresh(0) cycles/s (UDP)", "allocs_per_s", "{:.0f}")
        row("CPU us per Allocate+Refresh(0) cycle", "alloc_cpu_us", "{:.0f}")
        row("  of which system time (the kernel's), %", "alloc_system_pct", "{:.0f}")
        row("context switches per cycle", "alloc_switches", "{:.2f}")
        row("meanwhile, Binding answered in p50 ms", "probe_p50_ms", "{:.2f}")
        row("  p99 ms", "probe_p99_ms", "{:.2f}")
        row("  longest, ms", "probe_max_ms", "{:.1f}")
        if args.idle:
            row(f"RSS bytes per idle allocation ({args.idle})", "rss_per_alloc_b", "{:.0f}")
            row(f"CPU % of a core, {args.idle} idle allocations", "idle_cpu_pct", "{:.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=float, default=10000,
                        help="the fixed offered load, round trips a second (default 10000)")
    parser.add_argument("--seconds", type=float, default=5.0, help="fixed-load run length")
    parser.add_argument("--probe-seconds", type=float, default=2.0)
    parser.add_argument("--rtt-rate", type=float, default=80000,
                        help="a load at which every server's RTT is timed, round trips a second, "
                             "beside each one's half max (default 80000: half of coturn's "
                             "highest loss-free load on the project machine)")
    parser.add_argument("--bisect", type=int, default=2, help="bisection steps for the max load")
    parser.add_argument("--size", type=int, default=100, help="payload bytes (default 100)")
    parser.add_argument("--allocations", type=int, default=8, help="allocations carrying the load")
    parser.add_argument("--alloc-clients", type=int, default=16)
    parser.add_argument("--alloc-warmup", type=float, default=1.0,
                        help="seconds of Allocate cycles before the measured ones (PyPy's JIT "
                             "needs 20 or so)")
    parser.add_argument("--idle", type=int, default=10000, help="idle allocations for RSS; 0: skip")
    parser.add_argument("--no-alloc", action="store_true", help="skip the allocation figures")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--cpython", default=None, metavar="TWISTD",
                        help="twistd of the CPython environment turnrelay runs in (default: a "
                             "venv of /usr/bin/python3, made once, as users run it)")
    parser.add_argument("--pypy", default=PYPY_TWISTD,
                        help="twistd of a PyPy environment with turnrelay's dependencies")
    parser.add_argument("--no-coturn", action="store_true")
    parser.add_argument("--no-pion", action="store_true")
    parser.add_argument("--server-core", type=int, default=1)
    parser.add_argument("--load-core", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1,
                        help="also run turnrelay (CPython) with this many --workers, to compare "
                             "CPU per packet and see the load's spread")
    parser.add_argument("--dataplane", nargs="+", default=["python", "native"],
                        choices=["python", "native"],
                        help="turnrelay's data planes to run (CPython, and the --workers run; "
                             "PyPy runs the last one)")
    parser.add_argument("--workers-cores", default=None,
                        help="taskset CPU list for the --workers run, e.g. 0,1 [default: "
                             "--server-core]")
    args = parser.parse_args()
    if args.seconds > 60 or args.probe_seconds > 60 or args.rounds > 20 or args.idle > 15000 \
            or args.alloc_warmup > 60:
        parser.error("runs are bounded: --seconds/--probe-seconds/--alloc-warmup <= 60, "
                     "--rounds <= 20, --idle <= 15000")
    with open("/proc/loadavg") as f:
        load_before = " ".join(f.read().split()[:3])
    os.sched_setaffinity(0, {args.load_core})
    loadgen = build_loadgen()
    workdir = tempfile.mkdtemp(prefix="turnrelay-bench-")
    cert, key = self_signed_cert(workdir)
    servers = [] if args.no_coturn else [coturn(workdir, cert, key)]
    pion_binary = None if args.no_pion else build_pion()
    if pion_binary:
        servers.append(pion(pion_binary, workdir, cert, key))
    cpython = args.cpython or system_cpython()
    runs_on = interpreter(cpython)
    for dataplane in args.dataplane:
        suffix = " native" if dataplane == "native" else ""
        servers.append(turnrelay("turnrelay CPython" + suffix, cpython, workdir, cert, key,
                                 dataplane=dataplane))
        if args.workers > 1:
            servers.append(turnrelay(f"turnrelay CPython x{args.workers}" + suffix, cpython,
                                     workdir, cert, key, args.workers, dataplane))
            servers[-1].cores = args.workers_cores
    if args.pypy and os.path.exists(args.pypy):
        suffix = " native" if args.dataplane[-1] == "native" else ""
        servers.append(turnrelay("turnrelay PyPy" + suffix, args.pypy, workdir, cert, key,
                                 dataplane=args.dataplane[-1]))
    else:
        print(f"no PyPy twistd at {args.pypy}: PyPy skipped", file=sys.stderr)
    results: Dict[str, List[Dict[str, float]]] = {s.name: [] for s in servers}
    # The echo peer inherits this process's core, the load core.
    with running_echo_peer(HOST) as peer:
        for round_no in range(args.rounds):
            for server in servers:
                figures = measure(server, loadgen, peer, args)
                results[server.name].append(figures)
                print(f"round {round_no + 1} {server.name}: "
                      + ", ".join(f"{k}={v:.4g}" for k, v in figures.items()), file=sys.stderr)
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print(f"{args.rounds} rounds, {args.size}-byte payloads, {args.allocations} allocations, "
          f"server on core {args.server_core}, load on core {args.load_core}; "
          f"loadavg {load_before} before, {' '.join(load)} after; turnrelay CPython is {runs_on}")
    print(table(results, args))
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
