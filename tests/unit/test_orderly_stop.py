"""The root service of a relay process (relay.service.services.OrderlyStop).  Its stop
signals: the first stops the reactor, any later one asks the service to hurry, also when both
are handled before the reactor has begun its shutdown; and one that comes before the reactor
runs is not lost.  At its start, what start-up made leaves the cyclic collector's full passes."""
from __future__ import annotations

import gc
import os
import signal
import weakref
from typing import Any, Callable, Iterator, List

import pytest
from twisted.internet.error import ReactorNotRunning

from relay.service.services import OrderlyStop


class StoppingReactor:
    """A reactor's `stop` as Twisted's: a second call before the shutdown raises.  Not yet
    running: `callWhenRunning` and `callFromThread` keep their calls for later."""

    def __init__(self) -> None:
        self.stops = 0
        self.when_running: List[Callable[[], Any]] = []
        self.from_thread: List[Callable[[], Any]] = []

    def callWhenRunning(self, f: Callable[..., Any], *args: Any) -> None:
        self.when_running.append(lambda: f(*args))

    def callFromThread(self, f: Callable[..., Any], *args: Any) -> None:
        self.from_thread.append(lambda: f(*args))

    def stop(self) -> None:
        if self.stops:
            raise ReactorNotRunning("Can't stop reactor that isn't running.")
        self.stops += 1


class Recorded(OrderlyStop):
    def __init__(self, reactor: StoppingReactor):
        super().__init__(reactor)
        self.hurried: List[str] = []

    def hurry(self, reason: str) -> None:
        self.hurried.append(reason)


def test_a_second_signal_in_the_same_turn_hurries_rather_than_stopping_again() -> None:
    service = Recorded(StoppingReactor())
    service._stop("SIGTERM")
    service._stop("SIGINT")  # before the shutdown has run stopService
    assert service.reactor.stops == 1
    assert service.hurried == ["SIGINT again"]


def test_a_signal_once_stopping_hurries() -> None:
    service = Recorded(StoppingReactor())
    service._stop("SIGTERM")
    service.stopService()
    service._stop("SIGTERM")
    assert service.reactor.stops == 1
    assert service.hurried == ["SIGTERM again"]


@pytest.fixture
def stop_handlers() -> Iterator[None]:
    saved = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
    yield
    for number, handler in saved.items():
        signal.signal(number, handler)
    if hasattr(gc, "unfreeze"):
        gc.unfreeze()  # what the service's start froze: this process goes on testing


class Node:
    """An object the collector tracks, in a reference cycle when it points to itself."""

    def __init__(self) -> None:
        self.other: object = self


@pytest.mark.skipif(not hasattr(gc, "freeze"), reason="CPython's collector; PyPy has no freeze")
def test_start_up_objects_leave_the_collector_and_its_garbage_goes(stop_handlers: None) -> None:
    """Full collections walked every module and table start-up made, 30-90 ms each under
    steady Allocates; frozen, they walk only what came since."""
    gc.unfreeze()
    kept = Node()
    garbage = weakref.ref(Node())  # only in its own cycle: garbage at once
    assert garbage() is not None and gc.get_freeze_count() == 0
    Recorded(StoppingReactor()).startService()
    assert garbage() is None  # collected before the freeze, not kept for good
    assert gc.get_freeze_count() > 0
    assert not any(o is kept for o in gc.get_objects())  # frozen: no collection walks it


def test_a_signal_before_the_reactor_runs_stops_it_once_it_does(stop_handlers: None) -> None:
    """twistd starts the services, then the reactor: a SIGINT in between used to raise
    KeyboardInterrupt inside the reactor's start-up, and the relay ran on."""
    service = Recorded(StoppingReactor())
    service.startService()
    try:
        os.kill(os.getpid(), signal.SIGINT)  # handled here, at the next bytecode
    except KeyboardInterrupt:
        pytest.fail("the SIGINT met Python's default handler: the service had none yet")
    reactor = service.reactor
    assert reactor.stops == 0 and len(reactor.from_thread) == 1
    for call in reactor.when_running + reactor.from_thread:  # the reactor starts
        call()
    assert reactor.stops == 1
    assert signal.getsignal(signal.SIGTERM) == signal.getsignal(signal.SIGINT) == service._signalled
