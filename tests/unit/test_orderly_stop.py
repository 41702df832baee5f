"""The stop signals of a relay process (relay.service.services.OrderlyStop): the first stops
the reactor, any later one asks the service to hurry, also when both are handled before the
reactor has begun its shutdown."""
from __future__ import annotations

from typing import List

from twisted.internet.error import ReactorNotRunning

from relay.service.services import OrderlyStop


class StoppingReactor:
    """A reactor's `stop` as Twisted's: a second call before the shutdown raises."""

    def __init__(self) -> None:
        self.stops = 0

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
