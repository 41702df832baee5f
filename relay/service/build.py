"""The builders a relay process is composed from: listeners, TLS, usage backends, the HTTP
services, peer rules, and the whole relay (`relay_service`) for one process or one worker."""
from __future__ import annotations

import errno
import hashlib
import hmac
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

from twisted.application.internet import TimerService
from twisted.application.service import MultiService, Service
from twisted.cred.portal import Portal
from twisted.logger import Logger, LogLevel
from twisted.web.resource import Resource

from relay import SOFTWARE
from relay.auth.checkers import ChainedChecker
from relay.auth.cred import AccountRealm
from relay.auth.db_checker import AccountsChecker
from relay.core.nonces import (
    FEATURE_PASSWORD_ALGORITHMS,
    FEATURE_USERNAME_ANONYMITY,
    NonceIssuer,
    load_secrets,
)
from relay.core.peers import LiveRelays, OwnEndpoints, PeerPolicy
from relay.core.server import TurnConfig, TurnServer
from relay.ledger.monthly_quota import MonthlyUsage, QuotaTracker, sql_backend
from relay.ledger.records import IUsageBackend
from relay.ledger.report import UsageReader
from relay.ledger.retention import ClientAddressRetention
from relay.ledger.sql import SqlUsageBackend, sqlite_backend
from relay.ledger.triggers import UsageTriggers
from relay.ledger.writer import Ledger
from relay.net.handoff import HandOff
from relay.net.listeners import LoginDispatcher, RelayBinder, bound_socket
from relay.net.proxy_protocol import ProxyTrust, parse_networks
from relay.net.shared_port import HttpForwarder
from relay.net.source_counts import SourceCounts
from relay.net.steering import attach as attach_steering
from relay.net.stream_relay import StreamRelayBinder
from relay.net.tls import ServerDTLS, ServerTLS, self_signed
from relay.proto import stun
from relay.proto.demux import ALPN_HTTP, ALPN_STUN_TURN
from relay.service.alternates import AlternatesFile
from relay.service.banner import banner, public_host
from relay.service.eventlog import log_allocations
from relay.service.first_run import FirstRun
from relay.service.host import local_addresses, outbound_ip, raise_file_limit
from relay.service.options import Options
from relay.service.quota_book import Release, Reserve, SharedQuotas
from relay.service.redirects import RegionRedirects
from relay.service.services import BannerService, HTTPService, ListenersService, RelayService, SighupService
from relay.storage.sqldb import SqlStore, error_line, pool_from_dsn
from relay.util.tomlfile import read_toml
from relay.web.api import TokensAPI
from relay.web.browser_api import BrowserAnswers
from relay.web.health import MetricsPage, NotReady, QuietSite, Routes
from relay.web.metrics import RelayCollector
from relay.web.metrics import registry as metrics_registry
from relay.web.regions import Region, regions_from_table
from relay.web.test_page import SelfTestPage
from relay.web.triggers_api import TriggerAnswers
from relay.web.usage_api import UsageAnswers

log = Logger(namespace="turnrelay")
_LEVELS = {logging.DEBUG: LogLevel.debug, logging.INFO: LogLevel.info,
           logging.WARNING: LogLevel.warn, logging.ERROR: LogLevel.error}
_DEFAULT_LISTENING_IPS = ["0.0.0.0", "::"]
CERTIFICATE_LOOK = 5.0  # seconds between two looks at the certificate files
# Seconds between two looks at --regions-file: a region marked not ready or draining there
# stops being handed out by the tokens API within this time.
REGIONS_LOOK = 1.0
# The tokens API's loopback listener for HTTP found on the TURN ports (relay.net.shared_port).
SHARED_API = "tokens API for the TURN ports"
LOOPBACK = ProxyTrust(parse_networks(["127.0.0.1"]), timeout=5)


class _TwistedLogHandler(logging.Handler):
    """The core logs through the standard library; twistd's log is where operators look.

    One Logger per namespace, kept: making one imports the global publisher, which cost as
    much as the rest of the line on PyPy (the core logs two lines per allocation)."""

    def __init__(self) -> None:
        super().__init__()
        self._loggers: Dict[str, Logger] = {}

    def emit(self, record: logging.LogRecord) -> None:
        logger = self._loggers.get(record.name)
        if logger is None:
            logger = self._loggers[record.name] = Logger(namespace=record.name)
        logger.emit(_LEVELS.get(record.levelno, LogLevel.info), "{message}",
                    message=record.getMessage())


def _route_core_logging() -> None:
    core = logging.getLogger("turnrelay")
    if not any(isinstance(h, _TwistedLogHandler) for h in core.handlers):
        core.addHandler(_TwistedLogHandler())
        core.setLevel(logging.INFO)
        core.propagate = False


ListenerSockets = List[Tuple[str, List[socket.socket]]]


def bind_listeners(options: Options, copies: int = 1) -> ListenerSockets:
    """Bind every client listener, `copies` sockets for each (one per worker process, sharing
    its address through SO_REUSEPORT when more than one).

    On the native data plane a UDP listener comes twice, as "udp" (the reactor's sockets, for
    STUN requests) and then "udp-data" (the data plane's, for ChannelData and Send
    indications), steered apart by relay.net.steering; as one "udp" if the kernel refuses it.

    Stream sockets listen at once: a worker being restarted then finds the connections the
    kernel queued on its socket meanwhile, rather than them going to nobody or elsewhere.
    """
    explicit = bool(options["listening-ip"])
    transports = [(port, t) for port in options["listening-port"]
                  for t in ("udp", "tcp") if not options["no-" + t]]
    if not options["no-tls"]:
        transports += [(port, "tls") for port in options["tls-listening-port"]]
    if options["dtls"]:
        transports += [(port, "dtls") for port in options["dtls-listening-port"]]
    found: ListenerSockets = []
    for host in options["listening-ip"] or _DEFAULT_LISTENING_IPS:
        for port, transport in transports:
            kind = socket.SOCK_DGRAM if transport in ("udp", "dtls") else socket.SOCK_STREAM
            try:
                if transport == "udp" and options["dataplane"] == "native":
                    found += _steered_copies(host, port, copies)
                    continue
                socks = _bound_copies(host, port, kind, copies)
            except OSError as err:
                if not explicit and err.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                    log.warn("no {transport} listener on [{host}]:{port}: {err}",
                             transport=transport, host=host, port=port, err=err.strerror)
                    continue
                raise SystemExit(f"turnrelay: --listening-ip/--listening-port: cannot listen on "
                                 f"{transport} [{host}]:{port}: {err.strerror}")
            found.append((transport, socks))
    if not found:
        raise SystemExit("turnrelay: no listener could be opened")
    return found


def _steered_copies(host: str, port: int, copies: int) -> ListenerSockets:
    """A UDP listener for the native data plane: ("udp", the reactor's sockets) and
    ("udp-data", the data plane's), one each per process, or one ("udp") if steering is
    refused."""
    socks = _bound_copies(host, port, socket.SOCK_DGRAM, 2 * copies)
    try:
        attach_steering(socks[0], copies)
    except OSError as err:
        log.warn("UDP [{host}]:{port}: the kernel refused the steering program ({err}): STUN "
                 "requests reach the reactor through the native data plane's queue",
                 host=host, port=port, err=err.strerror)
        for sock in socks[1::2]:
            sock.close()
        return [("udp", socks[0::2])]
    return [("udp", socks[0::2]), ("udp-data", socks[1::2])]


def _bound_copies(host: str, port: int, kind: int, copies: int) -> List[socket.socket]:
    if copies > 1:
        # SO_REUSEPORT would let a second relay share the port unnoticed: first make sure no
        # socket holds it (port 0: the free port this finds is the one every copy takes).
        probe = bound_socket(host, port, kind)
        port = probe.getsockname()[1]
        probe.close()
    socks = [bound_socket(host, port, kind, reuse_port=copies > 1)]
    try:
        port = socks[0].getsockname()[1]  # port 0: the one the kernel chose, for every copy
        socks += [bound_socket(host, port, kind, reuse_port=True) for _ in range(copies - 1)]
        for sock in socks:
            if kind == socket.SOCK_STREAM:
                sock.listen(1024)
            else:
                _large_buffers(sock)
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks


# A client listener's UDP buffers, each way (coturn's server sockets take the same 2 MiB).  With
# the kernel's default of 208 KiB, a burst of new clients (a region failing over) overflows
# the receive queue between two reads, and every request lost costs its client a 0.5 s+
# retransmission.  The kernel caps it at net.core.rmem_max/wmem_max; memory is used only as
# datagrams wait.
UDP_BUFFER = 2 * 1024 * 1024


def _large_buffers(sock: socket.socket) -> None:
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        sock.setsockopt(socket.SOL_SOCKET, option, UDP_BUFFER)


def _certificate_watch(certificates: List[Tuple[str, ServerTLS]]) -> Callable[[], None]:
    """A look at the certificate files, reloading those that changed (as SIGHUP would)."""
    def look() -> None:
        for what, tls in certificates:
            try:
                if tls.reload_if_changed():
                    log.info("{what} files changed: reloaded", what=what)
            except Exception as err:
                log.error("{what} files changed but do not load, keeping the old: {err}",
                          what=what, err=err)
    return look


def _server_tls(options: Options, cert: str, key: str, flags: str,
                alpn: Sequence[bytes] = ()) -> ServerTLS:
    try:
        return ServerTLS(cert, key, options["tls-min-version"], options["tls-max-version"], alpn)
    except Exception as err:
        raise SystemExit(f"turnrelay: {flags}: cannot use {cert} and {key}: {err}")


def _tokens_api(reactor, options: Options, relay_ips: Dict[int, str],
                ledger_sql: Optional[Tuple[str, SqlUsageBackend]],
                policy: PeerPolicy, parent: MultiService) -> TokensAPI:
    """The tokens API, whose home region is where this relay's own listeners are reached, and
    which reads usage from the ledger the relay writes; a look at --regions-file under
    `parent` keeps its regions as the file has them."""
    host = public_host(options, relay_ips)
    port = options["listening-port"][0]
    home = {options["region"]: Region(
        host, None if options["no-udp"] else port, None if options["no-tcp"] else port,
        None if options["no-tls"] else options["tls-listening-port"][0])}
    # A regions-file entry named like this region wins: a relay behind a load balancer is
    # reached on the balancer's ports, not its own, and the file says where it is.
    api = TokensAPI(options["api-store"], options["api-secret"], {**home, **options["regions"]},
                    options["region"], options["api-max-ttl"], clock=reactor.seconds,
                    usage=UsageAnswers(_usage_reader(ledger_sql),
                                       options["rates"], reactor.seconds),
                    key_failures_per_minute=options["api-key-failures-per-minute"],
                    triggers=TriggerAnswers(options["api-store"], policy, reactor.seconds),
                    geoip=options["geoip"])
    BrowserAnswers(options["api-store"], api, reactor.seconds,
                   options["api-browser-requests-per-minute"])
    if options["regions-file"]:
        TimerService(REGIONS_LOOK, regions_watch(options["regions-file"], home, api)) \
            .setServiceParent(parent)
    return api


def _file_stamp(path: str) -> Optional[Tuple[str, int, int, int]]:
    """What changes when the file at `path` does, through symbolic links: a mounted ConfigMap
    is `path` -> ..data/NAME -> ..TIMESTAMP/NAME, and the kubelet updates it by pointing
    ..data at a new timestamped directory (so the resolved path alone tells, even when the
    new file's size, time and a reused inode number match the old one's)."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    return os.path.realpath(path), status.st_mtime_ns, status.st_size, status.st_ino


def regions_watch(path: str, home: Dict[str, Region], api: TokensAPI) -> Callable[[], None]:
    """A look at --regions-file, handing the tokens API its regions again when it changed
    (written in place or replaced); a file that no longer loads keeps the old ones."""
    seen = [_file_stamp(path)]

    def look() -> None:
        stamp = _file_stamp(path)
        if stamp == seen[0]:
            return
        seen[0] = stamp
        try:
            regions = regions_from_table(read_toml(path))
        except ValueError as err:
            log.error("--regions-file changed but does not load, keeping the old regions: "
                      "{err}", err=err)
            return
        api.set_regions({**home, **regions})
        log.info("--regions-file changed: {regions}", regions=", ".join(
            f"{name} {region.state}" for name, region in sorted(api.regions.items())))
    return look


def _usage_reader(ledger_sql: Optional[Tuple[str, SqlUsageBackend]]) -> Optional[UsageReader]:
    """A reader, for the usage API, of the SQL backend quotas read too (`sql_backend`), on a
    pool of its own beside the one the ledger writes through; None without such a backend."""
    if ledger_sql is None:
        return None
    return UsageReader(pool_from_dsn(ledger_sql[1].dsn, cp_min=1, cp_max=2))


def usage_backends(options: Options) -> Dict[str, IUsageBackend]:
    """The --accounting backends, or the embedded default: usage.db in --state-dir."""
    if options["usage-backends"]:
        return options["usage-backends"]
    try:
        os.makedirs(options["state-dir"], mode=0o700, exist_ok=True)
        return {"sqlite": sqlite_backend("path=" + os.path.join(options["state-dir"], "usage.db"))}
    except (OSError, ValueError) as err:
        raise SystemExit(f"turnrelay: --state-dir: cannot keep the usage ledger there: {err}")


def migrate_schemas(options: Options, backends: Dict[str, IUsageBackend]) -> None:
    """The SQL ledgers' and account databases' schemas, created or migrated once, now, before
    worker processes start (each would otherwise race the others to create it).  A database
    not reachable now is left to the workers, which retry until it is."""
    stores = [(f"usage backend {name}", backend) for name, backend in backends.items()
              if isinstance(backend, SqlStore)]
    stores += [("account database", checker.store) for checker in options["checkers"]
               if isinstance(checker, AccountsChecker)]
    if options["api-port"] is not None:
        stores.append(("tokens API's account database", options["api-store"]))
    for what, store in stores:
        try:
            store.migrate_now()
        except Exception as err:
            log.warn("{what}: schema not checked at start ({error}); the workers will retry",
                     what=what, error=error_line(str(err)) or type(err).__name__)


def ledger_to_read(options: Options, backends: Dict[str, IUsageBackend]
                   ) -> Optional[Tuple[str, SqlUsageBackend]]:
    """The one SQL backend usage is read back from, by quotas, triggers and the usage API."""
    found = sql_backend(backends)
    if found is None and options["monthly-quota-bytes"]:
        raise SystemExit("turnrelay: --monthly-quota-mb: needs a sqlite or postgresql "
                         "--accounting backend to read usage from")
    return found


def _usage_watch(ledger: Ledger, ledger_sql: Optional[Tuple[str, SqlUsageBackend]],
                 server: TurnServer, checkers: ChainedChecker, options: Options,
                 reactor, worker: Optional["WorkerRole"]) -> List[Service]:
    """Monthly quotas (relay.ledger.monthly_quota) and usage triggers (relay.ledger.triggers), read from the
    ledger's SQL backend; triggers also need the account database.  Every worker process runs
    both for the accounts active on it: a notice goes out once (`claim_firing`)."""
    if ledger_sql is None:
        log.warn("monthly quotas and usage triggers are off: no sqlite or postgresql "
                 "--accounting backend")
        return []
    usage = MonthlyUsage(ledger, *ledger_sql)
    tracker = QuotaTracker(server, usage, options["monthly-quota-bytes"], clock=reactor.seconds,
                           report=worker.report_reached if worker is not None else lambda r: None)
    if worker is not None:
        tracker.elsewhere = worker.reached_elsewhere
    services = [tracker.service]
    stores = [checker.store for checker in checkers.checkers
              if isinstance(checker, AccountsChecker)]
    if options["api-port"] is not None:
        stores.append(options["api-store"])
    if stores:
        services.append(UsageTriggers(stores[0], usage, server.config.policy, reactor,
                                      tracker.active).service)
    return services


def relay_addresses(options: Options) -> Tuple[Dict[int, str], Dict[str, str]]:
    """Relay addresses by family, and the address clients are told for each."""
    relay_ips = {stun.address_family(ip): ip for ip in options["relay-ip"]}
    if not relay_ips:
        for family, code in ((socket.AF_INET, stun.FAMILY_IPV4), (socket.AF_INET6, stun.FAMILY_IPV6)):
            ip = outbound_ip(family)
            if ip is not None:
                relay_ips[code] = ip
    if not relay_ips:
        raise SystemExit("turnrelay: --relay-ip: no address found to relay from; give one")
    external = options["external-map"]
    return relay_ips, {ip: external.get(ip, external.get(None, ip)) for ip in relay_ips.values()}


def nonce_secrets(options: Options) -> List[bytes]:
    try:
        return load_secrets(options["nonce-secret-file"])
    except (OSError, ValueError) as err:
        raise SystemExit(f"turnrelay: --nonce-secret-file: {err}")


def _client_certificate(options: Options) -> Tuple[str, str]:
    """--cert and --pkey, or a self-signed certificate kept in --state-dir."""
    cert, key = options["cert"], options["pkey"]
    if not cert:
        cert, key, made = self_signed(options["state-dir"])
        log.debug("no --cert given: TLS uses the self-signed certificate {cert}{made}",
                 cert=cert, made=" (made now)" if made else "")
    return cert, key


def client_tls_context(options: Options) -> Optional[ServerTLS]:
    """The TLS listeners' context."""
    if options["no-tls"]:
        return None
    alpn = ALPN_STUN_TURN + ((ALPN_HTTP,) if options["api-on-tls-port"] else ())
    return _server_tls(options, *_client_certificate(options), "--cert/--pkey", alpn)


def client_dtls_context(options: Options, secrets: List[bytes]) -> Optional[ServerDTLS]:
    """The DTLS listeners' context: the TLS certificate, cookies keyed from the nonce keys
    (the same in every worker)."""
    if not options["dtls"]:
        return None
    cert, key = _client_certificate(options)
    cookie_key = hmac.new(secrets[0], b"turnrelay DTLS cookie", hashlib.sha256).digest()
    try:
        return ServerDTLS(cert, key, cookie_key, alpn=ALPN_STUN_TURN)
    except Exception as err:
        raise SystemExit(f"turnrelay: --dtls: cannot use {cert} and {key}: {err}")


def api_tls_context(options: Options) -> Optional[ServerTLS]:
    if options["api-port"] is None or not options["api-cert"]:
        return None
    return _server_tls(options, options["api-cert"], options["api-pkey"], "--api-cert/--api-pkey")


def peer_policy(options: Options, relay_ips: Dict[int, str],
                 external_ips: Dict[str, str]) -> PeerPolicy:
    # Every listener this process opens adds itself: the relay never relays to its own ports.
    own = OwnEndpoints(list(relay_ips.values()) + list(external_ips.values()) + local_addresses())
    return PeerPolicy(options["allowed-peer-ip"], options["denied-peer-ip"],
                      bool(options["allow-loopback-peers"]), options["cluster-cidr"], own)


def reload_peer_rules(options: Options, apply: Callable[[List[str], List[str], List[str]], None]
                       ) -> Callable[[], None]:
    def reload() -> None:
        rules = options.peer_rules_now()
        apply(rules["allowed-peer-ip"], rules["denied-peer-ip"], rules["cluster-cidr"])
    return reload


def relay_port_slice(low: int, high: int, index: int, count: int) -> Tuple[int, int]:
    """Worker `index`'s share of the relay ports low-high: its own, so no two workers ever
    try the same port, and a peer's packets reach the worker holding the allocation."""
    span = high - low + 1
    return low + span * index // count, low + span * (index + 1) // count - 1


def http_services(reactor, options: Options, relay_ips: Dict[int, str],
                  ledger_sql: Optional[Tuple[str, SqlUsageBackend]], policy: PeerPolicy,
                  metrics: Resource, not_ready: NotReady, api_tls: Optional[ServerTLS],
                  parent: MultiService, not_live: Optional[NotReady] = None) -> List[HTTPService]:
    """--prometheus and --api-port: metrics, health and the tokens API, over HTTP, started
    under `parent`."""
    services: List[HTTPService] = []
    if options["prometheus"]:
        services.append(HTTPService(reactor, QuietSite(Routes(metrics, not_ready, None, not_live),
                                                       timeout=60),
                                    options["prometheus-address"], options["prometheus-port"], None,
                                    "metrics", "--prometheus-address/--prometheus-port", policy.own))
    if options["api-port"] is not None:
        api = Routes(metrics, not_ready,
                     _tokens_api(reactor, options, relay_ips, ledger_sql, policy, parent), not_live)
        api.putChild(b"test", SelfTestPage())
        # Idle connections close after a minute: the API has no use for long-held ones.
        site = QuietSite(api, timeout=60)
        services.append(HTTPService(reactor, site, options["api-listening-ip"],
                                    options["api-port"], api_tls, "tokens API",
                                    "--api-listening-ip/--api-port", policy.own,
                                    options["proxy-trust"]))
        if options["api-on-tls-port"] or options["api-on-tcp-port"]:
            services.append(HTTPService(reactor, site, "127.0.0.1", 0, None, SHARED_API,
                                        "--api-on-tls-port", policy.own, LOOPBACK))
    for service in services:
        service.setServiceParent(parent)
    return services


def announced(services: List[HTTPService]) -> List[Tuple[str, str]]:
    """The HTTP listeners the banner names, with their URLs (not the internal SHARED_API)."""
    return [(service.what, service.url()) for service in services if service.what != SHARED_API]


def shared_api_endpoint(services: List[HTTPService]) -> Optional[Tuple[str, int]]:
    """Where the API's listener for the TURN ports listens (once started), if there is one."""
    for service in services:
        if service.what == SHARED_API:
            return service.host, service.port
    return None


def watch_certificates(certificates: List[Tuple[str, Optional[ServerTLS]]],
                       parent: MultiService) -> List[Tuple[str, Callable[[], None]]]:
    """A look at the (configured) certificate files every few seconds under `parent`,
    reloading those that changed; their SIGHUP reloads."""
    certificates = [(what, tls) for what, tls in certificates if tls is not None]
    if certificates:
        TimerService(CERTIFICATE_LOOK, _certificate_watch(certificates)).setServiceParent(parent)
    return [(what, tls.reload) for what, tls in certificates]


@dataclass
class WorkerRole:
    """What a worker process (relay.service.workers) is given by its parent instead of making it."""

    index: int
    count: int
    secrets: List[bytes]  # the nonce keys, the same in every worker
    sockets: List[Tuple[str, socket.socket]]  # its copy of each client listener
    reserve: Reserve  # a place in the parent's allocation quotas
    release: Release
    parent_endpoints: List[Tuple[str, int]]  # the parent's HTTP listeners: never a peer
    shared_api: Optional[Tuple[str, int]]  # the parent's SHARED_API listener, if any
    live: Any  # the memory every worker marks its live relayed addresses in (LiveRelays)
    sources: Any  # the memory the workers count connections per client address in
    # Monthly quotas: this worker's accounts over theirs, to the parent, and the set of those
    # the parent says some worker found over (relay.ledger.monthly_quota).
    report_reached: Callable[[Set[str]], None]
    reached_elsewhere: Set[str]
    inbox: socket.socket  # where other workers hand it connections (relay.net.handoff)
    outboxes: List[socket.socket]  # every worker's inbox, by index


def relay_service(options: Options, reactor, worker: Optional[WorkerRole] = None,
                  first: Optional[FirstRun] = None) -> MultiService:
    """One relay process: the whole relay (`--workers 1`), or a worker given its `worker`
    role by the parent (`relay.service.workers`)."""
    _route_core_logging()
    relay_ips, external_ips = relay_addresses(options)
    realm = options["realm"] or socket.getfqdn()
    secrets = worker.secrets if worker is not None else nonce_secrets(options)
    # Advertise only what every configured backend can serve (RFC 8489 section 9.2).
    checkers = ChainedChecker(options["checkers"])
    nonces = NonceIssuer(secrets, options["stale-nonce"], FEATURE_PASSWORD_ALGORITHMS
                         | (FEATURE_USERNAME_ANONYMITY if checkers.supportsUserhash else 0))
    algorithms = (stun.ALGORITHM_SHA256, stun.ALGORITHM_MD5) if checkers.supportsSha256 \
        else (stun.ALGORITHM_MD5,)
    portal = Portal(AccountRealm(), [checkers])
    low, high = options["min-port"], options["max-port"]
    if worker is not None:
        low, high = relay_port_slice(low, high, worker.index, worker.count)
    config = TurnConfig(
        realm=realm, relay_ips=relay_ips, external_ips=external_ips,
        min_port=low, max_port=high,
        max_lifetime=options["max-allocate-lifetime"],
        user_quota=options["user-quota"], source_quota=options["source-quota"],
        total_quota=options["total-quota"], max_permissions=options["max-permissions"],
        max_channels=options["max-channels"],
        max_channel=stun.RFC5766_MAX_CHANNEL if options["rfc5766-channels"] else stun.MAX_CHANNEL,
        max_bps=options["max-bps"], max_pps=options["max-pps"],
        account_max_bps=options["account-max-bps"], account_max_pps=options["account-max-pps"],
        software=None if options["no-software-attribute"] else SOFTWARE,
        policy=peer_policy(options, relay_ips, external_ips),
        password_algorithms=algorithms,
        alternate_servers=tuple(options["alternate-server"]),
        tls_alternate_servers=tuple(options["tls-alternate-server"]),
        alternate_domain=options["alternate-domain"],
        tcp_bind_timeout=options["tcp-bind-timeout"], tcp_idle_timeout=options["tcp-idle-timeout"],
        whole_range=(options["min-port"], options["max-port"]) if worker is not None else None,
        worker_index=worker.index if worker is not None else 0,
        worker_count=worker.count if worker is not None else 1,
    )
    live = LiveRelays(relay_ips.values(), external_ips, worker.live if worker is not None else None)
    server = TurnServer(config, nonces, RelayBinder(reactor), allocation_policy=checkers.allows,
                        bind_stream=None if options["no-tcp-relay"] else StreamRelayBinder(reactor),
                        live=live)
    tls = client_tls_context(options)
    dtls = client_dtls_context(options, secrets)
    # The parent of workers serves the tokens API, not they.
    api_tls = api_tls_context(options) if worker is None else None

    files = raise_file_limit()
    log.debug("realm {realm}, relay addresses {relays}, ports {low}-{high}; open-file limit {files} "
             "leaves room for about {room} allocations", realm=realm,
             relays=", ".join(f"{ip} (seen as {external_ips[ip]})" for ip in relay_ips.values()),
             low=low, high=high, files=files, room=max(files - 100, 0))

    backends = usage_backends(options)
    log.debug("usage ledger: region {region}, every {interval} s, to {backends}",
             region=options["region"], interval=options["accounting-interval"],
             backends=", ".join(backends))

    service = RelayService(server, reactor, options["drain-grace"])
    looks = []  # where new Allocates go while draining or full (relay.service.redirects)
    if options["alternate-servers-file"]:
        looks.append(AlternatesFile(options["alternate-servers-file"], server.config).refresh)
    if options["regions-file"]:
        looks.append(RegionRedirects(server, options["regions-file"], options["region"],
                                     _file_stamp).look)
    if looks:
        TimerService(REGIONS_LOOK, lambda: [look() for look in looks]).setServiceParent(service)
    log_allocations(server)
    # Started first and so stopped last: the listeners' shutdown ends every allocation, and
    # the ledger then writes their last usage before the process exits.
    ledger = Ledger(server, backends, options["region"], reactor, options["accounting-interval"],
                    options["accounting-queue"], options["accounting-full"])
    ledger.setServiceParent(service)
    shared = None
    if worker is not None:
        for host, port in worker.parent_endpoints:
            config.policy.own.add(host, port)
        shared = SharedQuotas(server, reactor, worker.reserve, worker.release, always=any(
            options[name] for name in ("total-quota", "user-quota", "source-quota",
                                       "account-max-bps", "account-max-pps")))
    dispatch = LoginDispatcher(server, portal, reactor, shared,
                               verify=checkers.verify if checkers.synchronous else None)
    # Blanking old client addresses is for the whole relay: one worker does it.
    if options["client-address-retention"] is not None and (worker is None or worker.index == 0):
        ClientAddressRetention(backends, options["client-address-retention"],
                               reactor).setServiceParent(service)
    ledger_sql = ledger_to_read(options, backends)
    for watch in _usage_watch(ledger, ledger_sql, server, checkers, options, reactor, worker):
        watch.setServiceParent(service)
    if worker is None:
        def sockets() -> List[Tuple[str, socket.socket]]:
            return [(transport, socks[0]) for transport, socks in bind_listeners(options)]
    else:
        def sockets() -> List[Tuple[str, socket.socket]]:
            return worker.sockets
    # HTTP found on a TURN port goes to the API's loopback listener: this process's own, or
    # the parent's (relay.net.shared_port).
    https: List[HTTPService] = []
    forwarder = HttpForwarder(reactor, (lambda: worker.shared_api) if worker is not None
                              else lambda: shared_api_endpoint(https))
    hand_off = None
    if worker is not None:
        hand_off = HandOff(reactor, server, worker.index, worker.outboxes, worker.inbox)
        dispatch.prepare = hand_off.fetch_reservation
    listeners = ListenersService(reactor, server, dispatch, options, tls, sockets, forwarder,
                                 dtls, hand_off)
    if worker is not None:
        listeners.stream_limits.shared = SourceCounts(worker.sources, worker.index, worker.count,
                                                      worker.secrets[0])
    listeners.setServiceParent(service)

    def not_ready() -> Optional[str]:
        if server.draining:
            return "draining"
        return None if listeners.running else "not listening yet"

    # A worker's metrics are read by its parent (relay.service.workers), which serves them.
    service.registry = metrics_registry(RelayCollector(server, ledger, listeners.stream_limits,
                                                       options["region"], listeners.dataplane_stats))
    if worker is None:
        https += http_services(reactor, options, relay_ips, ledger_sql, config.policy,
                               MetricsPage(service.registry), not_ready, api_tls, service)
    TimerService(1.0, lambda: server.tick(reactor.seconds())).setServiceParent(service)
    for checker in checkers.checkers:
        if getattr(checker, "service", None) is not None:
            checker.service.setServiceParent(service)
    reloads = watch_certificates([("TLS certificate", tls), ("DTLS certificate", dtls),
                                  ("tokens API TLS certificate", api_tls)], service)
    def reload_credentials() -> None:
        checkers.reload()
        server.forget_logins()
    reloads.append(("credentials", reload_credentials))
    reloads.append(("peer rules", reload_peer_rules(options, server.set_peer_rules)))
    SighupService(reactor, reloads).setServiceParent(service)
    if worker is None:  # last, so that every listener has started before it
        BannerService(lambda: banner(options, 1, listeners.bound, relay_ips, external_ips,
                                     announced(https), backends, first)).setServiceParent(service)
    return service

