"""Auth backends chosen on the command line, over real sockets with real clients."""
import base64
import signal
import subprocess
import textwrap
import time

import pytest

from relay.auth import tokens
from relay.core.nonces import COOKIE, FEATURE_USERNAME_ANONYMITY
from relay.proto import stun
from support.aioice_client import relay_round_trips
from support.servers import REALM, TWISTD, running_echo_peer, start_server, tool
from support.wire_client import WireClient

SECRET = "s3cr3t-for-rest-credentials"


def test_help_auth_lists_the_built_in_backends():
    result = subprocess.run([TWISTD, "-n", "turnrelay", "--help-auth"], capture_output=True,
                            text=True, timeout=60)
    for backend in ("static", "rest-secret", "db"):
        assert f"\n  {backend}" in result.stdout, result.stdout


def allocation_refused(server, username, password):
    with pytest.raises(Exception) as refused:
        relay_round_trips(server, username, password)
    return "401" in str(refused.value) or "Unauthorized" in str(refused.value)


def test_rest_secret_tokens_with_aioice(server_factory, tmp_path):
    secret_file = tmp_path / "rest.secret"
    secret_file.write_text("new-secret\n" + SECRET + "\n")
    server = server_factory("--auth", f"rest-secret:secret-file={secret_file}", users=())
    username, password = tokens.mint(SECRET.encode(), "acme", 3600, time.time(), "call-1")
    relay_round_trips(server, username, password)
    expired = tokens.mint(b"new-secret", "acme", -120, time.time())
    assert allocation_refused(server, *expired)
    log = server.stop()
    assert "account=acme" in log
    for secret in ("new-secret", SECRET, password, expired[1]):
        assert secret not in log


def test_coturn_uclient_with_a_rest_secret(server_factory):
    # uclient picks channel numbers in RFC 5766's range.
    server = server_factory("--use-auth-secret", "--static-auth-secret", SECRET, "--rfc5766-channels",
                            users=(), tls=False)
    with running_echo_peer() as peer:
        result = subprocess.run(
            [tool("turnutils_uclient"), "-W", SECRET, "-u", "acme", "-p", str(server.port),
             "-e", peer[0], "-r", str(peer[1]), "-n", "10", "-m", "1", server.host],
            capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert "tot_send_msgs=20, tot_recv_msgs=20" in output, output  # an RTP/RTCP pair
    log = server.stop()
    assert "account=acme" in log and SECRET not in log


PLUGIN = '''
from twisted.cred import error
from twisted.cred.strcred import ICheckerFactory
from twisted.internet import defer
from twisted.plugin import IPlugin
from zope.interface import implementer

from relay.core.credentials import Account

from relay.auth.cred import IStunCredentials


class GuestChecker:
    credentialInterfaces = (IStunCredentials,)

    def __init__(self, password):
        self.password = password

    def requestAvatarId(self, credentials):
        if credentials.username == "guest" and credentials.checkPassword("guest", self.password):
            return defer.succeed(Account("third-party-guest"))
        return defer.fail(error.UnauthorizedLogin())


@implementer(ICheckerFactory, IPlugin)
class GuestFactory:
    authType = "guest"
    authHelp = "One guest user; a third party's plugin."
    argStringFormat = "PASSWORD"
    credentialInterfaces = (IStunCredentials,)

    def generateChecker(self, argstring):
        return GuestChecker(argstring)


guest = GuestFactory()
'''


def test_third_party_backend_from_its_own_directory(tmp_path, monkeypatch):
    plugins = tmp_path / "thirdparty" / "twisted" / "plugins"
    plugins.mkdir(parents=True)
    (plugins / "guest_auth.py").write_text(textwrap.dedent(PLUGIN))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "thirdparty"))
    server = start_server("--auth", "guest:let-me-in", users=(), state_dir=str(tmp_path / "state"))
    try:
        relay_round_trips(server, "guest", "let-me-in")
        assert allocation_refused(server, "guest", "wrong")
    finally:
        log = server.stop()
    assert "account=third-party-guest" in log
    assert "let-me-in" not in log


def test_unknown_backend_is_one_clear_line():
    result = subprocess.run([TWISTD, "-n", "turnrelay", "--auth", "nosuch:x=1"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert result.stderr.strip() == ("turnrelay: --auth: 'nosuch' is not an installed backend "
                                     "(see --help-auth)")


def test_backend_argument_errors_do_not_echo_values(tmp_path):
    result = subprocess.run([TWISTD, "-n", "turnrelay", "--auth",
                             "rest-secret:secret-file=/no/such/secret-path"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert result.stderr.strip().startswith("turnrelay: --auth: rest-secret: secret-file:")
    assert "secret-path" not in result.stderr


def challenge(server):
    """The 401 an unauthenticated Allocate gets: what the server advertises."""
    client = WireClient((server.host, server.port), "nobody", "nothing", REALM)
    try:
        return client.exchange(stun.Message(stun.ALLOCATE, stun.REQUEST).add(stun.REQUESTED_TRANSPORT, 17))
    finally:
        client.close()


def features(nonce):
    assert nonce.startswith(COOKIE)
    return int.from_bytes(base64.b64decode(nonce[len(COOKIE):len(COOKIE) + 4]), "big")


@pytest.mark.parametrize("args, users, algorithms, userhash", [
    ((), (("alice", "wonderland"),), [stun.ALGORITHM_SHA256, stun.ALGORITHM_MD5], True),
    ((), (("alice", "0x" + "ab" * 16),), [stun.ALGORITHM_MD5], False),  # an MD5 key: no SHA-256
    (("--use-auth-secret", "--static-auth-secret", SECRET), (("alice", "wonderland"),),
     [stun.ALGORITHM_SHA256, stun.ALGORITHM_MD5], False),               # REST: no USERHASH
])
def test_only_what_every_backend_serves_is_advertised(server_factory, args, users, algorithms,
                                                      userhash):
    reply = challenge(server_factory(*args, users=users, tcp=False, tls=False))
    assert [alg for alg, _ in reply.get(stun.PASSWORD_ALGORITHMS)] == algorithms
    assert bool(features(reply.get(stun.NONCE)) & FEATURE_USERNAME_ANONYMITY) == userhash


def test_sighup_reloads_the_users_file(server_factory, tmp_path):
    users = tmp_path / "users.toml"
    users.write_text('[users.alice]\npassword = "wonderland"\n')
    server = server_factory("--auth", f"static:file={users}", users=(), tcp=False, tls=False)
    relay_round_trips(server, "alice", "wonderland")
    users.write_text('[users.bob]\npassword = "builder"\naccount = "construction"\n')
    server.process.send_signal(signal.SIGHUP)
    server.read_until("credentials reloaded")
    relay_round_trips(server, "bob", "builder")
    assert allocation_refused(server, "alice", "wonderland")
    assert "account=construction" in server.stop()
