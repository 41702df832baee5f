"""`twistd turnrelay` options: coturn's flag names, a TOML file with the same names, validation.

Precedence: built-in default < `--config` file < command line.  A list option given on the
command line replaces the file's list rather than adding to it, so an operator can always see
the effective value in one place.  Every check in `postOptions` names the option it rejects.
"""
from __future__ import annotations

import ipaddress
import os
import sys
from typing import Any, Dict, List, NoReturn, Tuple

from twisted.cred import strcred
from twisted.python import usage

from relay.auth.checkers import RestSecretChecker, StaticUsersChecker, parse_user
from relay.auth.cred import IStunCredentials
from relay.auth.db_checker import DB_ARGUMENTS
from relay.core.peers import is_ip, parse_rule
from relay.ledger.jsonl import JsonLinesBackend
from relay.ledger.plugins import installed, make_backend
from relay.ledger.pricing import RateError, rates_from_options
from relay.ledger.writer import WHEN_FULL
from relay.net import dataplane
from relay.net.proxy_protocol import ProxyTrust, parse_networks
from relay.net.tls import TLS_VERSIONS
from relay.service import first_run
from relay.service.host import usable_cpus
from relay.service.loglevel import LEVELS
from relay.storage.accounts import AccountStore
from relay.util.argstring import parse_arguments
from relay.util.secretfile import read_secrets
from relay.util.tomlfile import read_toml
from relay.util.units import parse_megabytes
from relay.web.regions import check_host, regions_from_table


def _port(value: str) -> int:
    port = int(value)
    if not 0 <= port <= 65535:
        raise ValueError("not a port number")
    return port


def _non_negative(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError("must not be negative")
    return number


def _at_least_one(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError("must be at least 1")
    return number


# Whole-number options and their checks, applied in postOptions so an error names the option.
NUMBER_OPTIONS = {
    "min-port": _port, "max-port": _port, "max-allocate-lifetime": _non_negative,
    "stale-nonce": _non_negative, "user-quota": _non_negative, "source-quota": _non_negative,
    "total-quota": _non_negative, "max-bps": _non_negative, "max-pps": _non_negative,
    "account-max-bps": _non_negative, "account-max-pps": _non_negative,
    "max-permissions": _non_negative, "max-channels": _non_negative,
    "api-port": _port, "api-max-ttl": _at_least_one, "api-key-failures-per-minute": _at_least_one,
    "api-browser-requests-per-minute": _at_least_one,
    "source-connection-quota": _non_negative,
    "tls-handshake-timeout": _non_negative, "connection-idle-timeout": _non_negative,
    "accounting-interval": _at_least_one, "accounting-queue": _at_least_one,
    "client-address-retention": _non_negative,
    "prometheus-port": _port, "drain-grace": _non_negative,
    "tcp-bind-timeout": _non_negative, "tcp-idle-timeout": _non_negative,
    "workers": _at_least_one, "proxy-protocol-timeout": _non_negative,
}

# Peer address rules: list options that a SIGHUP re-reads from the --config file.
PEER_RULES = ("allowed-peer-ip", "denied-peer-ip", "cluster-cidr")

LIST_OPTIONS = {
    "listening-ip": "Address to listen on; repeat for several [default: 0.0.0.0 and ::]",
    "listening-port": "UDP and TCP port; repeat for several [default: 3478]",
    "tls-listening-port": "TLS port; repeat for several, e.g. 443 [default: 5349]",
    "dtls-listening-port": "DTLS (UDP) port for --dtls; repeat for several [default: the "
                           "TLS ports]",
    "relay-ip": "Address relay sockets bind to, at most one per family [default: this host's "
                "outbound IPv4 and IPv6 addresses]",
    "external-ip": "Address clients see in XOR-RELAYED-ADDRESS: PUBLIC, or PUBLIC/RELAY-IP to map "
                   "one relay address behind NAT; repeat per relay address",
    "user": "Long-term credential NAME:PASSWORD, or NAME:0xKEY with the MD5 key "
            "turnadmin -k prints; repeat for several",
    "allowed-peer-ip": "Peer address, CIDR or FIRST-LAST range to allow even if denied or "
                       "private; repeat for several",
    "denied-peer-ip": "Peer address, CIDR or FIRST-LAST range to refuse; repeat for several",
    "cluster-cidr": "Kubernetes pod or service network (CIDR or FIRST-LAST range) to refuse as "
                    "a peer even where --allowed-peer-ip or --allow-loopback-peers would allow "
                    "it; repeat for several",
    "auth": "Auth backend TYPE:ARGS, e.g. static:file=users.toml, rest-secret:secret-file=PATH, "
            "db:dsn=...,secret-file=PATH; repeat to combine (see --help-auth)",
    "static-auth-secret": "Secret for TURN REST credentials (coturn's option); repeat to "
                          "accept several during rotation. Prefer --auth rest-secret:secret-file=",
    "alternate-server": "IP:PORT ([IPv6]:PORT) of another relay of this region, where a "
                        "draining or full (--total-quota) relay redirects new UDP and TCP "
                        "allocations (300 Try Alternate); repeat for several, one per family "
                        "at least [default: the nearest serving region of --regions-file, "
                        "else refuse them with 508]",
    "tls-alternate-server": "IP:PORT the same for TLS clients",
    "proxy-protocol-from": "Load balancer address or CIDR network whose connections start "
                           "with a PROXY protocol header (v1 or v2) naming the real client; "
                           "repeat for several. With any given, the TCP and TLS listeners and "
                           "the tokens API take connections only from these, each with a "
                           "header [default: no PROXY protocol]",
    "accounting": "Usage ledger backend NAME:ARGS, e.g. sqlite:path=PATH, postgresql:dsn=..., "
                  "jsonl:path=PATH; repeat to write to several [default: sqlite, usage.db in "
                  "--state-dir] (see --help-accounting)",
}


class Options(strcred.AuthOptionMixin, usage.Options):
    synopsis = "[options]"
    supportedInterfaces = (IStunCredentials,)
    longdesc = ("Serve STUN (RFC 8489) and TURN (RFC 8656) over UDP, TCP and TLS. Flag names "
                "follow coturn's; --config reads the same names from a TOML file.")

    optFlags = [
        ["no-udp", None, "Do not listen on UDP"],
        ["no-tcp", None, "Do not listen on TCP"],
        ["no-tls", None, "Do not listen on TLS"],
        ["dtls", None, "Also listen on DTLS 1.2 over UDP (RFC 7350), on --dtls-listening-port, "
                       "with the TLS certificate and policy"],
        ["allow-loopback-peers", None, "Allow relaying to 127.0.0.0/8 and ::1 (testing only)"],
        ["no-software-attribute", None, "Do not send the SOFTWARE attribute"],
        ["no-tcp-relay", None, "Refuse TCP allocations (RFC 6062) with 442"],
        ["use-auth-secret", None, "Accept TURN REST credentials made with --static-auth-secret "
                                  "(coturn's switch; the same as --auth rest-secret)"],
        ["rfc5766-channels", None, "Also accept channel numbers 0x5000-0x7FFF (RFC 5766's "
                                   "range, which coturn's turnutils_uclient uses); RFC 8656 "
                                   "allows only 0x4000-0x4FFF"],
        ["strict-expiry", None, "Also close allocations whose time-limited credential has "
                                "expired (by default they live on until they end)"],
        ["api-on-tls-port", None, "Also serve the tokens API (and /test, /metrics, /healthz, "
                                  "/readyz) on the TLS listening ports, told from TURN by ALPN "
                                  "(stun.turn) or the first bytes: one port 443 for turns: and "
                                  "HTTPS; needs --api-port"],
        ["api-on-tcp-port", None, "The same on the plain TCP listening ports, for a "
                                  "TLS-terminating balancer in front; needs --api-port and "
                                  "loopback --listening-ip or --proxy-protocol-from"],
        ["no-first-run", None, "With no credential configured, make no first-run account "
                               "(every TURN request is then refused) [default: make one in "
                               "--state-dir, and serve the tokens API on loopback]"],
        ["prometheus", None, "Serve /metrics (Prometheus), /healthz and /readyz on "
                             "--prometheus-address and --prometheus-port"],
    ]
    optParameters = [
        ["config", "c", None, "TOML file with these options (command line wins)"],
        ["realm", "r", None, "Realm of the long-term credentials [default: host name]"],
        ["users-file", None, None, "TOML file of users: [users.NAME] password=... or key=..., "
                                   "optional account=..."],
        ["min-port", None, 49152, "Lowest relay port"],
        ["max-port", None, 65535, "Highest relay port"],
        ["max-allocate-lifetime", None, 3600, "Longest allocation lifetime in seconds"],
        ["stale-nonce", None, 600, "Seconds a nonce stays valid"],
        ["user-quota", None, 0, "Concurrent allocations per user (0: no limit)"],
        ["source-quota", None, 0, "Concurrent allocations per client IP (0: no limit)"],
        ["total-quota", None, 0, "Concurrent allocations in all, over every worker; beyond, "
                                "new ones are redirected to another relay (300) or refused "
                                "(508) (0: no limit)"],
        ["max-bps", None, 0, "Bytes per second one allocation may relay, both directions "
                             "together; excess is dropped (0: no limit)"],
        ["max-pps", None, 0, "Packets per second one allocation may relay, both directions "
                             "together (0: no limit)"],
        ["account-max-bps", None, 0, "Bytes per second all of one account's allocations on "
                                     "this relay may relay together (0: no limit)"],
        ["account-max-pps", None, 0, "Packets per second all of one account's allocations "
                                     "on this relay may relay together (0: no limit)"],
        ["max-permissions", None, 64, "Permissions per allocation"],
        ["source-connection-quota", None, 64, "Open TCP/TLS connections per client IP; more "
                                              "are reset at once (0: no limit)"],
        ["tls-handshake-timeout", None, 10, "Seconds a TLS client has to finish its handshake "
                                            "(0: no limit)"],
        ["connection-idle-timeout", None, 60, "Seconds a TCP/TLS connection may stay open "
                                              "without an allocation (0: no limit)"],
        ["max-channels", None, 64, "Channels per allocation"],
        ["tcp-bind-timeout", None, 30, "Seconds a TCP allocation's peer connection waits for "
                                       "the client's ConnectionBind before it is closed"],
        ["tcp-idle-timeout", None, 600, "Seconds a bound TCP data connection may carry nothing "
                                        "either way before it is closed"],
        ["cert", None, None, "TLS certificate chain, PEM [default: a self-signed one made on "
                             "first run in --state-dir]"],
        ["pkey", None, None, "TLS private key, PEM"],
        ["tls-min-version", None, "1.2", "Lowest TLS version: 1.2 or 1.3"],
        ["tls-max-version", None, "1.2", "Highest TLS version: 1.2 or 1.3"],
        ["nonce-secret-file", None, None, "File with the nonce key (a second line: the previous "
                                          "key, during rotation); share it across a fleet "
                                          "[default: a random key per process]"],
        ["state-dir", None, os.path.join(os.path.expanduser("~"), ".local", "state", "turnrelay"),
         "Directory for generated state (self-signed certificate)"],
        ["api-port", None, None, "Serve the tokens API (POST /v1/accounts/ACCOUNT/tokens) on "
                                 "this TCP port [default: no API]"],
        ["api-listening-ip", None, "127.0.0.1", "Address the tokens API listens on; any but a "
                                                "loopback address needs --api-cert"],
        ["api-cert", None, None, "TLS certificate chain for the tokens API, PEM"],
        ["api-pkey", None, None, "TLS private key for the tokens API, PEM"],
        ["api-db", None, None, "Account database of the tokens API, sqlite:///PATH or "
                               "postgresql://... [default: the dsn of the first --auth db:]"],
        ["api-secret-file", None, None, "Secret file the tokens API mints with (its first "
                                        "line) [default: the secret-file of the first "
                                        "--auth db:]"],
        ["api-max-ttl", None, 86400, "Longest credential lifetime the tokens API grants, in "
                                     "seconds; a request without ttl gets 86400 or this, if "
                                     "lower"],
        ["api-key-failures-per-minute", None, 60, "Failed API key checks an address may make "
                                                  "per minute after a burst of 10 (429 beyond)"],
        ["api-browser-requests-per-minute", None, 60, "Requests with a browser key (POST "
                                                      "/v1/ice-servers) an address may make per "
                                                      "minute (429 beyond)"],
        ["region", None, "default", "Name of this relay's region in tokens API answers and in "
                                    "the usage ledger"],
        ["accounting-interval", None, 10, "Seconds between two usage records of a session"],
        ["accounting-queue", None, 100000, "Usage records held for a backend that cannot keep "
                                           "up, at most"],
        ["monthly-quota-mb", None, "0", "Billable megabytes (10^6 bytes, sent plus received) "
                                        "an account may relay per calendar month, UTC, unless "
                                        "its account database entry sets its own (0: no "
                                        "limit); needs a sqlite or postgresql --accounting"],
        ["accounting-full", None, "refuse", "When that queue is full: refuse (new allocations "
                                            "get 508) or drop (new sessions go unrecorded)"],
        ["rate-per-mb", None, None, "Charge per MB (10^6 bytes) of --region's usage, a decimal "
                                    "such as 0.0004, in effect since always [default: none]"],
        ["client-address-retention", None, None, "Days after a session's end its client "
                                                  "address is blanked in the SQL ledgers (0: "
                                                  "at once), its usage kept [default: kept]"],
        ["rate-table", None, None, "TOML file of rates per region with the time each takes "
                                   "effect: [[rates.REGION]] rate_per_mb=..., effective=..."],
        ["public-host", None, None, "Host name or address put in the tokens API's ICE server "
                                    "URLs [default: the first --external-ip, else the first "
                                    "--relay-ip, else the detected relay address]"],
        ["prometheus-port", None, 9641, "TCP port of --prometheus"],
        ["proxy-protocol-timeout", None, 5, "Seconds a --proxy-protocol-from balancer has to "
                                            "send a connection's PROXY header (0: no limit)"],
        ["drain-grace", None, 20, "On SIGTERM, seconds live allocations may run on while new "
                                  "ones are refused (0: end them at once)"],
        ["alternate-servers-file", None, None, "File of turn:/turns: URIs (RFC 7065), one a "
                                               "line, e.g. a TurnRegion's endpoints: a draining "
                                               "or full relay also redirects new allocations "
                                               "to these (UDP, TCP to turn:, TLS to turns:), "
                                               "its own left out; re-read when it changes, "
                                               "absent means none"],
        ["alternate-domain", None, None, "Domain name in ALTERNATE-DOMAIN of redirections to "
                                         "--tls-alternate-server: what the TLS client checks "
                                         "the alternate's certificate against"],
        ["prometheus-address", None, "127.0.0.1", "Address --prometheus listens on"],
        ["workers", None, None, "Relay processes sharing the listening ports (SO_REUSEPORT), "
                                "each with its slice of the relay ports; 1: one process "
                                "[default: the CPUs this process may use, cgroup limits "
                                "included]"],
        ["log-level", None, "info", "What the log shows: debug (every listener, worker and "
                                    "backend as it starts), info (a start banner, "
                                    "allocations, reloads), warn or error"],
        ["dataplane", None, None, "What relays UDP clients' datagrams: native (a C thread "
                                  "per process, relay/net/dataplane.c) or python (the "
                                  "reactor) [default: native where its module was built, "
                                  "python otherwise]"],
        ["regions-file", None, None, "TOML file of other regions for the tokens API's region "
                                     "parameter: [regions.NAME] host=..., port=3478, "
                                     "tls-port=5349, latitude=..., longitude=..., ready=true, "
                                     "draining=false; re-read when it changes. A draining "
                                     "or full relay redirects to the nearest serving one"],
        ["geoip-db", None, None, "MaxMind or DB-IP city database (.mmdb) locating the tokens "
                                 "API's end users, whose nearest ready region comes first"],
    ]

    def __init__(self) -> None:
        super().__init__()
        for name in LIST_OPTIONS:
            self[name] = []
        self._from_command_line: set = set()

    def _add(self, name: str, value: str) -> None:
        if name not in self._from_command_line:
            self._from_command_line.add(name)
            self[name] = []
        self[name].append(value)

    def parseOptions(self, options: List[str] = None) -> None:
        """Parse, and on a bad value exit with one line naming the option.

        twistd answers a UsageError by printing its whole help text above the error; an
        operator whose config has one typo should see the one line that matters.
        """
        argv = sys.argv[1:] if options is None else options
        # Worker processes (relay.service.workers) parse the same arguments again.
        self.argv = list(argv)
        try:
            path = _config_path(argv)
            if path is not None:
                self._load_config(path)
            super().parseOptions(argv)
        except usage.UsageError as err:
            raise SystemExit(f"turnrelay: {err}") from None

    def _load_config(self, path: str) -> None:
        table = _read_config(path)
        known = {p[0]: p for p in self.optParameters}
        flags = {f[0] for f in self.optFlags}
        for name, value in table.items():
            if name in LIST_OPTIONS:
                self[name] = _list_value(value)
            elif name in flags:
                if not isinstance(value, bool):
                    raise usage.UsageError(f"--{name}: expected true or false in {path}")
                self[name] = int(value)
            elif name in known and name != "config":
                self[name] = str(value)
            else:
                raise usage.UsageError(f"{path}: unknown option {name!r}")

    def postOptions(self) -> None:
        for name, check in NUMBER_OPTIONS.items():
            if self[name] is None:  # an optional number not given: the feature is off
                continue
            try:
                self[name] = check(str(self[name]))
            except ValueError as err:
                problem = "not a whole number" if "invalid literal" in str(err) else err
                _fail(name, f"{self[name]!r}: {problem}")
        for name in ("listening-port", "tls-listening-port", "dtls-listening-port"):
            try:
                default = {"listening-port": [3478], "tls-listening-port": [5349],
                           "dtls-listening-port": self["tls-listening-port"]}[name]
                self[name] = [_port(p) for p in self[name]] or default
            except ValueError:
                _fail(name, f"{self[name]} is not a list of port numbers")
        self._choose_dataplane()
        if self["dtls"] and not self["no-udp"] and \
                set(self["dtls-listening-port"]) & set(self["listening-port"]):
            _fail("dtls-listening-port", "a UDP port cannot serve both TURN over UDP and DTLS")
        for name in ("listening-ip", "relay-ip"):
            for value in self[name]:
                if not is_ip(value):
                    _fail(name, f"{value!r} is not an IP address")
        families = [":" in ip for ip in self["relay-ip"]]
        if len(families) != len(set(families)):
            _fail("relay-ip", "give at most one IPv4 and one IPv6 address")
        self["external-map"] = {}
        for value in self["external-ip"]:
            public, _, private = value.partition("/")
            if not is_ip(public) or (private and not is_ip(private)):
                _fail("external-ip", f"{value!r} is not PUBLIC or PUBLIC/RELAY-IP")
            self["external-map"][private or None] = public
        if self["min-port"] > self["max-port"] or self["min-port"] < 1024:
            _fail("min-port", f"relay ports {self['min-port']}-{self['max-port']} must be an "
                              "ascending range above 1023")
        ports = self["max-port"] - self["min-port"] + 1
        if self["workers"] is None:
            self["workers"] = min(usable_cpus(), ports)
        if ports < self["workers"]:
            _fail("workers", f"{self['workers']} workers cannot each have a share of the relay "
                             f"ports {self['min-port']}-{self['max-port']}")
        if self["max-allocate-lifetime"] < 600:
            _fail("max-allocate-lifetime", "must be at least the default lifetime, 600")
        if self["log-level"] not in LEVELS:
            _fail("log-level", f"{self['log-level']!r}: choose one of {', '.join(LEVELS)}")
        for name in ("tls-min-version", "tls-max-version"):
            if self[name] not in TLS_VERSIONS:
                _fail(name, f"{self[name]!r}: choose one of {', '.join(TLS_VERSIONS)}")
        if float(self["tls-min-version"]) > float(self["tls-max-version"]):
            _fail("tls-min-version", "is above --tls-max-version")
        for cert, key in (("cert", "pkey"), ("api-cert", "api-pkey")):
            if bool(self[cert]) != bool(self[key]):
                _fail(cert if not self[cert] else key, f"--{cert} and --{key} go together")
        _check_peer_rules({name: self[name] for name in PEER_RULES})
        self["proxy-trust"] = None
        if self["proxy-protocol-from"]:
            try:
                networks = parse_networks(self["proxy-protocol-from"])
            except ValueError as err:
                _fail("proxy-protocol-from", str(err))
            self["proxy-trust"] = ProxyTrust(networks, self["proxy-protocol-timeout"])
        if self["no-udp"] and self["no-tcp"] and self["no-tls"]:
            _fail("no-udp", "with --no-tcp and --no-tls nothing is left to listen on")
        self.resolve_credentials()
        self._accounting()
        for name in ("alternate-server", "tls-alternate-server"):
            try:
                self[name] = [_ip_port(value) for value in self[name]]
            except ValueError as err:
                _fail(name, str(err))
        if self["alternate-domain"] is not None:
            try:
                check_host(self["alternate-domain"])
            except ValueError as err:
                _fail("alternate-domain", str(err))
        if not is_ip(self["prometheus-address"]):
            _fail("prometheus-address", f"{self['prometheus-address']!r} is not an IP address")

    def resolve_credentials(self) -> None:
        """The auth backends and the tokens API's settings, from the options (again, once
        relay.service.first_run has added its own)."""
        self["checkers"] = self._checkers()
        self._tokens_api()

    def _checkers(self) -> list:
        """The auth backends, in the order they are tried: static users first."""
        checkers = []
        users = {}
        for spec in self["user"]:
            try:
                name, user = parse_user(spec)
            except ValueError as err:
                _fail("user", str(err))
            users[name] = user
        if users or self["users-file"]:
            try:
                checkers.append(StaticUsersChecker(users, self["users-file"]))
            except ValueError as err:
                _fail("users-file", str(err))
        for description in self["auth"]:
            auth_type = description.split(":", 1)[0]
            try:
                checker = strcred.makeChecker(description)
            except strcred.InvalidAuthType:
                _fail("auth", f"{auth_type!r} is not an installed backend (see --help-auth)")
            except ValueError as err:
                _fail("auth", f"{auth_type}: {err}")
            if IStunCredentials not in checker.credentialInterfaces:
                _fail("auth", f"{auth_type}: does not check STUN long-term credentials")
            checkers.append(checker)
        if self["use-auth-secret"] or self["static-auth-secret"]:
            if not self["static-auth-secret"]:
                _fail("use-auth-secret", "needs --static-auth-secret")
            checkers.append(RestSecretChecker([s.encode() for s in self["static-auth-secret"]]))
        for checker in checkers:
            if hasattr(checker, "strict_expiry"):
                checker.strict_expiry = bool(self["strict-expiry"])
        return checkers

    def _choose_dataplane(self) -> None:
        """--dataplane, and why it runs (`dataplane-why`, for the banner): native by default
        where its module was built, python otherwise; native asked for without it is refused."""
        if self["dataplane"] is None:
            if dataplane.available():
                self["dataplane"], self["dataplane-why"] = "native", "the default"
            else:
                self["dataplane"] = "python"
                self["dataplane-why"] = f"native module unavailable ({dataplane.missing()})"
            return
        if self["dataplane"] not in ("native", "python"):
            _fail("dataplane", f"{self['dataplane']!r} is neither native nor python")
        if self["dataplane"] == "native" and not dataplane.available():
            _fail("dataplane", f"native: {dataplane.missing()} (pip install . builds "
                               "relay/net/_dataplane for this interpreter with a C compiler)")
        self["dataplane-why"] = "chosen by --dataplane"

    def peer_rules_now(self) -> Dict[str, List[str]]:
        """The peer rules (`PEER_RULES`) as the --config file has them now, for a SIGHUP; those
        given on the command line stay.  UsageError naming the option for a bad one."""
        rules = {name: list(self[name]) for name in PEER_RULES}
        if self["config"]:
            table = _read_config(self["config"])
            for name in PEER_RULES:
                if name not in self._from_command_line:
                    rules[name] = _list_value(table.get(name, []))
        _check_peer_rules(rules)
        return rules

    def opt_help_accounting(self) -> None:
        """List the installed usage ledger backends (--accounting) and exit"""
        print("Usage ledger backends (--accounting NAME:ARGS):")
        for name, factory in sorted(installed().items()):
            print(f"  {name}:{factory.argStringFormat}\n      {factory.help}")
        raise SystemExit(0)

    def _accounting(self) -> None:
        """The usage ledger's backends, each named for the log by its NAME (NAME-2 for a second
        of the same kind); with none given, tap.py makes the embedded default."""
        if self["accounting-full"] not in WHEN_FULL:
            _fail("accounting-full", f"{self['accounting-full']!r}: choose one of "
                                     f"{', '.join(WHEN_FULL)}")
        try:
            self["rates"] = rates_from_options(self["region"], self["rate-per-mb"],
                                               self["rate-table"])
        except RateError as err:
            _fail(err.option, err.problem)
        try:
            self["monthly-quota-bytes"] = parse_megabytes(str(self["monthly-quota-mb"]))
        except ValueError as err:
            _fail("monthly-quota-mb", f"{self['monthly-quota-mb']!r}: {err}")
        self["usage-backends"] = {}
        for description in self["accounting"]:
            try:
                name, backend = make_backend(description)
            except ValueError as err:
                _fail("accounting", str(err))
            if isinstance(backend, JsonLinesBackend) and self["workers"] > 1:
                # Its file is written by one process only (a failed write is cut off again).
                _fail("accounting", f"{description}: a JSON lines file takes one process's "
                                    f"records: add --workers 1, or use sqlite or postgresql")
            label, n = name, 1
            while label in self["usage-backends"]:
                n += 1
                label = f"{name}-{n}"
            self["usage-backends"][label] = backend

    def _tokens_api(self) -> None:
        """The tokens API's settings: its store, minting secret and regions when --api-port
        is given.  TLS is required off loopback, since every request carries an API key."""
        self["regions"] = {}
        if self["regions-file"]:
            try:
                self["regions"] = regions_from_table(read_toml(self["regions-file"]))
            except ValueError as err:
                _fail("regions-file", str(err))
        self["geoip"] = None
        if self["geoip-db"]:
            # Imported only here: the maxminddb reader is about 40 ms of every
            # process's start (the parent and each worker) for a relay that reads no database.
            from relay.web.geoip import GeoIP
            try:
                self["geoip"] = GeoIP(self["geoip-db"])
            except ValueError as err:
                _fail("geoip-db", str(err))
        if self["public-host"]:
            try:
                check_host(self["public-host"])
            except ValueError as err:
                _fail("public-host", str(err))
        if not self["region"]:
            _fail("region", "must not be empty")
        if self["api-port"] is None:
            for name in ("api-on-tls-port", "api-on-tcp-port"):
                if self[name]:
                    _fail(name, "needs --api-port (and the tokens API's settings)")
            return
        if self["api-on-tcp-port"] and not self["proxy-protocol-from"] and not all(
                ipaddress.ip_address(ip).is_loopback for ip in self["listening-ip"] or ["::"]):
            _fail("api-on-tcp-port", "API keys must not cross a network in clear: listen on "
                                     "loopback, behind a TLS-terminating balancer "
                                     "(--proxy-protocol-from), or use --api-on-tls-port")
        if self["api-on-tls-port"] and self["no-tls"]:
            _fail("api-on-tls-port", "there is no TLS listener (--no-tls)")
        if not is_ip(self["api-listening-ip"]):
            _fail("api-listening-ip", f"{self['api-listening-ip']!r} is not an IP address")
        if not self["api-cert"] and not ipaddress.ip_address(self["api-listening-ip"]).is_loopback:
            _fail("api-cert", f"required when --api-listening-ip {self['api-listening-ip']} is "
                              "not a loopback address: API keys must not cross a network in clear")
        db = _first_db_auth(self["auth"])
        if not db and first_run.wanted(self):
            return  # its account database comes with the first-run credential (first_run.apply)
        dsn = self["api-db"] or db.get("dsn")
        secret_file = self["api-secret-file"] or db.get("secret-file")
        if not dsn:
            _fail("api-db", "the tokens API needs the account database: give it or "
                            "--auth db:dsn=...,secret-file=...")
        if not secret_file:
            _fail("api-secret-file", "the tokens API needs the secret its credentials are "
                                     "minted with: give it or --auth db:...,secret-file=...")
        try:
            self["api-store"] = AccountStore.from_dsn(dsn)
        except ValueError as err:
            _fail("api-db", str(err))
        try:
            self["api-secret"] = read_secrets(secret_file)[0]
        except OSError as err:
            _fail("api-secret-file", err.strerror)
        except ValueError:
            _fail("api-secret-file", "holds no secret")


def _list_option(name: str, doc: str) -> Any:
    def opt(self: Options, value: str) -> None:
        self._add(name, value)
    opt.__doc__ = doc  # usage.Options documents an option by its opt_ method's docstring
    return opt


for _name, _doc in LIST_OPTIONS.items():
    setattr(Options, "opt_" + _name.replace("-", "_"), _list_option(_name, _doc))


def _fail(option: str, problem: str) -> NoReturn:
    """Reject the command line (or --config file) naming the option at fault."""
    raise usage.UsageError(f"--{option}: {problem}")


def _list_value(value: Any) -> List[str]:
    """A list option's value in a TOML file: a list, or one value alone."""
    return [str(v) for v in (value if isinstance(value, list) else [value])]


def _check_peer_rules(rules: Dict[str, List[str]]) -> None:
    for name, values in rules.items():
        for value in values:
            try:
                parse_rule(value)
            except ValueError:
                _fail(name, f"{value!r} is not an address, CIDR network or FIRST-LAST range")


def _read_config(path: str) -> Dict[str, Any]:
    """The --config file's table, or the command line rejected naming --config."""
    try:
        return read_toml(path)
    except ValueError as err:
        _fail("config", str(err))


def _first_db_auth(descriptions: List[str]) -> Dict[str, str]:
    """The arguments of the first `--auth db:...`, already checked by the db backend; the
    tokens API defaults to the database and secret file the relay itself checks against."""
    for description in descriptions:
        auth_type, _, argstring = description.partition(":")
        if auth_type == "db":
            return parse_arguments(argstring, DB_ARGUMENTS)
    return {}


def _config_path(argv: List[str]) -> Any:
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def _ip_port(value: str) -> Tuple[str, int]:
    """An `IP:PORT` or `[IPv6]:PORT` address."""
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        if not sep or not is_ip(host):
            raise ValueError
        return host, _port(port)
    except ValueError:
        raise ValueError(f"{value!r} is not IP:PORT or [IPv6]:PORT") from None

