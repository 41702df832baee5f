"""relay.core.remembered: answers kept from the lifetime to twice it, within the bound."""
from __future__ import annotations

from relay.core.remembered import RememberedAnswers


def key(n: int):
    return ("udp", ("192.0.2.1", 40000), n.to_bytes(12, "big"))


def test_an_answer_is_kept_its_lifetime_and_forgotten_by_twice_it():
    answers = RememberedAnswers(lifetime=40, size=100)
    answers.put(key(1), b"first", now=0)
    for now in range(1, 40):
        answers.put(key(now + 1), b"later", now=now)  # answers and ticks meanwhile
        answers.expire(now)
        assert answers.get(key(1)) == b"first"
    answers.expire(80)
    assert answers.get(key(1)) is None
    assert answers.get(key(40)) is None  # put at 39: forgotten at 80 too (the newer turned at 40)


def test_an_idle_server_forgets_on_its_ticks():
    answers = RememberedAnswers(lifetime=40, size=100)
    answers.put(key(1), b"first", now=10)
    answers.expire(49)
    assert answers.get(key(1)) == b"first"
    answers.expire(50)
    assert answers.get(key(1)) == b"first"  # now the older generation
    answers.expire(89)
    assert answers.get(key(1)) == b"first"
    answers.expire(90)
    assert answers.get(key(1)) is None and len(answers) == 0


def test_a_flood_keeps_within_the_bound_and_keeps_the_latest():
    answers = RememberedAnswers(lifetime=40, size=10)
    for n in range(1000):
        answers.put(key(n), b"%d" % n, now=1)
        assert len(answers) <= 10
    assert all(answers.get(key(n)) == b"%d" % n for n in range(995, 1000))
    assert answers.get(key(989)) is None
