"""relay.service.loglevel shows what Twisted's level filter would, for every namespace and
level, however often each comes (its answers are kept)."""
from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.logger import FilteringLogObserver, LogLevel

from relay.service.loglevel import LEVELS, filtered, predicate

NAMESPACES = st.sampled_from(["turnrelay", "turnrelay.ledger", "twisted", "twisted.internet",
                              "log_legacy", "plugin", "", None])
EVENT_LEVELS = st.sampled_from([*LogLevel.iterconstants(), None])


@given(st.sampled_from(LEVELS), st.lists(st.tuples(NAMESPACES, EVENT_LEVELS), max_size=30))
def test_the_same_events_as_twisteds_filter(level: str, keys: list) -> None:
    events = [{k: v for k, v in (("log_namespace", ns), ("log_level", lv)) if v is not None}
              for ns, lv in keys]
    ours: list = []
    theirs: list = []
    ours_filter = filtered(ours.append, level)
    theirs_filter = FilteringLogObserver(theirs.append, [predicate(level)])
    for event in events:
        ours_filter(event)
        theirs_filter(event)
    assert ours == theirs


def test_twisteds_own_lines_from_warn_and_the_relays_from_the_level() -> None:
    shown: list = []
    observer = filtered(shown.append, "info")
    for namespace, level in (("turnrelay", LogLevel.info), ("turnrelay", LogLevel.debug),
                             ("twisted", LogLevel.info), ("twisted", LogLevel.warn)):
        observer({"log_namespace": namespace, "log_level": level})
    assert [(e["log_namespace"], e["log_level"]) for e in shown] == [
        ("turnrelay", LogLevel.info), ("twisted", LogLevel.warn)]
