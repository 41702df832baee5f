"""`twistd turnrelay`: the options, and the relay they describe: one process, or (`--workers N`,
by default one per CPU) a parent supervising N worker processes."""
from __future__ import annotations

from twisted.application.service import MultiService

from relay.service import first_run
from relay.service.build import relay_service
from relay.service.loglevel import filter_twistd_log
from relay.service.options import Options
from relay.service.workers import supervisor

__all__ = ["Options", "makeService"]


def makeService(options: Options, reactor=None) -> MultiService:
    if reactor is None:
        from twisted.internet import reactor
    filter_twistd_log(options["log-level"])
    first = first_run.apply(options)
    if options["workers"] > 1:
        return supervisor(options, reactor, first)
    return relay_service(options, reactor, first=first)
