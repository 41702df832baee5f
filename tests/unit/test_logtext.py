"""relay.service.logtext writes the lines twistd's text observer would, byte for byte."""
from __future__ import annotations

import io
import select
import threading
from typing import Callable, List

import pytest
from twisted.internet.task import Clock
from twisted.logger import (
    Logger,
    LogLevel,
    LogPublisher,
    formatEventAsClassicLogText,
    jsonFileLogObserver,
    textFileLogObserver,
)
from twisted.python import threadable
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile

from relay.service import logtext
from relay.service.logtext import LineBatch, classic_text, event_text, note_stream, speed_up


def _events() -> list:
    """Events as Loggers make them: pre-formatted lines, formats with fields, a failure, a system."""
    events: list = []
    publisher = LogPublisher(events.append)
    log = Logger(namespace="turnrelay", observer=publisher)
    log.info("{line}", line="allocation opened user=alice client=127.0.0.1:5000 session=abc")
    log.warn("{line}", line="[worker 1] allocation closed user=bob reason=refresh")
    log.error("worker {index} (pid {pid}) stopped: {how}", index=0, pid=42, how="exit code 1")
    log.info("{line}", line="two\nlines")
    log.info("{line}", line="")
    log.info("{banner}", banner="turnrelay listening")
    try:
        1 / 0
    except ZeroDivisionError:
        log.failure("went wrong", Failure())
    Logger(namespace="twisted", observer=publisher).info("{line}", line="x", log_system="udp")
    events.append({"log_format": "no time", "log_level": LogLevel.info})
    events.append({"log_format": "{line}", "line": "no level", "log_time": 1.5})
    return events


@pytest.mark.parametrize("event", _events())
def test_the_same_text_as_twisted(event: dict) -> None:
    assert classic_text(event) == formatEventAsClassicLogText(event)


def test_each_second_its_own_timestamp() -> None:
    events = _events()[:1]
    for when in (1_000_000_000.0, 1_000_000_000.999, 1_000_000_001.0, 999_999_999.5):
        event = dict(events[0], log_time=when)
        assert classic_text(event) == formatEventAsClassicLogText(event)


def test_event_text_is_the_events_text() -> None:
    from twisted.logger import formatEvent
    for event in _events():
        assert event_text(event) == formatEvent(event)


def test_only_text_observers_are_sped_up() -> None:
    text, json = textFileLogObserver(io.StringIO()), jsonFileLogObserver(io.StringIO())
    json_format = json.formatEvent
    speed_up(text, FakeReactor())
    speed_up(json, FakeReactor())
    assert text.formatEvent is classic_text
    assert json.formatEvent is json_format


def test_a_text_stream_is_shared_with_the_workers_and_a_rotated_file_is_not(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(logtext, "shared_stream", None)
    rotated = LogFile.fromFullPath(str(tmp_path / "relay.log"))
    with open(tmp_path / "events.json", "w") as events, open(tmp_path / "stdout", "w") as stream:
        note_stream(textFileLogObserver(rotated))
        note_stream(jsonFileLogObserver(events))
        assert logtext.shared_stream is None
        note_stream(textFileLogObserver(stream))
        assert logtext.shared_stream == stream.fileno()
    rotated.close()


@pytest.mark.parametrize("zone", ["America/New_York", "Asia/Kolkata", "UTC"])
def test_the_timestamp_in_other_time_zones(monkeypatch, zone: str) -> None:
    """Local time with its offset, as Twisted writes it, on both sides of a DST change."""
    import time
    monkeypatch.setenv("TZ", zone)
    time.tzset()
    logtext._stamps.clear()  # made under the previous zone (a relay's zone does not change)
    try:
        event = _events()[0]
        for when in (1_710_054_000.0, 1_710_054_000.0 + 7200, 1_730_613_600.0):  # around DST
            assert classic_text(dict(event, log_time=when)) == formatEventAsClassicLogText(
                dict(event, log_time=when))
    finally:
        monkeypatch.undo()
        time.tzset()
        logtext._stamps.clear()


@pytest.mark.parametrize("level", [LogLevel.info, LogLevel.warn, LogLevel.error])
def test_emit_line_sends_the_event_logger_emit_sends(level: LogLevel) -> None:
    events: list = []
    log = Logger(namespace="turnrelay", source=object(), observer=LogPublisher(events.append))
    log.emit(level, "{line}", line="[worker 1] allocation opened user=alice")
    logtext.emit_line(log, level, "[worker 1] allocation opened user=alice")
    expected, made = events
    assert isinstance(made["log_time"], float)
    assert {**made, "log_time": 0} == {**expected, "log_time": 0}
    assert classic_text({**made, "log_time": 0}) == classic_text({**expected, "log_time": 0})


@pytest.fixture(autouse=True)
def reactor_thread(monkeypatch) -> None:
    """This thread is the reactor's, as `reactor.run` makes the one that calls it."""
    monkeypatch.setattr(threadable, "ioThread", threadable.getThreadID())


class FakeReactor(Clock):
    """A clock that is running, and stops as a reactor does: "after shutdown" triggers run
    once `running` is False."""

    def __init__(self) -> None:
        super().__init__()
        self.running = True
        self.after_shutdown: List[Callable[[], None]] = []

    def addSystemEventTrigger(self, phase: str, event: str, call: Callable[[], None]) -> None:
        assert (phase, event) == ("after", "shutdown")
        self.after_shutdown.append(call)

    def stop(self) -> None:
        self.running = False
        for call in self.after_shutdown:
            call()


def test_a_batch_writes_an_iterations_lines_at_once_in_order() -> None:
    reactor, writes = FakeReactor(), []
    batch = LineBatch(writes.append, reactor)
    for k in range(3):
        batch.add(f"line {k}\n")
    assert writes == []
    reactor.advance(0)  # the next iteration's timed calls
    assert writes == ["line 0\nline 1\nline 2\n"]
    batch.add("line 3\n")
    reactor.advance(0)
    assert writes[1:] == ["line 3\n"]


def test_a_batch_writes_at_once_before_the_reactor_runs_and_once_it_has_stopped() -> None:
    reactor, writes = FakeReactor(), []
    reactor.running = False
    batch = LineBatch(writes.append, reactor)
    batch.add("starting\n")
    assert writes == ["starting\n"]
    reactor.running = True
    batch.add("held\n")
    reactor.stop()  # the held line goes out as the reactor stops, before any later one
    assert writes == ["starting\n", "held\n"]
    batch.add("stopped\n")
    assert writes == ["starting\n", "held\n", "stopped\n"]
    reactor.advance(0)
    assert len(writes) == 3


@pytest.mark.parametrize("line", ["allocation opened user=alice session=abc\n",
                                  "allocation opened user=\u00e9l\u00e8ve session=abc\n"])
def test_a_batch_writes_whole_lines_a_pipe_keeps_whole(line: str) -> None:
    """A pipe never interleaves a write of at most PIPE_BUF bytes with another process's."""
    reactor, writes = FakeReactor(), []
    batch = LineBatch(writes.append, reactor)
    for _ in range(200):
        batch.add(line)
    reactor.advance(0)
    assert len(writes) > 1 and "".join(writes) == line * 200
    for write in writes:
        assert len(write.encode()) <= select.PIPE_BUF and write.endswith("\n")


def test_a_line_from_another_thread_is_written_at_once_from_there() -> None:
    """The reactor's timed calls are its own thread's: another thread never schedules one."""
    reactor, writes = FakeReactor(), []
    batch = LineBatch(writes.append, reactor)
    batch.add("held\n")
    thread = threading.Thread(target=batch.add, args=("from a pool\n",))
    thread.start()
    thread.join()
    assert writes == ["from a pool\n"]
    reactor.advance(0)
    assert writes == ["from a pool\n", "held\n"]


def test_a_line_longer_than_a_pipe_keeps_whole_is_written_whole_on_its_own() -> None:
    reactor, writes = FakeReactor(), []
    batch = LineBatch(writes.append, reactor)
    long = "x" * (select.PIPE_BUF + 10) + "\n"
    for text in ("before\n", long, "after\n", "no end"):
        batch.add(text)
    reactor.advance(0)
    assert writes == ["before\n", long, "after\nno end"]


def test_twistds_text_observer_writes_an_iterations_events_in_one_write() -> None:
    class Stream(io.StringIO):
        writes = 0

        def write(self, text: str) -> int:
            self.writes += 1
            return super().write(text)

    stream, reactor = Stream(), FakeReactor()
    observer = textFileLogObserver(stream)
    speed_up(observer, reactor)
    events = _events()[:2]
    for event in events:
        observer(event)
    assert stream.getvalue() == ""
    reactor.advance(0)
    assert stream.writes == 1
    assert stream.getvalue() == "".join(formatEventAsClassicLogText(event) for event in events)
