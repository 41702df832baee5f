"""Auth backends in the sans-IO core: REST credentials, chained checkers, account limits."""
import pytest
from twisted.cred import error
from twisted.internet import defer

from relay.auth import tokens
from relay.auth.checkers import ChainedChecker, RestSecretChecker, StaticUser, StaticUsersChecker
from relay.proto import stun
from support.core_harness import FixedAccount, Harness, channel_data, error_code

SECRETS = [b"current-secret", b"previous-secret"]


def rest_harness(strict=False, skew=0):
    holder = {}
    checker = RestSecretChecker(SECRETS, skew=skew, strict_expiry=strict,
                                clock=lambda: holder["harness"].now)
    harness = Harness(checker=checker, allocation_policy=checker.allows)
    holder["harness"] = harness
    return harness


def rest_client(harness, secret=SECRETS[0], ttl=600, account="acme", label="call-42",
                address=("198.51.100.30", 40000)):
    username, password = tokens.mint(secret, account, ttl, harness.now, label)
    return harness.client(username=username, password=password, address=address)


def test_rest_credential_allocates_for_its_account():
    harness = rest_harness()
    client = rest_client(harness)
    client.allocate_ok()
    account = client.allocation.account
    assert account.account_id == "acme"
    assert account.credential_expires == int(harness.now) + 600


def test_every_configured_secret_verifies_for_rotation():
    harness = rest_harness()
    rest_client(harness, secret=SECRETS[1]).allocate_ok()


@pytest.mark.parametrize("username, password", [
    ("9999999999:acme", "not-the-hmac"),
    ("acme", tokens.password_for(SECRETS[0], "acme")),                 # not a REST username
    ("9999999999:acme", tokens.password_for(b"other", "9999999999:acme")),
])
def test_bad_rest_credentials_are_401(username, password):
    harness = rest_harness()
    assert error_code(harness.client(username=username, password=password).allocate()) == 401


def test_expired_credential_cannot_allocate_but_may_refresh_by_default():
    harness = rest_harness()
    client = rest_client(harness, ttl=60)
    client.allocate_ok()
    harness.advance(120)
    assert client.refresh(600).cls == stun.SUCCESS  # eturnal's default: the allocation lives on
    assert client.allocation is not None
    late = rest_client(harness, ttl=-1, address=("198.51.100.31", 40000))
    assert error_code(late.allocate()) == 401


def test_strict_expiry_refuses_requests_and_closes_the_allocation():
    harness = rest_harness(strict=True)
    client = rest_client(harness, ttl=60)
    client.allocate_ok()
    harness.advance(30)
    assert client.allocation is not None
    harness.advance(31)
    assert client.allocation is None
    assert harness.closed[-1][1] == "revoked"
    assert error_code(client.refresh(600)) in (401, 437)


def test_clock_skew_allowance():
    harness = rest_harness(skew=30)
    assert rest_client(harness, ttl=-20).allocate().cls == stun.SUCCESS
    assert error_code(rest_client(harness, ttl=-40, address=("198.51.100.31", 40000)).allocate()) == 401


def test_rest_secret_cannot_serve_userhash():
    checker = RestSecretChecker(SECRETS)
    assert checker.supportsSha256 and not checker.supportsUserhash


class Broken:
    credentialInterfaces = StaticUsersChecker.credentialInterfaces

    def requestAvatarId(self, credentials):
        return defer.fail(RuntimeError("database down"))


def outcome(deferred):
    results = []
    deferred.addBoth(results.append)
    return results[0]


def test_chained_checker_tries_each_backend_in_turn():
    static = StaticUsersChecker({"alice": StaticUser("acct-alice", password="wonderland")})
    rest = RestSecretChecker(SECRETS, clock=lambda: harness.now)
    chain = ChainedChecker([Broken(), static, rest])
    harness = Harness(checker=chain)
    harness.client().allocate_ok()
    rest_client(harness).allocate_ok()
    assert not chain.supportsUserhash  # REST credentials can't
    assert ChainedChecker([static]).supportsUserhash


def test_chained_checker_reports_a_backend_error_rather_than_a_refusal():
    harness = Harness(checker=ChainedChecker([Broken()]))
    client = harness.client()
    client.challenge()
    credentials = harness.server.receive(client.client, client.signed_wire(stun.ALLOCATE, [
        (stun.REQUESTED_TRANSPORT, 17)]), harness.now)
    result = outcome(harness.checker.requestAvatarId(credentials))
    assert result.check(RuntimeError) and not result.check(error.UnauthorizedLogin)
    assert isinstance(outcome(ChainedChecker([]).requestAvatarId(credentials)).value,
                      error.UnauthorizedLogin)


def test_account_allocation_quota_is_486():
    harness = Harness(checker=FixedAccount(max_allocations=1))
    first = harness.client(address=("198.51.100.20", 40000))
    first.allocate_ok()
    second = harness.client(address=("198.51.100.21", 40000))
    assert error_code(second.allocate()) == 486
    first.refresh(0)                             # its end frees the account's one allocation
    second.allocate_ok()


def test_bandwidth_cap_drops_what_exceeds_the_budget_each_second():
    harness = Harness(checker=FixedAccount(bandwidth_bps=1000))
    client = harness.client()
    client.allocate_ok()
    peer = ("8.8.8.8", 5000)
    assert client.channel_bind(0x4000, peer).cls == stun.SUCCESS
    allocation, relay = client.allocation, client.relay()
    for _ in range(3):
        allocation.from_client_channel(channel_data(0x4000, b"x" * 600))
    assert len(relay.sent) == 1                  # 600 fits, 1200 would not
    relay.deliver(b"y" * 400, peer)              # the cap covers both directions
    relay.deliver(b"y" * 1, peer)
    assert allocation.bytes_to_client == 400
    harness.advance(1)                           # the budget refills every second
    allocation.from_client_channel(channel_data(0x4000, b"x" * 600))
    assert len(relay.sent) == 2
    assert allocation.bytes_from_client == 1200
