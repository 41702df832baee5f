"""The usage ledger of a real turnrelay, read straight from its SQLite file, JSON lines file or
PostgreSQL database: exact over every transport with aioice and coturn's uclient, bounded loss
on SIGKILL, nothing lost nor counted twice across a PostgreSQL outage, third-party backends.

Every wait is on a log line, or, where only the database can tell (a periodic reading reached
it), on the database itself, polled against a deadline.
"""
import json
import subprocess
import textwrap
from typing import Dict

import pytest

from support.accounting import (
    INTERVAL,
    REGION,
    HeldSession,
    Usage,
    echoed,
    eventually,
    session_closed,
    sql_usage,
)
from support.aioice_client import relay_round_trips
from support.db import raw_rows
from support.postgres import fresh_schema, throwaway_cluster
from support.servers import PASSWORD, TWISTD, USER, running_echo_peer, tool

UCLIENT_MESSAGES, UCLIENT_LENGTH = 10, 120
def jsonl_usage(path) -> Dict[str, Usage]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    accounts = {r["session_id"]: (r["account_id"], r["region"])
                for r in records if r["type"] == "session"}
    usage: Dict[str, Usage] = {}
    for r in records:
        if r["type"] == "usage":
            account, region = accounts[r["session_id"]]
            _, *sums = usage.get(account, (region, 0, 0, 0, 0))
            usage[account] = (region, *(s + r[k] for s, k in zip(sums, (
                "bytes_from_client", "packets_from_client", "bytes_to_client",
                "packets_to_client"))))
    return usage


def uclient(server, peer, user: str, *flags: str) -> subprocess.Popen:
    """coturn's client, one allocation (-c: no RTCP pair) relaying 10 messages of 120 bytes."""
    port = server.tls_port if "-S" in flags else server.port
    return subprocess.Popen(
        [tool("turnutils_uclient"), "-c", *flags, "-p", str(port), "-u", user, "-w", PASSWORD,
         "-e", peer[0], "-r", str(peer[1]), "-n", str(UCLIENT_MESSAGES), "-m", "1",
         "-l", str(UCLIENT_LENGTH), server.host],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize("kind", ["sqlite", "sqlite+jsonl", "postgresql"])
def test_the_ledger_has_exactly_what_was_relayed(kind, server_factory, tmp_path, request):
    lines = tmp_path / "usage.jsonl"
    if kind == "postgresql":
        dsn = fresh_schema(request.getfixturevalue("postgres_dsn"))
        accounting = ["--accounting", f"postgresql:dsn={dsn}"]
    else:
        dsn = f"sqlite:///{tmp_path / 'usage.db'}"
        accounting = ["--accounting", f"sqlite:path={tmp_path / 'usage.db'}"]
    if "jsonl" in kind:
        # A JSON lines file takes one process's records: the relay refuses it with workers.
        accounting += ["--accounting", f"jsonl:path={lines}", "--workers", "1"]
    backends = kind.split("+")
    users = ["aioice-udp", "aioice-tcp", "uclient-udp", "uclient-tcp", "uclient-tls"]
    # --rfc5766-channels: uclient picks channel numbers in RFC 5766's range.
    server = server_factory(*accounting, *INTERVAL, "--region", REGION, "--rfc5766-channels",
                            users=[(user, PASSWORD) for user in users])
    expected: Dict[str, Usage] = {}

    payloads = [b"datagram %03d " % i * (i + 1) for i in range(20)]
    relay_round_trips(server, "aioice-udp", PASSWORD, payloads, "udp")
    expected["aioice-udp"] = echoed(payloads)
    # Its session is recorded when it ends, while the relay runs on.
    session = session_closed(server, "aioice-udp")
    for backend in backends:
        server.usage_recorded(session, backend)
    assert sql_usage(dsn) == expected

    relay_round_trips(server, "aioice-tcp", PASSWORD, payloads[:7], "tcp")
    expected["aioice-tcp"] = echoed(payloads[:7])
    with running_echo_peer() as peer:
        clients = [uclient(server, peer, "uclient-udp"), uclient(server, peer, "uclient-tcp", "-t"),
                   uclient(server, peer, "uclient-tls", "-t", "-S")]
        for client in clients:
            output, _ = client.communicate(timeout=60)
            sent = f"tot_send_msgs={UCLIENT_MESSAGES}, tot_recv_msgs={UCLIENT_MESSAGES}"
            assert sent in output, output
    for user in users[2:]:
        expected[user] = echoed([b"x" * UCLIENT_LENGTH] * UCLIENT_MESSAGES)
    server.stop()  # SIGTERM: every session ends ("shutdown" for those still open), all written

    assert sql_usage(dsn) == expected
    if "jsonl" in backends:
        assert jsonl_usage(lines) == expected
    sessions = raw_rows(dsn, "SELECT account_id, transport, end_reason FROM sessions")
    assert {(account, transport) for account, transport, _ in sessions} >= {
        (user, user.split("-")[1]) for user in users}
    assert all(reason in ("deleted", "disconnected", "shutdown") for _, _, reason in sessions)


def test_a_sigkill_loses_at_most_the_last_interval(server_factory, tmp_path):
    """On the embedded default ledger: usage.db in --state-dir."""
    dsn = f"sqlite:///{tmp_path / 'state' / 'usage.db'}"
    server = server_factory(*INTERVAL, "--region", REGION, tcp=False, tls=False)
    server.read_until("usage backend sqlite ready")  # the schema is there to be read
    session = HeldSession(server)
    first = session.relay(5, 300)
    eventually(lambda: sql_usage(dsn).get(USER), first)
    everything = session.relay(5, 200)
    server.kill()  # parent and workers at once, as a crash or a pod's SIGKILL
    session.close()
    recorded = sql_usage(dsn)[USER]
    assert all(low <= value <= high for low, value, high in zip(first[1:], recorded[1:],
                                                                  everything[1:])), recorded
    assert raw_rows(dsn, "SELECT end_reason FROM sessions") == [(None,)]

    server = server_factory(*INTERVAL, "--region", REGION, tcp=False, tls=False)
    relay_round_trips(server, USER, PASSWORD, [b"after the restart"])
    server.stop()
    after = echoed([b"after the restart"])
    assert sql_usage(dsn)[USER] == (REGION, *(a + b for a, b in zip(recorded[1:], after[1:])))
    assert len(raw_rows(dsn, "SELECT * FROM schema_version")) == 2  # migrations 1 and 2, once


def test_a_postgresql_outage_loses_nothing_and_counts_nothing_twice(server_factory):
    with throwaway_cluster() as cluster:  # its own server, to stop and start again
        server = server_factory("--accounting", f"postgresql:dsn={cluster.dsn}", *INTERVAL,
                                "--region", REGION, tcp=False, tls=False)
        server.read_until("usage backend postgresql ready")
        session = HeldSession(server)
        before = session.relay(4, 250)
        eventually(lambda: sql_usage(cluster.dsn).get(USER), before)
        cluster.stop()
        session.relay(4, 250)
        server.read_until("usage backend postgresql failed")
        session.relay(4, 250)
        cluster.start()
        session.delete()
        session.close()
        server.usage_recorded(session_closed(server, USER), "postgresql", timeout=30)
        server.read_until("usage backend postgresql writes again")
        server.stop()
        assert sql_usage(cluster.dsn) == {USER: echoed(session.payloads)}
        seqs = [seq for seq, in raw_rows(cluster.dsn, "SELECT seq FROM usage_deltas ORDER BY seq")]
        assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) >= 3


PLUGIN = '''
import json

from twisted.internet import defer
from twisted.plugin import IPlugin
from zope.interface import implementer

from relay.ledger.records import IUsageBackend, IUsageBackendFactory, as_dict


@implementer(IUsageBackend)
class Collector:
    def __init__(self, path):
        self.path = path

    def write(self, records):
        with open(self.path, "a") as f:
            f.writelines(json.dumps(as_dict(record)) + "\\n" for record in records)
        return defer.succeed(None)

    def close(self):
        return defer.succeed(None)


@implementer(IUsageBackendFactory, IPlugin)
class CollectorFactory:
    name = "collect"
    help = "Records as JSON, a third party's way."
    argStringFormat = "PATH"

    def make(self, argstring):
        return Collector(argstring)


collect = CollectorFactory()
'''


def test_a_third_party_backend_from_its_own_directory(server_factory, tmp_path, monkeypatch):
    plugins = tmp_path / "thirdparty" / "twisted" / "plugins"
    plugins.mkdir(parents=True)
    (plugins / "collect_usage.py").write_text(textwrap.dedent(PLUGIN))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "thirdparty"))
    listing = subprocess.run([TWISTD, "-n", "turnrelay", "--help-accounting"],
                             capture_output=True, text=True, timeout=60).stdout
    assert "\n  collect:PATH\n" in listing and "\n  sqlite:path=PATH\n" in listing
    collected = tmp_path / "collected.jsonl"
    server = server_factory("--accounting", f"collect:{collected}", "--region", REGION,
                            tcp=False, tls=False)
    payloads = [b"to a third party's ledger", b"and back"]
    relay_round_trips(server, USER, PASSWORD, payloads)
    server.stop()
    assert jsonl_usage(collected) == {USER: echoed(payloads)}
    assert [json.loads(line)["type"] for line in collected.read_text().splitlines()] == [
        "session", "usage", "end"]


@pytest.mark.parametrize("arguments, error", [
    (["--accounting", "nosuch:x=1"],
     "turnrelay: --accounting: 'nosuch' is not an installed backend (see --help-accounting)"),
    (["--accounting", "postgresql:dsn=postgresql://admin:hunter2@[::1/db"],
     "turnrelay: --accounting: postgresql: dsn: not a valid PostgreSQL DSN"),
    (["--accounting-full", "maybe"], "turnrelay: --accounting-full: 'maybe': choose one of "
                                     "refuse, drop"),
])
def test_a_bad_accounting_option_is_one_clear_line(arguments, error):
    result = subprocess.run([TWISTD, "-n", "turnrelay", *arguments], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0 and result.stderr.strip() == error
