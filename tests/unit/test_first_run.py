"""The first-run credential (relay.service.first_run) and the start banner
(relay.service.banner): made once, private, reused, off as soon as any credential source is
configured, and printed as lines to paste within the banner's 15 lines."""
import os
import platform
import shlex
import stat

import pytest

from relay.auth.checkers import StaticUsersChecker
from relay.auth.db_checker import AccountsChecker
from relay.proto import stun
from relay.service import first_run
from relay.service.banner import banner
from relay.service.options import Options
from relay.service.runtime import PYPY_GC
from relay.storage.accounts import api_key_matches


def parse(tmp_path, *argv):
    options = Options()
    options.parseOptions(["--state-dir", str(tmp_path / "state"), *argv])
    return options


@pytest.mark.parametrize("argv", [
    ["--user", "alice:secret"], ["--no-first-run"], ["--users-file", "USERS"],
    ["--auth", "rest-secret:secret-file=SECRET"],
    ["--use-auth-secret", "--static-auth-secret", "s3cret"],
])
def test_any_credential_source_or_the_option_turns_it_off(tmp_path, argv):
    (tmp_path / "USERS").write_text('[users.bob]\npassword = "x"\n')
    (tmp_path / "SECRET").write_text("secret\n")
    argv = [arg.replace("USERS", str(tmp_path / "USERS")).replace("SECRET", str(tmp_path / "SECRET"))
            for arg in argv]
    options = parse(tmp_path, *argv)
    assert first_run.apply(options) is None
    assert not (tmp_path / "state").exists() or not (tmp_path / "state" / first_run.FILE).exists()
    assert options["api-port"] is None


def test_made_once_private_and_reused(tmp_path):
    options = parse(tmp_path)
    first = first_run.apply(options)
    assert first is not None and first.made
    state = tmp_path / "state"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    for name in (first_run.FILE, first_run.SECRET_FILE, first_run.ACCOUNTS):
        assert stat.S_IMODE((state / name).stat().st_mode) == 0o600, name
    assert len(first.password) >= 24 and len(first.api_key) >= 40
    # The relay checks the password, and the tokens API is on, on loopback, on the account.
    assert [type(c) for c in options["checkers"]] == [StaticUsersChecker, AccountsChecker]
    assert options["api-port"] == first_run.API_PORT and options["api-listening-ip"] == "127.0.0.1"
    store = options["api-store"]
    record = store.run_now(lambda txn: (store._execute(
        txn, "SELECT api_key_hash FROM accounts WHERE account_id = ?", (first.username,)),
        txn.fetchone())[1])
    assert api_key_matches(record[0], first.api_key)

    again = first_run.apply(parse(tmp_path))  # the next start, or a worker
    assert again is not None and not again.made
    assert (again.username, again.password, again.api_key) == \
        (first.username, first.password, first.api_key)
    other = first_run.apply(parse(tmp_path / "elsewhere"))
    assert other is not None and other.password != first.password


def test_the_banner_is_short_and_says_what_to_paste(tmp_path):
    options = parse(tmp_path)
    first = first_run.apply(options)
    listeners = [(t, host, 3478) for host in ("0.0.0.0", "::") for t in ("udp", "tcp")]
    listeners += [("tls", host, 5349) for host in ("0.0.0.0", "::")]
    text = banner(options, 2, listeners, {stun.FAMILY_IPV4: "192.0.2.7"}, {"192.0.2.7": "192.0.2.7"},
                  [("tokens API", "http://127.0.0.1:3480/")], {}, first)
    lines = text.splitlines()
    assert len(lines) <= 15, text
    assert "udp+tcp 0.0.0.0:3478 [::]:3478, tls 0.0.0.0:5349 [::]:5349" in lines[1]
    assert "self-signed certificate" in text and first.path in text
    paste = {line.split(":", 1)[0].strip(): line.split(":", 1)[1].strip()
             for line in lines if line.startswith("  ")}
    assert shlex.split(paste["relay test"]) == [
        "turnutils_uclient", "-y", "-s", "-u", first.username, "-w", first.password,
        "127.0.0.1"]
    assert paste["browser test"] == (f"http://127.0.0.1:3480/test#account={first.username}"
                                     f"&apikey={first.api_key}&transports=udp%2Ctcp")
    assert shlex.split(paste["new token"])[-1] == \
        f"http://127.0.0.1:3480/v1/accounts/{first.username}/tokens"
    assert '"turn:192.0.2.7:3478?transport=udp"' in paste["ICE server"]
    assert os.path.basename(first.path) == first_run.FILE


def test_an_explicit_api_port_serves_the_first_run_account(tmp_path):
    options = parse(tmp_path, "--api-port", "0")  # no account database given: the first run's
    first = first_run.apply(options)
    assert first is not None and options["api-port"] == 0
    assert options["api-store"] is not None and options["api-secret"]


def test_a_single_pypy_process_is_told_how_to_start_its_collector(tmp_path, monkeypatch):
    """PyPy reads its collector's settings as it starts: the parent gives them to its workers,
    and a single process started without them says how (relay.service.runtime)."""
    monkeypatch.setattr(platform, "python_implementation", lambda: "PyPy")
    for name in PYPY_GC:
        monkeypatch.delenv(name, raising=False)
    options = parse(tmp_path)
    listeners = [("udp", "0.0.0.0", 3478)]

    def text(workers: int) -> str:
        return banner(options, workers, listeners, {stun.FAMILY_IPV4: "192.0.2.7"}, {}, [], {},
                      None)
    assert "started with PYPY_GC_NURSERY=16MB PYPY_GC_INCREMENT_STEP=2MB" in text(1)
    assert "PYPY_GC" not in text(2)  # the workers have them
    monkeypatch.setenv("PYPY_GC_NURSERY", "32MB")  # the operator's choice
    assert "PYPY_GC" not in text(1)
    monkeypatch.undo()
    assert "PYPY_GC" not in text(1)  # CPython
