"""`--workers N`: one relay served by N processes sharing its ports (relay.service.workers).

Each test runs the real `twistd turnrelay --workers 2` and talks to it over real sockets.  A
worker is told apart by its relay ports: worker i holds the i-th slice of --min-port..--max-port.
"""
from __future__ import annotations

import os
import re
import select
import signal
import sqlite3
import subprocess
import time
import urllib.request
from typing import Dict, List, Tuple

import pytest
from prometheus_client.parser import text_string_to_metric_families

from relay.proto import stun
from relay.service.build import relay_port_slice
from relay.service.host import usable_cpus
from relay.service.options import Options
from relay.service.quota_book import GRANTED, Place, QuotaBook
from support.relay_clients import burst, counters, udp_socket
from support.servers import PASSWORD, REALM, RELAY_PORTS, TWISTD, USER, free_port, running_echo_peer
from support.wire_client import WireClient, error_code

UDP = (stun.REQUESTED_TRANSPORT, 17)
WORKERS = 2
CLIENTS = 16  # all on one worker by chance: 2 ** -15


def worker_of(relay_port: int) -> int:
    for index in range(WORKERS):
        low, high = relay_port_slice(*RELAY_PORTS, index, WORKERS)
        if low <= relay_port <= high:
            return index
    raise AssertionError(f"relay port {relay_port} is in no worker's slice")


def start_workers(server_factory, *extra: str):
    server = server_factory("--workers", str(WORKERS), *extra)
    server.read_until(f"all {WORKERS} workers ready")
    return server


def allocate_with(server, nonce: str) -> Tuple[object, stun.Message]:
    """An Allocate from a fresh client port, signed with a nonce another client was given:
    a worker that did not issue it must accept it (no 438)."""
    client = WireClient((server.host, server.port), USER, PASSWORD, REALM)
    client.nonce = nonce
    msg = stun.Message(stun.ALLOCATE, stun.REQUEST).add(*UDP)
    msg.add(stun.USERNAME, USER).add(stun.REALM, REALM).add(stun.NONCE, nonce)
    return client, client.exchange(msg, stun.long_term_key(USER, REALM, PASSWORD))


def allocations(server, count: int) -> List[Tuple[object, int]]:
    """`count` allocations, each from its own client port: (client, relay port)."""
    first = WireClient((server.host, server.port), USER, PASSWORD, REALM)
    reply = first.request(stun.ALLOCATE, UDP)
    assert reply.cls == stun.SUCCESS, reply.get(stun.ERROR_CODE)
    made = [(first, reply.get(stun.XOR_RELAYED_ADDRESS)[1])]
    for _ in range(count - 1):
        client, reply = allocate_with(server, first.nonce)
        assert reply.cls == stun.SUCCESS, reply.get(stun.ERROR_CODE)
        made.append((client, reply.get(stun.XOR_RELAYED_ADDRESS)[1]))
    return made


def relays_through(client, peer: Tuple[str, int]) -> bool:
    assert client.request(stun.CREATE_PERMISSION, (stun.XOR_PEER_ADDRESS, peer)).cls == stun.SUCCESS
    client.send_indication(peer, b"through a worker")
    return client.receive_data() == (peer, b"through a worker")


def scrape(port: int) -> Dict[Tuple[str, str], float]:
    """/metrics: open allocations by worker, summed over their other labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    found: Dict[Tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "turnrelay_allocations":
                key = (sample.name, sample.labels["worker"])
                found[key] = found.get(key, 0) + sample.value
    return found


def test_workers_share_the_ports_the_nonces_and_the_quotas(server_factory):
    metrics = free_port()
    server = start_workers(server_factory, "--user-quota", str(CLIENTS), "--prometheus",
                           "--prometheus-port", str(metrics))
    made = allocations(server, CLIENTS)
    by_worker = {worker_of(port) for _, port in made}
    assert by_worker == {0, 1}, "the kernel spread the clients over both workers"
    with running_echo_peer() as peer:
        for index in (0, 1):
            client = next(c for c, port in made if worker_of(port) == index)
            assert relays_through(client, peer)
    assert scrape(metrics) == {
        ("turnrelay_allocations", str(index)): sum(worker_of(p) == index for _, p in made)
        for index in (0, 1)}
    # The user has CLIENTS allocations on two workers, fewer on each than --user-quota: only
    # the parent's count refuses one more, whichever worker it reaches.
    for _ in range(4):
        _, reply = allocate_with(server, made[0][0].nonce)
        assert error_code(reply) == 486
    freed = made[0][0].request(stun.REFRESH, (stun.LIFETIME, 0))
    assert freed.cls == stun.SUCCESS
    _, reply = allocate_with(server, made[0][0].nonce)
    assert reply.cls == stun.SUCCESS, reply.get(stun.ERROR_CODE)


@pytest.mark.parametrize("number, name", [(signal.SIGKILL, "SIGKILL"),
                                          (signal.SIGRTMIN + 6, f"signal {signal.SIGRTMIN + 6}")])
def test_a_killed_worker_is_restarted_on_the_same_sockets(server_factory, number, name):
    server = start_workers(server_factory)
    pid = int(server.search(r"worker 1 started, pid (\d+)").group(1))
    os.kill(pid, number)
    server.search(rf"worker 1 \(pid {pid}\) died after [\d.]+ s: killed by {name}; "
                  "restarting it in")
    new_pid = int(server.search(rf"worker 1 started, pid (?!{pid}\b)(\d+)").group(1))
    server.read_until(f"worker 1 (pid {new_pid}) ready")
    # Flows hashed to the dead worker's socket reach its successor: every client gets an
    # allocation, on both workers.
    made = allocations(server, CLIENTS)
    assert {worker_of(port) for _, port in made} == {0, 1}


def test_signals_reach_every_worker_and_no_usage_is_lost(server_factory, tmp_path):
    ledger = tmp_path / "usage.db"
    server = start_workers(server_factory, "--accounting", f"sqlite:path={ledger}",
                           "--drain-grace", "30")
    made = allocations(server, 8)
    # The kernel's hash may put the first few on one worker: more until each holds one.
    while len({worker_of(port) for _, port in made}) < WORKERS and len(made) < 64:
        client, reply = allocate_with(server, made[0][0].nonce)
        assert reply.cls == stun.SUCCESS, reply.get(stun.ERROR_CODE)
        made.append((client, reply.get(stun.XOR_RELAYED_ADDRESS)[1]))
    server.process.send_signal(signal.SIGHUP)
    for index in range(WORKERS):
        server.read_until(f"[worker {index}] peer rules reloaded")
    server.process.send_signal(signal.SIGTERM)
    for index in range(WORKERS):
        server.read_until(f"[worker {index}] draining: new allocations refused")
    # A second SIGTERM ends the 30 s drain at once, in every worker.
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=30) == 0
    log = server.stop()
    assert log.count("drain grace over: ending") == WORKERS, log
    with sqlite3.connect(ledger) as db:
        sessions = db.execute("SELECT relay_addresses, end_reason FROM sessions").fetchall()
    # Both workers wrote their sessions, each ended and recorded before its process exited.
    assert sorted(int(relay.rsplit(":", 1)[1]) for relay, _ in sessions) \
        == sorted(port for _, port in made)
    assert {reason for _, reason in sessions} == {"shutdown"}


def test_too_many_workers_for_the_relay_ports_is_a_config_error(server_factory):
    result = subprocess.run([TWISTD, "-n", "turnrelay", "--workers", "3", "--min-port", "50000",
                             "--max-port", "50001"], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert re.search(r"--workers: 3 workers cannot each have a share of the relay ports "
                     r"50000-50001", result.stderr + result.stdout)


def test_relay_port_slices_cover_the_range_without_overlap():
    slices = [relay_port_slice(49152, 65535, index, 3) for index in range(3)]
    assert slices[0][0] == 49152 and slices[-1][1] == 65535
    assert all(a[1] + 1 == b[0] for a, b in zip(slices, slices[1:]))


@pytest.mark.parametrize("cgroup, files, cpus", [
    ("0::/pods/relay\n", {"pods/relay/cpu.max": "200000 100000"}, 2),
    ("0::/pods/relay\n", {"pods/relay/cpu.max": "150000 100000"}, 2),     # 1.5: rounds up
    ("0::/pods/relay\n", {"pods/relay/cpu.max": "max 100000",               # the parent's
                          "pods/cpu.max": "50000 100000"}, 1),
    ("0::/\n", {"cpu.max": "max 100000"}, None),                            # no limit
    ("4:cpu,cpuacct:/docker/abc\n", {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "100000",
                                     "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000"}, 1),
    ("4:cpu,cpuacct:/docker/abc\n", {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "-1",
                                     "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000"}, None),
])
def test_default_workers_follow_the_cgroup_cpu_limit(tmp_path, cgroup, files, cpus):
    (tmp_path / "cgroup").write_text(cgroup)
    for name, text in files.items():
        (tmp_path / "fs" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "fs" / name).write_text(text + "\n")
    affinity = len(os.sched_getaffinity(0))
    found = usable_cpus(str(tmp_path / "cgroup"), str(tmp_path / "fs"))
    assert found == (affinity if cpus is None else min(affinity, cpus))
    assert usable_cpus(str(tmp_path / "absent"), str(tmp_path / "fs")) == affinity


def test_quota_book_counts_every_worker():
    book = QuotaBook(total=4, per_user=2, per_source=0)
    alice, bob = Place("alice", "acme", "192.0.2.1"), Place("bob", "acme", "192.0.2.2")
    assert book.reserve(0, 1, alice, 0) == GRANTED
    assert book.reserve(1, 1, alice, 0) == GRANTED     # the same number, another worker
    assert book.reserve(1, 2, alice, 0) == 486         # --user-quota 2, over both workers
    assert book.reserve(0, 2, bob, 3) == GRANTED
    assert book.reserve(1, 3, bob, 3) == 486           # account acme: at most 3
    book.release(0, 1)
    assert book.reserve(1, 3, bob, 3) == GRANTED
    assert book.reserve(0, 3, Place("dave", "other", "192.0.2.4"), 0) == GRANTED
    assert book.reserve(0, 4, Place("carol", "other", "192.0.2.3"), 0) == 508  # --total-quota
    assert (book.share("acme", 0), book.share("acme", 1)) == pytest.approx((1 / 3, 2 / 3))
    assert book.forget(1) == {"acme"}                  # worker 1 died: its places go with it
    assert sorted(book.places) == [(0, 2), (0, 3)]
    assert (book.share("acme", 0), book.share("acme", 1)) == (1.0, 0.0)
    assert book.counts == {("user", "bob"): 1, ("account", "acme"): 1, ("source", "192.0.2.2"): 1,
                           ("account", "acme", 0): 1, ("user", "dave"): 1, ("account", "other"): 1,
                           ("source", "192.0.2.4"): 1, ("account", "other", 0): 1}


def test_workers_get_pypys_collector_settings_unless_the_relay_has_its_own(server_factory,
                                                                         monkeypatch):
    """A worker on PyPy runs a 16 MB nursery and 2 MB marking steps (relay.service.runtime
    .PYPY_GC); a value in the relay's own environment is the operator's, and wins."""
    monkeypatch.setenv("PYPY_GC_NURSERY", "8MB")
    server = start_workers(server_factory)
    for index in range(WORKERS):
        pid = int(server.search(rf"worker {index} started, pid (\d+)").group(1))
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
        assert environ[b"PYPY_GC_NURSERY"] == b"8MB"
        assert environ[b"PYPY_GC_INCREMENT_STEP"] == b"2MB"


def test_workers_stop_when_their_parent_is_killed(server_factory):
    """No relay runs on unsupervised, holding its ports, after its parent is gone."""
    server = start_workers(server_factory)
    pids = [int(server.search(rf"worker {index} started, pid (\d+)").group(1))
            for index in range(WORKERS)]
    # A pidfd turns readable when its process ends: a wait on the event, not a poll.
    pidfds = [os.pidfd_open(pid) for pid in pids]
    try:
        server.process.send_signal(signal.SIGKILL)
        for pidfd in pidfds:
            assert select.select([pidfd], [], [], 30)[0] == [pidfd], "a worker outlived its parent"
    finally:
        for pidfd in pidfds:
            os.close(pidfd)
    # Each worker says why it stopped: it writes to the relay's log stream itself, with no
    # parent left to pass its lines on.
    log = server.stop()
    for index in range(WORKERS):
        assert f"[turnrelay#warn] [worker {index}] the parent process is gone: stopping\n" in log


def test_a_stop_signals_the_drained_workers_once_and_each_stops_cleanly(server_factory):
    """The first worker to end must not get the others a second SIGTERM: past their own
    handler by then, they would be killed by it, an error line in every other stop."""
    server = start_workers(server_factory, "--drain-grace", "20")  # drained at once: none held
    log = server.stop()
    assert log.count("every worker drained: stopping them") == 1, log
    for index in range(WORKERS):
        assert f"[turnrelay#info] worker {index} stopped\n" in log, log
    assert "#error]" not in log, log


def test_the_default_number_of_workers_never_exceeds_the_relay_ports():
    options = Options()
    options.parseOptions(["--min-port", "50000", "--max-port", "50000", "--no-tls"])
    assert options["workers"] == 1
    options = Options()
    options.parseOptions(["--no-tls"])
    assert options["workers"] == usable_cpus()


def test_an_accounts_rate_limit_is_shared_by_its_allocations_on_every_worker(server_factory):
    """--account-max-pps 10 bounds the account's allocations together, wherever they are: each
    worker relays its share (its part of the account's allocations), not 10 a second each."""
    server = start_workers(server_factory, "--account-max-pps", "10")
    made = allocations(server, CLIENTS)
    assert {worker_of(port) for _, port in made} == {0, 1}
    with udp_socket("127.0.0.1") as sink:
        peer = sink.getsockname()[:2]
        for client, _ in made:
            assert client.request(stun.CREATE_PERMISSION, (stun.XOR_PEER_ADDRESS, peer)).cls \
                == stun.SUCCESS
        # A steady 160 packets a second for 3 s, spread over every allocation: pacing, not a
        # wait for an event.
        for _ in range(30):
            for client, _ in made:
                burst(client, peer, 1, 10)
            time.sleep(0.1)
        results = [counters(server, client) for client, _ in made]
    assert all(relayed + limited == 30 for relayed, limited in results), results
    relayed = sum(relayed for relayed, _ in results)
    # 3 s at 10 a second spans 3 or 4 refills (plus rounding each worker's share up): 30-44.
    # Two workers each allowing 10 a second would have relayed 60 or more.
    assert 25 <= relayed <= 50, relayed


def test_workers_never_relay_to_the_parents_own_http_ports(server_factory):
    """The parent's HTTP listeners (here the metrics; the tokens API is the same) are the
    relay's own endpoints in every worker too."""
    metrics = free_port()
    server = start_workers(server_factory, "--prometheus", "--prometheus-port", str(metrics))
    for client, _ in allocations(server, 6):  # on both workers, most likely
        for port in (metrics, server.port):
            reply = client.request(stun.CREATE_PERMISSION, (stun.XOR_PEER_ADDRESS,
                                                            ("127.0.0.1", port)))
            assert error_code(reply) == 403, port


def test_a_second_relay_on_the_same_ports_is_refused(server_factory):
    first = start_workers(server_factory)
    result = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "turnrelay", "--workers", "2", "--listening-ip", "127.0.0.1",
         "--listening-port", str(first.port), "--no-tls", "--relay-ip", "127.0.0.1"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert f"cannot listen on udp [127.0.0.1]:{first.port}: Address already in use" \
        in result.stderr + result.stdout


def test_a_json_lines_ledger_needs_a_single_process(tmp_path):
    result = subprocess.run([TWISTD, "-n", "turnrelay", "--workers", "2", "--accounting",
                             f"jsonl:path={tmp_path / 'u.jsonl'}"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "--accounting: jsonl:path=" in result.stderr
    assert "a JSON lines file takes one process's records: add --workers 1" in result.stderr


LINE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[turnrelay#info\] \[worker ([01])\] "
                  r"allocation (opened|closed) user=\S+ .*session=(\S+)\n")


def test_every_workers_allocation_lines_reach_the_log_once_and_whole(server_factory):
    """Both workers' lines, written by many allocations made and freed in a row, each in the
    parent's log once, whole and with its timestamp (relay.service.logtext formats them)."""
    server = start_workers(server_factory)
    made = allocations(server, 200)
    for client, _ in made:
        assert client.request(stun.REFRESH, (stun.LIFETIME, 0)).cls == stun.SUCCESS
    log = server.stop()  # the parent reads its workers' output to its end before it exits
    mentions = [line for line in log.splitlines(keepends=True)
                if re.search(r"allocation (opened|closed)", line)]
    matched = [LINE.fullmatch(line) for line in mentions]
    assert all(matched), [line for line, m in zip(mentions, matched) if not m][:3]
    by_event: Dict[str, List[str]] = {"opened": [], "closed": []}
    for m in matched:
        by_event[m.group(2)].append(m.group(3))
    assert len(by_event["opened"]) == len(set(by_event["opened"])) == 200
    assert sorted(by_event["closed"]) == sorted(by_event["opened"])
    assert {m.group(1) for m in matched} == {"0", "1"}
