"""A throwaway PostgreSQL server of the tests' own: initdb in a temporary directory, run as the
unprivileged `postgres` OS user (PostgreSQL refuses to run as root), listening on 127.0.0.1 (and,
for a test node's pods, on the host end of its private link), stopped and deleted afterwards.  Nothing of the machine's own clusters is touched.
"""
from __future__ import annotations

import contextlib
import glob
import itertools
import os
import random
import shutil
import socket
import subprocess
import tempfile
from typing import Iterator, List

import psycopg
import pytest

USER = DATABASE = "turnrelay"
# Durability is pointless for a server deleted after the run, and fsync is most of its cost.
SERVER_OPTIONS = "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"

_schemas = itertools.count()


def _bindir() -> str:
    """The newest installed PostgreSQL's binaries; missing is a failure, never a skip."""
    found = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    if not found:
        pytest.fail("PostgreSQL not found (no /usr/lib/postgresql/*/bin/initdb): "
                    "run `bash scripts/test.sh`, which installs it")
    return os.path.dirname(max(found, key=lambda path: int(path.split("/")[4])))


def _as_postgres() -> List[str]:
    """The prefix that runs a command as the `postgres` user when we are root."""
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


def _restartable_port() -> int:
    """A free port below Linux's ephemeral range (32768-60999): a server stopped and started
    again by a test must find its port still free, and any socket bound to port 0 meanwhile
    (a client's, another test's relay) may take an ephemeral one."""
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randint(20000, 32767)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


def _run(argv: List[str], what: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        pytest.fail(f"{what} failed ({done.returncode}):\n{done.stdout}{done.stderr}")


class Cluster:
    """A PostgreSQL server in a directory of its own, which a test may stop and start again."""

    def __init__(self, root: str, port: int, also_listen: str = ""):
        self.also_listen = also_listen
        self.bindir = _bindir()
        self.as_postgres = _as_postgres()
        self.root, self.port = root, port
        self.data, self.log = os.path.join(root, "data"), os.path.join(root, "server.log")
        self.dsn = f"postgresql://{USER}@127.0.0.1:{port}/{DATABASE}"

    def start(self) -> None:
        # -w waits for the server's own "ready" mark in postmaster.pid: readiness as an event.
        start = subprocess.run(
            self.as_postgres + [f"{self.bindir}/pg_ctl", "start", "-w", "-t", "30", "-D",
                                self.data, "-l", self.log,
                                "-o", f"-p {self.port} -k {self.root} "
                                      f"-c listen_addresses=127.0.0.1{',' + self.also_listen if self.also_listen else ''} "
                                      + SERVER_OPTIONS],
            capture_output=True, text=True, timeout=60)
        if start.returncode != 0:
            server_log = open(self.log).read() if os.path.exists(self.log) else ""
            pytest.fail(f"pg_ctl start failed:\n{start.stdout}{start.stderr}{server_log}")
        # The address the tests use answers, not only the socket pg_ctl watched.
        _run([f"{self.bindir}/pg_isready", "-h", "127.0.0.1", "-p", str(self.port), "-U", USER,
              "-t", "10"], "pg_isready")

    def stop(self) -> None:
        subprocess.run(self.as_postgres + [f"{self.bindir}/pg_ctl", "stop", "-m", "fast", "-w",
                                           "-D", self.data], capture_output=True, timeout=60)


@contextlib.contextmanager
def throwaway_cluster(also_listen: str = "", trusted: str = "") -> Iterator[Cluster]:
    """A started server with the database `turnrelay`, whose superuser `turnrelay` is trusted
    without a password (only this machine can reach it, and the `trusted` CIDR if given: a test
    node's pods, through `also_listen`); stopped and deleted afterwards."""
    root = tempfile.mkdtemp(prefix="turnrelay-pg-")
    try:
        cluster = Cluster(root, _restartable_port(), also_listen)
        if cluster.as_postgres:
            shutil.chown(root, "postgres", "postgres")
        _run(cluster.as_postgres + [f"{cluster.bindir}/initdb", "--no-sync", "-A", "trust",
                                    "-U", USER, "-E", "UTF8", "--no-locale", "-D", cluster.data],
             "initdb")
        if trusted:
            with open(os.path.join(cluster.data, "pg_hba.conf"), "a") as hba:
                hba.write(f"host all all {trusted} trust\n")
        cluster.start()
        try:
            _run([f"{cluster.bindir}/createdb", "-h", "127.0.0.1", "-p", str(cluster.port),
                  "-U", USER, DATABASE], "createdb")
            yield cluster
        finally:
            cluster.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def throwaway_postgres() -> Iterator[str]:
    """Start a server and yield `postgresql://turnrelay@127.0.0.1:PORT/turnrelay`."""
    with throwaway_cluster() as cluster:
        yield cluster.dsn


def fresh_schema(dsn: str) -> str:
    """A DSN on which the database `dsn` names looks empty: a new schema first on its search
    path.  One per test keeps tests apart; CREATE SCHEMA costs a millisecond where CREATE
    DATABASE costs a third of a second."""
    name = f"test_{next(_schemas)}"
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(f"CREATE SCHEMA {name}")
    return f"{dsn}?options=-csearch_path%3D{name}"
