"""`--log-level`: what the relay's log shows.

At the default level, `info`, a start is the one banner (relay.service.banner) and whatever
goes wrong; each listener, worker and backend coming up is `debug`, and so is Twisted's own
chatter (a line per port opened, the reactor's name), which is shown from `warn` up only.
Allocations opened and closed, reloads and drains are `info` and always shown.

twistd has no level of its own: it starts its log observer after the plugin's `makeService`,
so `filter_twistd_log` makes the observers it is given filtered ones, and the events made
before then, buffered by Twisted, are filtered when replayed.  A worker process
(relay.service.workers) filters its own observer with the same predicate.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Tuple

from twisted.logger import (
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    PredicateResult,
    globalLogBeginner,
)
from zope.interface import implementer

from relay.service.logtext import note_stream, speed_up

LEVELS = ("debug", "info", "warn", "error")
# Namespaces of Twisted's own lines (legacy `log.msg` ones included).
TWISTED = ("twisted", "log_legacy")


def predicate(level: str) -> LogLevelFilterPredicate:
    minimum = LogLevel.levelWithName(level)
    found = LogLevelFilterPredicate(defaultLogLevel=minimum)
    for namespace in TWISTED:
        found.setLogLevelForNamespace(namespace, max(minimum, LogLevel.warn))
    return found


@implementer(ILogObserver)
class LevelFilter:
    """`FilteringLogObserver(observer, [predicate(level)])`, with each (namespace, level)
    pair's answer kept: the predicate compares `LogLevel` constants, which sorts them on every
    comparison (about 2 us an event), and an Allocate+Refresh(0) cycle logs two lines, a
    worker's lines once more in the parent.  Namespaces are the modules' loggers': few."""

    def __init__(self, observer: Callable[[dict], None], level: str):
        self.observer = observer
        self.predicate = predicate(level)
        self.shown: Dict[Tuple[Any, Any], bool] = {}

    def __call__(self, event: dict) -> None:
        key = (event.get("log_namespace"), event.get("log_level"))
        shown = self.shown.get(key)
        if shown is None:
            shown = self.shown[key] = self.predicate(event) is not PredicateResult.no
        if shown:
            self.observer(event)


def filtered(observer: Callable[[dict], None], level: str) -> ILogObserver:
    return LevelFilter(observer, level)


def filter_twistd_log(level: str) -> None:
    """Make the observers twistd is about to start logging to show only `level` and above.

    They also get the cheaper formatter of relay.service.logtext (the same text), and a plain
    stream among them is noted for the workers to write to.
    """
    begin = globalLogBeginner.beginLoggingTo

    def begin_filtered(observers: List[Any], *args: Any, **kwargs: Any) -> None:
        from twisted.internet import reactor  # twistd has installed its reactor by now
        globalLogBeginner.beginLoggingTo = begin  # type: ignore[method-assign]
        for observer in observers:
            note_stream(observer)  # first: it knows twistd's observer by its own formatter
            speed_up(observer, reactor)
        if level != "debug":
            observers = [filtered(observer, level) for observer in observers]
        begin(observers, *args, **kwargs)
    globalLogBeginner.beginLoggingTo = begin_filtered  # type: ignore[method-assign]
