"""A clean start, every time: the relay with several workers, started again and again on fresh
and on existing state directories (and on a fresh and an existing PostgreSQL ledger), logs no
error and no traceback, and its ledger then holds exactly what each run relayed.  The ledger's
schema is made once, by the parent, before the workers write (relay.service.build
`migrate_schemas`): two workers creating it at once used to fail a write with an error line."""
import re

import pytest

from support.accounting import HeldSession, sql_usage
from support.postgres import fresh_schema
from support.servers import USER, start_server

STARTS = 20
COUNT, SIZE = 5, 300
BAD = re.compile(r"#(error|critical)\]|Traceback", re.I)


def one_run(state_dir: str, *extra: str) -> None:
    server = start_server("--workers", "2", *extra, state_dir=state_dir, tls=False)
    try:
        session = HeldSession(server)
        session.relay(COUNT, SIZE)
        session.close()
    finally:
        log = server.stop()
    bad = [line for line in log.splitlines() if BAD.search(line)]
    assert not bad, log


def test_twenty_starts_on_fresh_and_existing_state_directories(tmp_path):
    existing = str(tmp_path / "existing")
    for run in range(STARTS):
        fresh = run % 2 == 0
        one_run(str(tmp_path / f"fresh-{run}") if fresh else existing)
        if fresh:
            ledger = f"sqlite:///{tmp_path / f'fresh-{run}' / 'usage.db'}"
            assert sql_usage(ledger) == {USER: ("default", COUNT * SIZE, COUNT,
                                                COUNT * SIZE, COUNT)}
    runs = STARTS // 2
    assert sql_usage(f"sqlite:///{tmp_path / 'existing' / 'usage.db'}") == {
        USER: ("default", runs * COUNT * SIZE, runs * COUNT, runs * COUNT * SIZE, runs * COUNT)}


@pytest.mark.parametrize("runs", [3])
def test_starts_on_a_fresh_then_existing_postgresql_ledger(tmp_path, postgres_dsn, runs):
    dsn = fresh_schema(postgres_dsn)
    for run in range(runs):
        one_run(str(tmp_path / "state"), "--accounting", f"postgresql:dsn={dsn}")
    assert sql_usage(dsn) == {USER: ("default", runs * COUNT * SIZE, runs * COUNT,
                                     runs * COUNT * SIZE, runs * COUNT)}
