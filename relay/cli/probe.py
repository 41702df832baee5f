"""`turnrelay probe`: does a TURN server work from here, over which transport, how fast?

Per transport it runs what a WebRTC client's relay candidate needs, and stops at the first step
that fails: connect (TCP, TLS), a STUN Binding (reflexive address, RTT), two Allocates (two
relayed addresses), CreatePermission and ChannelBind each way, then N numbered packets from one
allocation to the other and back through the server.  Relaying between two allocations of our
own, as a browser's loopback call does, needs no peer outside.  Each failure becomes one line
naming the step and its likely cause, in the words of a WebRTC troubleshooting guide.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import re
import socket
import ssl
import struct
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple
from urllib.parse import quote, urlencode

from relay.auth.tokens import mint
from relay.cli.turnclient import TLS, TRANSPORTS, UDP, NoResponse, TurnClient, Unsigned, error_code
from relay.proto import stun
from relay.util.secretfile import read_secrets
from relay.util.turn_uri import DEFAULT_PORT, DEFAULT_TLS_PORT, parse_turn_uri

CHANNELS = (0x4000, 0x4001)
PACKET_WAIT = 1.0  # a relayed packet later than this counts as lost, as ping would count it


class StepFailed(Exception):
    """The probe of one transport stopped: `step` and the reason in plain words."""

    def __init__(self, step: str, reason: str):
        super().__init__(reason)
        self.step = step
        self.reason = reason


@dataclass
class Result:
    transport: str
    server: str
    region: Optional[str] = None
    failed_step: Optional[str] = None
    reason: Optional[str] = None
    reflexive: Optional[str] = None
    relayed: List[str] = field(default_factory=list)
    binding_rtt_ms: Optional[float] = None
    relayed_ms: Optional[float] = None  # from connecting to the first relayed address
    rtt_ms: List[float] = field(default_factory=list)
    sent: int = 0

    @property
    def lost(self) -> int:
        return self.sent - len(self.rtt_ms)

    def summary(self) -> Dict[str, Any]:
        """What --json prints: the result with p50/p99 instead of every sample."""
        summary = asdict(self)
        del summary["rtt_ms"]
        summary.update(ok=self.failed_step is None, lost=self.lost,
                       rtt_p50_ms=percentile(self.rtt_ms, 50),
                       rtt_p99_ms=percentile(self.rtt_ms, 99))
        return summary


def percentile(samples: Sequence[float], pct: int) -> Optional[float]:
    """Nearest-rank percentile, None without samples."""
    if not samples:
        return None
    ordered = sorted(samples)
    return ordered[max(0, -(-pct * len(ordered) // 100) - 1)]


def parse_target(uri: str, tls_port: int) -> Tuple[str, Dict[str, int]]:
    """(host, {transport: port}) of a TURN URI (RFC 7065) or a bare host[:port].

    `turn:h:p` means UDP and TCP on p and TLS on `tls_port`; `?transport=` narrows it to one;
    `turns:h:p` is TLS on p.
    """
    parsed = parse_turn_uri(uri if re.match("turns?:", uri) else "turn:" + uri)
    host = parsed.host
    if parsed.secure:
        return host, {TLS: parsed.port or DEFAULT_TLS_PORT}
    port = parsed.port or DEFAULT_PORT
    if parsed.transport:
        return host, {parsed.transport: port}
    return host, {"udp": port, "tcp": port, TLS: tls_port}


@dataclass
class Probe:
    host: str
    username: str
    password: str
    count: int = 20
    size: int = 100
    timeout: float = 3.0
    context: Optional[ssl.SSLContext] = None
    peer: Optional[stun.Address] = None  # an echo server to relay to, instead of ourselves

    def run(self, transport: str, port: int, region: Optional[str] = None) -> Result:
        result = Result(transport, stun.format_address((self.host, port)), region)
        clients: List[TurnClient] = []
        try:
            self._steps(result, transport, (self._address(), port), clients)
        except StepFailed as failure:
            result.failed_step, result.reason = failure.step, failure.reason
        finally:
            for client in clients:
                self._release(client)
        return result

    def _address(self) -> str:
        try:
            return socket.getaddrinfo(self.host, None, type=socket.SOCK_DGRAM)[0][4][0]
        except socket.gaierror as e:
            raise StepFailed("connect", f"cannot resolve {self.host}: {e.strerror}") from None

    def _connect(self, transport: str, server: stun.Address) -> TurnClient:
        what = f"{transport.upper()} {server[1]}"
        try:
            return TurnClient.connect(transport, server, self.username, self.password,
                                      timeout=self.timeout, context=self.context,
                                      server_hostname=self.host)
        except ssl.SSLCertVerificationError as e:
            raise StepFailed("connect", f"certificate verify failed: {e.verify_message} "
                             "(--ca FILE to trust its issuer, --insecure to skip the check)")
        except ssl.SSLError as e:
            raise StepFailed("connect", f"TLS handshake failed: {e.reason or e}: "
                             "not a TLS port, or no TLS version and cipher in common?")
        except ConnectionRefusedError:
            raise StepFailed("connect", f"connection refused: nothing listens on {what}")
        except socket.timeout:
            raise StepFailed("connect", f"no answer to connect within {self.timeout:g} s: "
                             f"{what} blocked?")
        except OSError as e:
            raise StepFailed("connect", f"cannot connect to {what}: {e.strerror or e}")

    def _steps(self, result: Result, transport: str, server: stun.Address,
               clients: List[TurnClient]) -> None:
        began = time.monotonic()
        first = self._connect(transport, server)
        clients.append(first)
        started = time.monotonic()
        reply = self._binding(first)
        result.binding_rtt_ms = (time.monotonic() - started) * 1000
        if reply.cls != stun.SUCCESS:
            raise StepFailed("binding", f"Binding refused: {_error(reply)}")
        result.reflexive = stun.format_address(reply.get(stun.XOR_MAPPED_ADDRESS))
        relayed = [self._allocate(first)]
        result.relayed_ms = (time.monotonic() - began) * 1000
        if self.peer is None:
            clients.append(self._connect(transport, server))
            relayed.append(self._allocate(clients[1]))
        result.relayed = [stun.format_address(address) for address in relayed]
        peers = list(reversed(relayed)) if self.peer is None else [self.peer]
        for client, peer, channel in zip(clients, peers, CHANNELS):
            self._authorise(client, "permission", stun.CREATE_PERMISSION, peer,
                            (stun.XOR_PEER_ADDRESS, peer))
            self._authorise(client, "channel", stun.CHANNEL_BIND, peer,
                            (stun.CHANNEL_NUMBER, channel), (stun.XOR_PEER_ADDRESS, peer))
        self._round_trips(result, clients)

    def _binding(self, client: TurnClient) -> stun.Message:
        """A Binding without credentials: does anything answer STUN on this port at all?"""
        try:
            return client.exchange(stun.Message(stun.BINDING, stun.REQUEST))
        except NoResponse:
            raise StepFailed("binding", self._silence("Binding", client)) from None
        except (ConnectionError, stun.StunDecodeError) as e:
            raise StepFailed("binding", str(e)) from None

    def _silence(self, request: str, client: TurnClient) -> str:
        where = f"{client.transport.upper()} {client.server[1]}"
        cause = f"{where} blocked?" if client.transport == UDP else "not a STUN/TURN server?"
        return f"no response to {request} within {self.timeout:g} s: {cause}"

    def _request(self, client: TurnClient, step: str, name: str, method: int,
                 *attributes: Tuple[int, object]) -> stun.Message:
        try:
            reply = client.request(method, *attributes)
        except NoResponse:
            raise StepFailed(step, self._silence(name, client)) from None
        except Unsigned:
            raise StepFailed(step, "credentials refused: the server's answer is not signed "
                             "with this password") from None
        except (ConnectionError, stun.StunDecodeError) as e:
            raise StepFailed(step, str(e)) from None
        if error_code(reply) == 401:
            raise StepFailed(step, "credentials refused (401): wrong user or password, or an "
                             "expired credential")
        return reply

    def _allocate(self, client: TurnClient) -> stun.Address:
        """An IPv4 relayed address (RFC 8656's default), or an IPv6 one from a relay that
        has none (440)."""
        udp = (stun.REQUESTED_TRANSPORT, 17)
        reply = self._request(client, "allocate", "Allocate", stun.ALLOCATE, udp)
        if error_code(reply) == 440:
            reply = self._request(client, "allocate", "Allocate", stun.ALLOCATE, udp,
                                  (stun.REQUESTED_ADDRESS_FAMILY, stun.FAMILY_IPV6))
        if reply.cls != stun.SUCCESS:
            raise StepFailed("allocate", f"Allocate refused: {_error(reply)}")
        return reply.get(stun.XOR_RELAYED_ADDRESS)

    def _authorise(self, client: TurnClient, step: str, method: int, peer: stun.Address,
                   *attributes: Tuple[int, object]) -> None:
        name = "CreatePermission" if method == stun.CREATE_PERMISSION else "ChannelBind"
        reply = self._request(client, step, name, method, *attributes)
        if error_code(reply) == 403:
            what = "its own relayed address" if self.peer is None else "the peer"
            raise StepFailed(step, f"peer address forbidden (403): the server will not relay "
                             f"to {what} {stun.format_address(peer)} (on turnrelay: "
                             "--allowed-peer-ip, or --allow-loopback-peers on a test box)")
        if reply.cls != stun.SUCCESS:
            raise StepFailed(step, f"{name} refused: {_error(reply)}")

    def _round_trips(self, result: Result, clients: List[TurnClient]) -> None:
        """Numbered packets from the first allocation to the second (or the echo peer) and
        back; a packet that misses PACKET_WAIT on either leg is lost, a late one is skipped."""
        first, second = clients[0], clients[-1]
        wait = min(self.timeout, PACKET_WAIT)
        padding = b"\x00" * max(0, self.size - 4)
        for number in range(self.count):
            payload = struct.pack("!I", number) + padding
            started = time.monotonic()
            first.send_channel(CHANNELS[0], payload)
            result.sent += 1
            try:
                if second is not first:
                    _expect(second, number, started + wait)
                    second.send_channel(CHANNELS[1], payload)
                _expect(first, number, started + 2 * wait)
            except NoResponse:
                continue
            except ConnectionError as e:
                raise StepFailed("round trip", str(e)) from None
            result.rtt_ms.append((time.monotonic() - started) * 1000)
        if not result.rtt_ms:
            raise StepFailed("round trip", f"none of {self.count} packets came back through "
                             "the relay: relayed traffic (UDP ports of the relay range) blocked?")

    def _release(self, client: TurnClient) -> None:
        """Delete a UDP allocation rather than leave it to expire; a stream's closes with it."""
        try:
            if client.transport == UDP and client.nonce is not None:
                client.timeout = min(client.timeout, 1.0)
                client.request(stun.REFRESH, (stun.LIFETIME, 0))
        except (OSError, Unsigned, stun.StunDecodeError):
            pass
        finally:
            client.close()


def _expect(client: TurnClient, number: int, deadline: float) -> None:
    """Wait for packet `number`, skipping late packets of earlier numbers."""
    while True:
        _, payload = client.receive_channel(deadline)
        if len(payload) >= 4 and struct.unpack_from("!I", payload)[0] == number:
            return


def _error(reply: stun.Message) -> str:
    code, reason = reply.get(stun.ERROR_CODE, (0, "no ERROR-CODE"))
    return f"{code} {reason}"


def _ms(value: Optional[float]) -> str:
    # Hundredths: a round trip through a relay on this host can take less than 50 us.
    return "-" if value is None else f"{value:.2f}"


def _outcome(r: Result) -> str:
    return "ok" if r.failed_step is None else f"FAILED at {r.failed_step}"


def _rtt(r: Result) -> str:
    return f"{_ms(percentile(r.rtt_ms, 50))}/{_ms(percentile(r.rtt_ms, 99))}" if r.rtt_ms else "-"


def _loss(r: Result) -> str:
    return f"{r.lost}/{r.sent}" if r.sent else "-"


def _aligned(rows: Sequence[Sequence[str]]) -> List[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
            for row in rows]


def table(results: Sequence[Result]) -> str:
    """The report: one row per transport, then one line per failure."""
    rows = [("TRANSPORT", "SERVER", "RESULT", "REFLEXIVE", "RELAYED", "BINDING ms",
             "RTT p50/p99 ms", "LOSS")]
    rows += [(r.transport.upper(), r.server, _outcome(r), r.reflexive or "-",
              r.relayed[0] if r.relayed else "-", _ms(r.binding_rtt_ms), _rtt(r), _loss(r))
             for r in results]
    lines = _aligned(rows)
    lines += [f"{r.transport.upper()}: {r.reason}" for r in results if r.reason]
    return "\n".join(lines)


def chosen_region(results: Sequence[Result]) -> Optional[str]:
    """The region of the lowest median round trip through the relay, the first listed of
    equals; None when none relayed."""
    relaying = [r for r in results if r.failed_step is None and r.rtt_ms]
    if not relaying:
        return None
    return min(relaying, key=lambda r: percentile(r.rtt_ms, 50) or 0.0).region


def regions_table(results: Sequence[Result]) -> str:
    """The --regions report: one row per region and transport, side by side, the choice, then
    one line per failure."""
    rows = [("REGION", "TRANSPORT", "SERVER", "RESULT", "TO RELAYED ms", "RTT p50/p99 ms",
             "LOSS")]
    rows += [(r.region or "-", r.transport.upper(), r.server, _outcome(r), _ms(r.relayed_ms),
              _rtt(r), _loss(r)) for r in results]
    lines = _aligned(rows)
    chosen = chosen_region(results)
    lines.append(f"chosen: {chosen} (the lowest median round trip through the relay)"
                 if chosen else "chosen: none (no region relayed)")
    lines += [f"{r.region} {r.transport.upper()}: {r.reason}" for r in results if r.reason]
    return "\n".join(lines)


def _tls_context(args: argparse.Namespace) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=args.ca)
    if args.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _credentials(args: argparse.Namespace) -> Tuple[str, str]:
    if args.user is not None:
        return args.user, args.password
    secret = args.secret.encode("utf-8") if args.secret else read_secrets(args.secret_file)[0]
    return mint(secret, args.account, args.ttl, time.time(), "probe")


def run(args: argparse.Namespace) -> int:
    """The probe command: 0 when every transport probed relayed, 1 otherwise."""
    if args.regions:
        return _run_regions(args)
    if args.api or len(args.uri) != 1:
        args.parser.error("give one URI, or --regions with NAME=URI arguments or --api URL")
    try:
        host, ports = parse_target(args.uri[0], args.tls_port)
    except ValueError as e:
        args.parser.error(f"{args.uri[0]!r}: {e}")
    if args.transport:
        ports = {t: ports.get(t, args.tls_port if t == TLS else next(iter(ports.values())))
                 for t in args.transport}
    _check_credentials(args)
    try:
        username, password = _credentials(args)
        context = _tls_context(args) if TLS in ports else None
    except (OSError, ValueError) as e:
        print(f"turnrelay probe: {e}", file=sys.stderr)
        return 2
    probe = Probe(host, username, password, args.count, args.size, args.timeout, context,
                  args.peer)
    results = [probe.run(transport, port) for transport, port in ports.items()]
    if args.json:
        print(json.dumps([r.summary() for r in results], indent=2))
    else:
        print(table(results))
    return 0 if all(r.failed_step is None for r in results) else 1


def _check_credentials(args: argparse.Namespace) -> None:
    by_user = args.user is not None and args.password is not None
    by_secret = args.account is not None and (args.secret or args.secret_file) is not None
    if by_user == by_secret:
        args.parser.error("give --user and --password, or --account and --secret "
                          "(or --secret-file)")


# A region to probe: its name, its host and its port per transport.
Target = Tuple[str, str, Dict[str, int]]


def region_target(text: str, tls_port: int) -> Target:
    """NAME=URI, or a URI alone (named by its host and port)."""
    name, sep, uri = text.partition("=")
    if not sep or re.search(r"[:?/\[]", name):
        name, uri = "", text
    host, ports = parse_target(uri, tls_port)
    return name or f"{host}:{next(iter(ports.values()))}", host, ports


def regions_from_api(args: argparse.Namespace) -> Tuple[List[Target], str, str]:
    """The regions the tokens API at --api hands out (`regions=`), in its order, and the
    credential it minted; OSError or ValueError saying why not."""
    url = f"{args.api.rstrip('/')}/v1/accounts/{quote(args.account, safe='')}/tokens"
    form = urlencode({"regions": args.region_count, "ttl": args.ttl, "label": "probe"})
    basic = base64.b64encode(f"{args.account}:{args.api_key}".encode()).decode()
    request = urllib.request.Request(url, form.encode(), method="POST", headers={
        "Authorization": f"Basic {basic}", "Content-Type": "application/x-www-form-urlencoded"})
    context = _tls_context(args) if url.startswith("https:") else None
    try:
        with urllib.request.urlopen(request, timeout=args.timeout, context=context) as answer:
            token = json.load(answer)
    except urllib.error.HTTPError as e:
        try:
            message = json.load(e)["message"]
        except (ValueError, KeyError, TypeError):
            message = e.reason
        raise ValueError(f"the tokens API at {args.api} refused: {e.code} {message}") from None
    except urllib.error.URLError as e:
        raise OSError(f"cannot reach the tokens API at {args.api}: {e.reason}") from None
    targets = []
    for region in token["regions"]:
        host, ports = "", {}
        for server in region["ice_servers"]:
            if server["urls"].startswith("turn"):
                parsed = parse_turn_uri(server["urls"])
                host = parsed.host
                transport = TLS if parsed.secure else parsed.transport or UDP
                ports[transport] = parsed.port or (DEFAULT_TLS_PORT if parsed.secure
                                                   else DEFAULT_PORT)
        targets.append((region["name"], host, ports))
    return targets, token["username"], token["password"]


def _run_regions(args: argparse.Namespace) -> int:
    """--regions: each region probed in turn over the chosen transports (UDP by default),
    side by side, and the one of the lowest median round trip named."""
    if args.api:
        if args.uri:
            args.parser.error("give --api URL or NAME=URI arguments, not both")
        if args.account is None or not args.api_key:
            args.parser.error("--api needs --account and --api-key (or TURNRELAY_API_KEY)")
    elif not args.uri:
        args.parser.error("--regions needs NAME=URI arguments, or --api URL")
    else:
        _check_credentials(args)
    transports = args.transport or [UDP]
    try:
        if args.api:
            targets, username, password = regions_from_api(args)
        else:
            targets = [region_target(text, args.tls_port) for text in args.uri]
            username, password = _credentials(args)
        context = _tls_context(args) if TLS in transports else None
    except (OSError, ValueError) as e:
        print(f"turnrelay probe: {e}", file=sys.stderr)
        return 2
    results = []
    for name, host, ports in targets:
        probe = Probe(host, username, password, args.count, args.size, args.timeout, context,
                      args.peer)
        for transport in transports:
            if transport in ports:
                results.append(probe.run(transport, ports[transport], name))
            else:
                results.append(Result(transport, host, name, "connect",
                                      f"the region has no {transport.upper()} entry"))
    if args.json:
        print(json.dumps({"regions": [r.summary() for r in results],
                          "chosen": chosen_region(results)}, indent=2))
    else:
        print(regions_table(results))
    return 0 if all(r.failed_step is None for r in results) else 1


def _transports(text: str) -> List[str]:
    chosen = [t.strip().lower() for t in text.split(",") if t.strip()]
    unknown = [t for t in chosen if t not in TRANSPORTS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a list of udp, tcp, tls")
    return chosen


def _peer(text: str) -> stun.Address:
    """HOST:PORT or [IPv6]:PORT, resolved to the address XOR-PEER-ADDRESS carries."""
    match = re.fullmatch(r"(?:\[([^\]]+)\]|([^:\[\]]+)):([0-9]{1,5})", text)
    if match is None or not 0 < int(match[3]) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:PORT or [IPv6]:PORT")
    try:
        found = socket.getaddrinfo(match[1] or match[2], int(match[3]), type=socket.SOCK_DGRAM)
    except socket.gaierror as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e.strerror}") from None
    return found[0][4][0], int(match[3])


def _positive(kind: type) -> Any:
    def convert(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a positive number")
        return value
    return convert


def add_command(commands: Any) -> None:
    """The `probe` subcommand of `turnrelay` (relay/cli.py)."""
    parser = commands.add_parser(
        "probe", help="check a TURN server end to end over UDP, TCP and TLS",
        description="Check a TURN server from here: per transport, STUN Binding, two "
                    "allocations relaying numbered packets to each other through the server "
                    "(CreatePermission, ChannelBind), with round-trip times and loss.  Exits 1 "
                    "when any transport fails, naming the step and the likely cause.",
        epilog="turn:HOST:PORT probes UDP and TCP on PORT and TLS on --tls-port; "
               "?transport=udp or tcp narrows it to one; turns:HOST:PORT is TLS on PORT.")
    parser.add_argument("uri", metavar="URI", nargs="*",
                        help="turn:HOST[:PORT][?transport=udp|tcp], turns:HOST[:PORT], or "
                             "HOST[:PORT]; with --regions, one per region, as NAME=URI")
    parser.add_argument("--user", help="a long-term credential's username")
    parser.add_argument("--password", help="its password")
    parser.add_argument("--account", help="mint a TURN REST credential for this account ...")
    parser.add_argument("--secret", help="... with this shared secret")
    parser.add_argument("--secret-file", metavar="FILE",
                        help="... or with the first secret of this file")
    parser.add_argument("--ttl", type=_positive(int), default=600,
                        help="seconds a minted credential lives (default 600)")
    parser.add_argument("--transport", type=_transports,
                        help="the transports to probe, e.g. udp,tls (default: the URI's)")
    parser.add_argument("--tls-port", type=_positive(int), default=DEFAULT_TLS_PORT,
                        help=f"the TLS port for a turn: URI (default {DEFAULT_TLS_PORT})")
    parser.add_argument("--count", type=_positive(int), default=20,
                        help="packets relayed there and back (default 20)")
    parser.add_argument("--size", type=_positive(int), default=100,
                        help="bytes per packet (default 100)")
    parser.add_argument("--peer", type=_peer, metavar="HOST:PORT",
                        help="relay to this UDP echo server (e.g. coturn's turnutils_peer) "
                             "rather than between two allocations of the probe's own")
    parser.add_argument("--timeout", type=_positive(float), default=3.0,
                        help="seconds to wait for an answer (default 3)")
    parser.add_argument("--ca", metavar="FILE", help="trust this CA (or self-signed) "
                        "certificate for TLS")
    parser.add_argument("--insecure", action="store_true",
                        help="do not verify the TLS certificate")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--regions", action="store_true",
                        help="probe several regions side by side (UDP unless --transport says "
                             "otherwise) and name the one of the lowest median round trip: "
                             "those of the NAME=URI arguments, or those --api hands out")
    parser.add_argument("--api", metavar="URL", help="with --regions: the tokens API "
                        "(https://HOST:PORT) whose regions to probe, with a credential it mints "
                        "for --account with --api-key")
    parser.add_argument("--api-key", default=os.environ.get("TURNRELAY_API_KEY"),
                        help="the account's API key (default: $TURNRELAY_API_KEY)")
    parser.add_argument("--region-count", type=_positive(int), default=10, metavar="N",
                        help="with --api: how many regions to ask for, nearest first "
                             "(default 10)")
    parser.set_defaults(main=run, parser=parser)
