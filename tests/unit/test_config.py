"""Options: coturn's names, a TOML file with the same names, one clear line per bad value."""
import subprocess

import pytest

from relay.net import dataplane
from relay.service.options import Options
from support.servers import TWISTD


def parse(*argv):
    options = Options()
    options.parseOptions(list(argv))
    return options


def test_defaults():
    options = parse()
    assert options["listening-port"] == [3478] and options["tls-listening-port"] == [5349]
    assert (options["min-port"], options["max-port"]) == (49152, 65535)
    assert options["tls-min-version"] == options["tls-max-version"] == "1.2"
    assert options["checkers"] == []


def test_the_native_data_plane_runs_by_default_where_it_was_built(monkeypatch):
    options = parse()
    assert (options["dataplane"], options["dataplane-why"]) == ("native", "the default")
    options = parse("--dataplane", "python")
    assert (options["dataplane"], options["dataplane-why"]) == ("python", "chosen by --dataplane")
    # An install without the module (no compiler, an interpreter it was not built for).
    monkeypatch.setattr(dataplane, "available", lambda: False)
    monkeypatch.setattr(dataplane, "missing", lambda: "No module named 'relay.net._dataplane'")
    options = parse()
    assert options["dataplane"] == "python"
    assert options["dataplane-why"] == \
        "native module unavailable (No module named 'relay.net._dataplane')"
    with pytest.raises(SystemExit) as exit_:
        parse("--dataplane", "native")
    assert str(exit_.value.code).startswith(
        "turnrelay: --dataplane: native: No module named 'relay.net._dataplane' (pip install . "
        "builds relay/net/_dataplane for this interpreter")


def test_toml_file_takes_the_same_names_and_the_command_line_wins(tmp_path):
    config = tmp_path / "turnrelay.toml"
    config.write_text('realm = "example.org"\nmin-port = 50000\nmax-port = 50100\n'
                      'listening-port = [3478, 443]\nuser = ["a:1", "b:2"]\n'
                      'allow-loopback-peers = true\n')
    options = parse("--config", str(config), "--max-port", "50200", "--user", "c:3")
    assert options["realm"] == "example.org"
    assert (options["min-port"], options["max-port"]) == (50000, 50200)
    assert options["listening-port"] == [3478, 443]
    (static,) = options["checkers"]
    assert set(static.users) == {"c"}  # a list on the command line replaces the file's
    assert options["allow-loopback-peers"]


def test_users_file_maps_users_to_accounts(tmp_path):
    users = tmp_path / "users.toml"
    users.write_text('[users.alice]\npassword = "pw"\naccount = "acme"\n'
                     '[users.bob]\nkey = "0123456789abcdef0123456789abcdef"\n')
    (static,) = parse("--users-file", str(users))["checkers"]
    assert static.users["alice"].account_id == "acme"
    assert static.users["alice"].password == "pw"
    assert static.users["bob"].md5_key == bytes.fromhex("0123456789abcdef0123456789abcdef")
    assert not static.supportsSha256  # an MD5 key cannot serve SHA-256


@pytest.mark.parametrize("argv, option", [
    (["--min-port", "70000"], "--min-port"),
    (["--max-channels", "many"], "--max-channels"),
    (["--min-port", "5000", "--max-port", "4000"], "--min-port"),
    (["--relay-ip", "not-an-ip"], "--relay-ip"),
    (["--relay-ip", "192.0.2.1", "--relay-ip", "192.0.2.2"], "--relay-ip"),
    (["--external-ip", "1.2.3.4/nope"], "--external-ip"),
    (["--denied-peer-ip", "10.0.0.9-10.0.0.1"], "--denied-peer-ip"),
    (["--tls-min-version", "1.0"], "--tls-min-version"),
    (["--tls-min-version", "1.3", "--tls-max-version", "1.2"], "--tls-min-version"),
    (["--cert", "only-a-cert.pem"], "--pkey"),
    (["--user", "nopassword"], "--user"),
    (["--max-allocate-lifetime", "60"], "--max-allocate-lifetime"),
    (["--listening-port", "99999"], "--listening-port"),
    (["--accounting-queue", "0"], "--accounting-queue"),
    (["--api-max-ttl", "0"], "--api-max-ttl"),  # checked with or without --api-port
])
def test_bad_values_name_the_option(argv, option):
    with pytest.raises(SystemExit) as exit_:
        parse(*argv)
    message = str(exit_.value.code)
    assert message.startswith(f"turnrelay: {option}:"), message
    assert "\n" not in message


def test_unknown_key_in_config_file_is_named(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('min_port = 50000\n')
    with pytest.raises(SystemExit) as exit_:
        parse("--config", str(config))
    assert "'min_port'" in str(exit_.value.code)


@pytest.mark.parametrize("flag", ["--config", "--users-file", "--regions-file", "--rate-table"])
def test_a_toml_file_missing_or_broken_is_one_line_naming_the_flag_and_file(tmp_path, flag):
    """Every TOML file the relay reads (relay.util.tomlfile) reports the same two faults alike."""
    missing, broken = tmp_path / "missing.toml", tmp_path / "broken.toml"
    broken.write_text("[users\n")
    with pytest.raises(SystemExit) as exit_:
        parse(flag, str(missing))
    assert exit_.value.code == f"turnrelay: {flag}: cannot read {missing}: No such file or directory"
    with pytest.raises(SystemExit) as exit_:
        parse(flag, str(broken))
    message = str(exit_.value.code)
    assert message.startswith(f"turnrelay: {flag}: cannot read {broken}: Expected ']'"), message
    assert message.endswith("(at line 1, column 7)"), message


@pytest.mark.e2e  # runs twistd turnrelay, which must refuse to start
def test_twistd_prints_one_line_for_a_bad_value():
    result = subprocess.run([TWISTD, "-n", "turnrelay", "--min-port", "70000"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == ["turnrelay: --min-port: '70000': not a port number"]


def test_metrics_and_drain_options_from_the_toml_file(tmp_path):
    options = parse()
    assert (options["prometheus"], options["prometheus-address"], options["prometheus-port"],
            options["drain-grace"]) == (0, "127.0.0.1", 9641, 20)
    assert options["alternate-server"] == options["tls-alternate-server"] == []
    config = tmp_path / "turnrelay.toml"
    config.write_text('prometheus = true\nprometheus-address = "0.0.0.0"\n'
                      'prometheus-port = 9100\ndrain-grace = 0\n'
                      'alternate-server = ["192.0.2.7:3478", "[2001:db8::7]:3478"]\n'
                      'tls-alternate-server = "192.0.2.7:443"\n'
                      'alternate-domain = "turn-b.example.org"\n')
    options = parse("--config", str(config))
    assert (options["prometheus"], options["prometheus-address"], options["prometheus-port"],
            options["drain-grace"]) == (1, "0.0.0.0", 9100, 0)
    assert options["alternate-server"] == [("192.0.2.7", 3478), ("2001:db8::7", 3478)]
    assert options["tls-alternate-server"] == [("192.0.2.7", 443)]
    assert options["alternate-domain"] == "turn-b.example.org"


@pytest.mark.parametrize("argv, option", [
    (["--prometheus-address", "localhost"], "--prometheus-address"),
    (["--prometheus-port", "70000"], "--prometheus-port"),
    (["--drain-grace", "-1"], "--drain-grace"),
    (["--alternate-server", "192.0.2.7"], "--alternate-server"),
    (["--alternate-server", "turn-b.example.org:3478"], "--alternate-server"),
    (["--tls-alternate-server", "192.0.2.7:99999"], "--tls-alternate-server"),
    (["--alternate-domain", "not a name"], "--alternate-domain"),
])
def test_bad_metrics_and_drain_values_name_the_option(argv, option):
    test_bad_values_name_the_option(argv, option)


def test_monthly_quotas_from_the_toml_file_and_the_users_file(tmp_path):
    config = tmp_path / "turnrelay.toml"
    config.write_text("monthly-quota-mb = 0.25\n")
    assert parse("--config", str(config))["monthly-quota-bytes"] == 250_000
    assert parse()["monthly-quota-bytes"] == 0
    users = tmp_path / "users.toml"
    users.write_text('[users.alice]\npassword = "pw"\naccount = "acme"\n'
                     '[users.bob]\npassword = "pw"\n[accounts.acme]\nmonthly-quota-mb = 3\n')
    (static,) = parse("--users-file", str(users))["checkers"]
    assert static.users["alice"].monthly_quota_bytes == 3_000_000
    assert static.users["bob"].monthly_quota_bytes is None  # the relay-wide quota
    users.write_text('[users.alice]\npassword = "pw"\n[accounts.alice]\nmonthly-quota-mb = -1\n')
    with pytest.raises(SystemExit) as exit_:
        parse("--users-file", str(users))
    assert str(exit_.value.code) == (f"turnrelay: --users-file: {users}: account 'alice': "
                                     "monthly-quota-mb: must be 0 (unlimited) or more megabytes")
