"""The operator's log lines for each allocation opened and closed.

The core tells its observers of both events and logs nothing itself; these lines are
formatted here, once, into the text operators read (and the tests parse), and handed to
twistd's log as one pre-formatted field.  Going through the standard library's logging (a
LogRecord, a caller lookup, a handler) and then twistd's field formatting cost about a
quarter of an Allocate+Refresh(0) cycle's CPU.
"""
from __future__ import annotations

from twisted.logger import Logger, LogLevel

from relay.core.allocation import Allocation
from relay.core.server import TurnServer
from relay.service.logtext import emit_line

log = Logger(namespace="turnrelay")


def log_allocations(server: TurnServer) -> None:
    """Log each allocation `server` opens and closes, one line each."""
    server.opened_observers.append(_opened)
    server.closed_observers.append(_closed)


def _opened(allocation: Allocation) -> None:
    client = allocation.client
    relays = ",".join(f"{host}:{port}" for host, port in
                      (relay.address for relay in allocation.relays.values()))
    emit_line(log, LogLevel.info, (
        f"allocation opened user={allocation.username} account={allocation.account.account_id} "
        f"client={client[0]}:{client[1]} transport={allocation.transport} "
        f"relay={'tcp:' if allocation.tcp else ''}{relays} "
        f"lifetime={int(allocation.expires - allocation.started)} session={allocation.session_id}"))


def _closed(allocation: Allocation, reason: str) -> None:
    client = allocation.client
    emit_line(log, LogLevel.info, (
        f"allocation closed user={allocation.username} client={client[0]}:{client[1]} "
        f"reason={reason} from_client={allocation.packets_from_client}/"
        f"{allocation.bytes_from_client}B to_client={allocation.packets_to_client}/"
        f"{allocation.bytes_to_client}B limited={allocation.limited_packets}/"
        f"{allocation.limited_bytes}B session={allocation.session_id}"))
