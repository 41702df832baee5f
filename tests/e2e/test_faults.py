"""Faults: the account database or the usage ledger's database going down and coming back
while a relay serves.

The relay decides logins from its last snapshot of the account database, so an outage must
cost nothing: sessions relay on, valid credentials still log in, usage is recorded, and once
the database is back a revocation made there reaches the relay within the usual bound.  A
ledger outage must lose nothing either, sessions that begin and end inside it included
(tests/e2e/test_accounting.py has one session held across an outage; an exhausted port range is
tests/e2e/test_limits.py's).
"""
from __future__ import annotations

import json
import re

from relay.cli.turnclient import UDP, TurnClient
from relay.proto import stun
from support.accounting import INTERVAL, REGION, HeldSession, echoed, session_closed, sql_usage
from support.cli import BOUND, cli
from support.postgres import throwaway_cluster
from support.relay_clients import udp_socket
from support.servers import PASSWORD, REALM, USER

ALLOCATE_UDP = (stun.REQUESTED_TRANSPORT, 17)


def logged_in(server, credential) -> TurnClient:
    client = TurnClient.connect(UDP, (server.host, server.port), credential["username"],
                                credential["password"], REALM, bind_host=server.host)
    reply = client.request(stun.ALLOCATE, ALLOCATE_UDP)
    assert reply.cls == stun.SUCCESS, reply.get(stun.ERROR_CODE)
    return client


def relays(client: TurnClient, sink, payload: bytes) -> None:
    client.send_indication(sink.getsockname()[:2], payload)
    assert sink.recvfrom(100)[0] == payload


def test_an_account_database_outage_costs_nothing_and_the_relay_catches_up(server_factory,
                                                                            tmp_path):
    secret = tmp_path / "rest.secret"
    secret.write_text("shared-rest-secret-1\n")

    def token(label):
        return json.loads(cli("token", "--account", "acme", "--ttl", "600", "--label", label,
                              "--secret-file", str(secret)))

    with throwaway_cluster() as cluster, udp_socket("127.0.0.1") as sink:
        cli("account", "add", "acme", "--db", cluster.dsn)
        server = server_factory("--auth", f"db:dsn={cluster.dsn},secret-file={secret}",
                                users=(), tls=False)
        server.read_until("account database loaded")
        first = logged_in(server, token("first"))
        peer = (stun.XOR_PEER_ADDRESS, sink.getsockname()[:2])
        assert first.request(stun.CREATE_PERMISSION, peer).cls == stun.SUCCESS
        relays(first, sink, b"before")

        cluster.stop()
        server.read_until("account database unreachable")
        relays(first, sink, b"during")
        during = token("during")
        second = logged_in(server, during)      # decided from the last snapshot
        assert second.request(stun.CREATE_PERMISSION, peer).cls == stun.SUCCESS
        relays(second, sink, b"new session")
        assert first.request(stun.REFRESH, (stun.LIFETIME, 0)).cls == stun.SUCCESS
        session = server.search(r"allocation closed user=\S+:acme:first .*reason=deleted "
                                r"from_client=2/12B .*session=(\w+)").group(1)
        server.usage_recorded(session, "sqlite")

        cluster.start()
        server.read_until("account database reachable again")
        # The outage was one line of ours in each process that polls the database, not one
        # at every poll (adbapi logs its own failed rollback of the dead connection once).
        lines = [line for line in server.log if "account database unreachable" in line]
        sources = [re.search(r"\[worker \d+\]", line) for line in lines]
        assert lines and len({s.group() if s else "" for s in sources}) == len(lines), lines
        # Back: a revocation made in the database now ends the session it names.
        cli("revoke", during["username"], "--db", cluster.dsn)
        server.read_until("reason=revoked", timeout=BOUND + 5)
        for client in (first, second):
            client.close()


def test_a_ledger_outage_loses_no_session_even_one_begun_and_ended_inside_it(server_factory):
    with throwaway_cluster() as cluster:
        server = server_factory("--accounting", f"postgresql:dsn={cluster.dsn}", *INTERVAL,
                                "--region", REGION, users=((USER, PASSWORD), ("bob", "builder")),
                                tcp=False, tls=False)
        server.read_until("usage backend postgresql ready")
        across = HeldSession(server)
        across.relay(3, 100)
        cluster.stop()
        across.relay(3, 100)
        server.read_until("usage backend postgresql failed")
        inside = HeldSession(server, "bob", "builder")   # new allocations go on meanwhile
        inside.relay(5, 70)
        inside.delete()
        cluster.start()
        across.delete()
        for session in (across, inside):
            session.close()
        for user in (USER, "bob"):
            server.usage_recorded(session_closed(server, user), "postgresql", timeout=30)
        server.stop()
        assert sql_usage(cluster.dsn) == {USER: echoed(across.payloads),
                                          "bob": echoed(inside.payloads)}
