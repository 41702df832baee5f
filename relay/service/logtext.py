"""The text of a log line, made cheaply: what twistd's file observer writes, at a fraction of the CPU.

twistd writes each event through `formatEventAsClassicLogText`, which makes a timezone and a
`datetime` and runs `strftime` for every line's timestamp and parses the event's format
string: about 17 us a line on CPython 3.11, where an Allocate+Refresh(0) cycle (two lines)
costs the relay a few hundred.  `classic_text` writes the same text: the timestamp is made
once a second, and an event whose format is just `{line}` (relay.service.eventlog's lines,
a worker's lines in the parent) is written as it is.  Any other event is Twisted's own
formatting with the cached timestamp, so tracebacks, `log_system` and legacy events read as
before.

`speed_up` gives this formatter to the file observers twistd starts (stdout with `-n`, or
`--logfile`, whose `LogFile` keeps rotating as before: only the text is made here) and holds
their writes in a `LineBatch`, and `note_stream` notes in `shared_stream` the descriptor of a
stream one writes to: worker processes write their lines there themselves
(relay.service.workers), through a `LineBatch` of their own.
"""
from __future__ import annotations

import select
import time
from typing import Any, Callable, Dict, List, Optional

from twisted.logger import FileLogObserver, Logger, LogLevel, formatEvent, formatEventAsClassicLogText
from twisted.python.logfile import BaseLogFile
from twisted.python.threadable import isInIOThread

_STAMP_FORMAT = "%Y-%m-%dT%H:%M:%S%z"  # twisted.logger.timeFormatRFC3339
_stamps: Dict[int, str] = {}
# The descriptor twistd's text log is written to when it is a plain stream (`-n`, `--logfile=-`:
# what containers run), set by `note_stream`; None for a `--logfile` file, syslog or `--logger`.
shared_stream: Optional[int] = None


def timestamp(when: Optional[float]) -> str:
    """`when` as twisted.logger.formatTime writes it (local time, numeric offset), made once a second."""
    if when is None:
        return "-"
    second = int(when)
    stamp = _stamps.get(second)
    if stamp is None:
        _stamps.clear()
        stamp = _stamps[second] = time.strftime(_STAMP_FORMAT, time.localtime(second))
    return stamp


def preformatted(event: Dict[str, Any]) -> Optional[str]:
    """The text of an event logged as `log.info("{line}", line=...)`, or None for any other."""
    if event.get("log_format") == "{line}" and "log_failure" not in event:
        line = event.get("line")
        if isinstance(line, str) and line:
            return line
    return None


def emit_line(log: Logger, level: LogLevel, line: str) -> None:
    """`log.emit(level, "{line}", line=line)`: the same event to the same observer, without
    `Logger.emit`'s check that `level` is a LogLevel (it sorts the levels on every call:
    1.5 us of a 2 us emit, and an Allocate+Refresh(0) cycle logs two lines, a worker's
    lines once more in the parent).  `level` must be a LogLevel constant."""
    log.observer({"line": line, "log_logger": log, "log_level": level,
                  "log_namespace": log.namespace, "log_source": log.source,
                  "log_format": "{line}", "log_time": time.time()})


def event_text(event: Dict[str, Any]) -> str:
    """What `formatEvent` makes of `event`, without parsing the format of a pre-formatted line."""
    line = preformatted(event)
    return formatEvent(event) if line is None else line


def classic_line(when: Optional[float], namespace: str, level: LogLevel, line: str) -> str:
    """The classic text of a one-line event."""
    return f"{timestamp(when)} [{namespace}#{level.name}] {line}\n"


def classic_text(event: Dict[str, Any]) -> Optional[str]:
    """The line `formatEventAsClassicLogText` makes of `event`, or None when it makes none."""
    line = preformatted(event)
    level = event.get("log_level")
    if line is not None and level is not None and "log_system" not in event and "\n" not in line:
        return classic_line(event.get("log_time"), event.get("log_namespace", "-"), level, line)
    return formatEventAsClassicLogText(event, formatTime=timestamp)


def _twistd_text(observer: Any) -> bool:
    """Whether `observer` is a `textFileLogObserver` twistd made (with its default time format)."""
    return (isinstance(observer, FileLogObserver) and getattr(observer.formatEvent, "__qualname__", "")
            == "textFileLogObserver.<locals>.formatEvent")


class LineBatch:
    """Log text held until the reactor's current iteration ends, then written in few writes.

    Written as it came, each line cost a write(2), two per Allocate+Refresh(0) cycle; a
    reactor iteration that answers 64 datagrams now writes its lines at once, from a call made
    at the next iteration's start, and a cycle costs the relay 5-9 us less CPU (of 130-140).
    Until the reactor runs, and once it has stopped (what was held goes out as it stops),
    text goes out at once: a start-up error and the last lines never wait for an iteration
    that will not come.  A SIGKILL loses at most one iteration's lines.

    Each write is whole lines of at most PIPE_BUF bytes, which a pipe never interleaves with
    another process's writes: a container's standard output is one, shared with the workers.
    A line logged in another thread (a database pool's) is written at once, from there.
    """

    def __init__(self, write: Callable[[str], object], reactor: Any) -> None:
        self._write = write
        self._reactor = reactor  # its `running`, and `callLater`
        self._pending: List[str] = []
        reactor.addSystemEventTrigger("after", "shutdown", self.flush)

    def add(self, text: str) -> None:
        if not isInIOThread():
            self._write(text)
            return
        if not self._reactor.running:
            self.flush()
            self._write(text)
            return
        if not self._pending:
            self._reactor.callLater(0, self.flush)
        self._pending.append(text)

    def flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        text = "".join(pending)
        # A character is at most 4 bytes of UTF-8.
        limit = select.PIPE_BUF if text.isascii() else select.PIPE_BUF // 4
        start = 0
        while len(text) - start > limit:
            cut = text.rfind("\n", start, start + limit) + 1
            if cut <= start:  # one line longer than the limit: whole, on its own
                cut = text.find("\n", start + limit) + 1 or len(text)
            self._write(text[start:cut])
            start = cut
        if start < len(text):
            self._write(text[start:])


class BatchedFile:
    """A text file written through a `LineBatch`: twistd's text observer's, and a worker's
    standard output to the parent.  A `FileLogObserver` flushes after each event: the batch's
    own write flushes instead."""

    def __init__(self, out: Any, reactor: Any) -> None:
        self.batch = LineBatch(lambda text: (out.write(text), out.flush()), reactor)
        self.write = self.batch.add

    def flush(self) -> None:
        pass


def speed_up(observer: Any, reactor: Any) -> None:
    """Make `observer`, if it is a text file observer twistd made, write its lines with
    `classic_text`, a reactor iteration's lines at a time (`LineBatch`).

    A JSON observer, or one from `--logger`, is left as it is.
    """
    if _twistd_text(observer):
        observer.formatEvent = classic_text
        observer._outFile = BatchedFile(observer._outFile, reactor)


def note_stream(observer: Any) -> None:
    """Note in `shared_stream` the descriptor `observer` writes to, if it is twistd's text
    observer on a plain stream.  A `--logfile` is not shared: its LogFile writes at its own
    offset, not at the end, and rotates by the bytes it wrote itself."""
    global shared_stream
    stream = getattr(observer, "_outFile", None) if _twistd_text(observer) else None
    if stream is not None and not isinstance(stream, BaseLogFile):
        try:
            shared_stream = stream.fileno()
        except (AttributeError, OSError, ValueError):
            pass
