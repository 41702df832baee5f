"""Logins without Deferreds, and the long-term keys the checkers keep between them: a kept
key saves digests, never a check (a removed user, a changed password, a secret taken out of
rotation or an expired credential is refused as without it)."""
import sys

import pytest
from twisted.cred.portal import Portal

from relay.auth import tokens
from relay.auth.checkers import ChainedChecker, RestSecretChecker, StaticUser, StaticUsersChecker
from relay.auth.cred import AccountRealm
from relay.net.listeners import LoginDispatcher
from relay.proto import stun
from support.core_harness import Harness, error_code

SECRETS = [b"current-secret", b"previous-secret"]


@pytest.fixture
def derivations(monkeypatch):
    """The long-term keys the relay derived from a password (not the test clients)."""
    calls = []
    derive = stun.long_term_key

    def counting(*args, **kwargs):
        if sys._getframe(1).f_globals["__name__"].startswith("relay."):
            calls.append(args[:2])
        return derive(*args, **kwargs)
    monkeypatch.setattr(stun, "long_term_key", counting)
    return calls


def allocate(harness, **client):
    return harness.client(**client).allocate()


def test_a_static_users_key_is_derived_once(derivations):
    harness = Harness()
    for port in range(40000, 40003):
        assert allocate(harness, address=("198.51.100.20", port)).cls == stun.SUCCESS
    assert derivations == [("alice", harness.config.realm)]


def test_a_wrong_password_is_refused_with_the_kept_key():
    harness = Harness()
    assert allocate(harness).cls == stun.SUCCESS
    assert error_code(allocate(harness, password="guess", address=("198.51.100.21", 1))) == 401


def test_a_reload_drops_removed_users_and_changed_passwords(tmp_path):
    users = tmp_path / "users.toml"
    users.write_text('[users.carol]\npassword = "first"\n[users.dave]\npassword = "x"\n')
    checker = StaticUsersChecker({}, str(users))
    harness = Harness(checker=checker)
    assert allocate(harness, username="carol", password="first").cls == stun.SUCCESS
    assert allocate(harness, username="dave", password="x",
                    address=("198.51.100.22", 1)).cls == stun.SUCCESS
    users.write_text('[users.carol]\npassword = "second"\n')
    checker.reload()
    assert error_code(allocate(harness, username="carol", password="first",
                               address=("198.51.100.23", 1))) == 401
    assert error_code(allocate(harness, username="dave", password="x",
                               address=("198.51.100.24", 1))) == 401
    assert allocate(harness, username="carol", password="second",
                    address=("198.51.100.25", 1)).cls == stun.SUCCESS


def rest_harness(checker):
    holder = {}
    checker.clock = lambda: holder["harness"].now
    harness = holder["harness"] = Harness(checker=checker)
    return harness


def test_a_rest_key_is_kept_and_not_derived_again(derivations):
    checker = RestSecretChecker(SECRETS)
    harness = rest_harness(checker)
    username, password = tokens.mint(SECRETS[1], "acme", 600, harness.now)
    for port in range(40000, 40003):
        response = allocate(harness, username=username, password=password,
                            address=("198.51.100.20", port))
        assert response.cls == stun.SUCCESS
    # The first login tried both secrets; the later ones used the kept key.
    assert len(derivations) == 2


def test_a_kept_rest_key_whose_secret_left_rotation_is_refused():
    checker = RestSecretChecker(SECRETS)
    harness = rest_harness(checker)
    username, password = tokens.mint(SECRETS[1], "acme", 600, harness.now)
    assert allocate(harness, username=username, password=password).cls == stun.SUCCESS
    checker.secrets = [SECRETS[0]]
    assert error_code(allocate(harness, username=username, password=password,
                               address=("198.51.100.26", 1))) == 401


def test_a_kept_rest_key_does_not_outlive_its_credential():
    checker = RestSecretChecker(SECRETS, skew=0)
    harness = rest_harness(checker)
    username, password = tokens.mint(SECRETS[0], "acme", 60, harness.now)
    assert allocate(harness, username=username, password=password).cls == stun.SUCCESS
    harness.advance(120)
    assert error_code(allocate(harness, username=username, password=password,
                               address=("198.51.100.27", 1))) == 401


def test_rest_keys_kept_are_bounded():
    checker = RestSecretChecker(SECRETS)
    checker.KEPT_KEYS = 3
    harness = rest_harness(checker)
    for n in range(7):
        username, password = tokens.mint(SECRETS[0], f"acct{n}", 600, harness.now)
        assert allocate(harness, username=username, password=password,
                        address=("198.51.100.28", 40000 + n)).cls == stun.SUCCESS
        assert len(checker._keys) <= 3


class Waits:
    """A third-party checker that answers through a Deferred only."""

    credentialInterfaces = StaticUsersChecker.credentialInterfaces

    def requestAvatarId(self, credentials):
        raise AssertionError("not called in these tests")


def test_chained_checker_is_synchronous_only_when_every_backend_is():
    static = StaticUsersChecker({"alice": StaticUser("acct-alice", password="wonderland")})
    assert ChainedChecker([static, RestSecretChecker(SECRETS)]).synchronous
    assert not ChainedChecker([static, Waits()]).synchronous


class Failing:
    def verify(self, credentials):
        raise RuntimeError("database down")


def test_chained_verify_reports_an_error_only_when_no_backend_accepts():
    static = StaticUsersChecker({"alice": StaticUser("acct-alice", password="wonderland")})
    harness = Harness(checker=static)
    client = harness.client()
    client.challenge()

    def credentials(password):
        return harness.server.receive(client.client, client.signed_wire(
            stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, 17)], password=password), harness.now)
    assert ChainedChecker([Failing(), static]).verify(credentials("wonderland")).account_id \
        == "acct-alice"
    with pytest.raises(RuntimeError):
        ChainedChecker([Failing(), static]).verify(credentials("guess"))
    assert ChainedChecker([static]).verify(credentials("guess")) is None


class Clock:
    def __init__(self, harness):
        self.harness = harness

    def seconds(self):
        return self.harness.now


@pytest.mark.parametrize("verify, code", [
    (lambda credentials: None, 401),
    (Failing().verify, 500),
])
def test_the_dispatcher_answers_a_synchronous_refusal_or_error(verify, code):
    harness = Harness()
    client = harness.client()
    client.challenge()
    dispatch = LoginDispatcher(harness.server, Portal(AccountRealm(), []), Clock(harness), verify=verify)
    dispatch(client.client, client.signed_wire(stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, 17)]))
    assert error_code(stun.parse(client.received[-1])) == code
    assert harness.server.allocations == {}


def test_the_dispatcher_allocates_through_verify():
    harness = Harness()
    client = harness.client()
    client.challenge()
    dispatch = LoginDispatcher(harness.server, Portal(AccountRealm(), []), Clock(harness),
                               verify=harness.checker.verify)
    dispatch(client.client, client.signed_wire(stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, 17)]))
    assert stun.parse(client.received[-1]).cls == stun.SUCCESS
    assert harness.server.allocations[client.client.key].account.account_id == "acct-alice"
