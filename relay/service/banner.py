"""The start banner: one log event, from the parent of workers once they are all ready (or
from the single relay process once it listens), saying what runs and how to use it.

At the default --log-level it is the whole start (relay.service.loglevel); on a first run
(relay.service.first_run) it ends with lines to paste: the ICE server entry, a
`turnutils_uclient` command that relays through this relay as printed, the /test page's URL
and a `curl` that mints a credential.
"""
from __future__ import annotations

import ipaddress
import json
import os
import platform
import shlex
import socket
from typing import Dict, List, Optional, Tuple
from urllib.parse import urlencode

from relay import SOFTWARE
from relay.ledger.records import IUsageBackend
from relay.ledger.sql import SqlUsageBackend
from relay.service.first_run import FirstRun
from relay.service.options import Options
from relay.service.runtime import collector_hint
from relay.storage.sqldb import without_password

Listener = Tuple[str, str, int]  # transport, host, port


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def public_host(options: Options, relay_ips: Dict[int, str]) -> str:
    """The host clients elsewhere reach this relay by: --public-host, else the first
    --external-ip, else the first relay address (the tokens API's ICE servers say it too)."""
    external = options["external-ip"]
    return options["public-host"] or (external[0].partition("/")[0] if external
                                      else next(iter(relay_ips.values())))


def local_host(options: Options) -> str:
    """The address a client on this machine reaches the listeners at."""
    for ip in options["listening-ip"]:
        if not ipaddress.ip_address(ip).is_unspecified:
            return ip
    return "127.0.0.1"


def _listeners(listeners: List[Listener]) -> str:
    """`udp+tcp [0.0.0.0]:3478 [::]:3478, tls ...`: transports sharing addresses together."""
    by_address: Dict[Tuple[str, int], List[str]] = {}
    for transport, host, port in listeners:
        by_address.setdefault((host, port), []).append(transport)
    groups: Dict[str, List[str]] = {}
    for (host, port), transports in by_address.items():
        groups.setdefault("+".join(transports), []).append(_hostport(host, port))
    return ", ".join(f"{name} {' '.join(addresses)}" for name, addresses in groups.items())


def _credentials(options: Options, first: Optional[FirstRun]) -> str:
    if first is not None:
        return f"first-run account {first.username} ({first.path}){' made now' if first.made else ''}"
    sources = []
    if options["user"]:
        sources.append(f"--user ({len(options['user'])})")
    if options["users-file"]:
        sources.append(f"--users-file {options['users-file']}")
    sources += [f"--auth {description.split(':', 1)[0]}" for description in options["auth"]]
    if options["static-auth-secret"]:
        sources.append("--static-auth-secret")
    return ", ".join(sources) or ("none: every TURN request is refused (--no-first-run and no "
                                  "--user, --users-file or --auth)")


def _ledger(options: Options, backends: Dict[str, IUsageBackend]) -> str:
    names = [f"{name} {without_password(backend.dsn).removeprefix('sqlite://')}"
             if isinstance(backend, SqlUsageBackend) else name
             for name, backend in backends.items()]
    return (f"{', '.join(names)}; region {options['region']}, every "
            f"{options['accounting-interval']} s")


def _tls(options: Options) -> Optional[str]:
    if options["no-tls"]:
        return None
    if options["cert"]:
        return f"certificate {options['cert']}"
    cert = os.path.join(options["state-dir"], "self-signed-cert.pem")
    return (f"self-signed certificate {cert}: browsers and turns: clients refuse it; give "
            f"--cert and --pkey for TLS that works")


def banner(options: Options, workers: int, listeners: List[Listener],
           relay_ips: Dict[int, str], external_ips: Dict[str, str],
           http: List[Tuple[str, str]], backends: Dict[str, IUsageBackend],
           first: Optional[FirstRun]) -> str:
    """The banner's text; `http` holds (what, base URL) of the HTTP listeners."""
    relays = ", ".join(ip if external_ips.get(ip, ip) == ip else f"{ip} (seen as {external_ips[ip]})"
                       for ip in relay_ips.values())
    lines = [f"{SOFTWARE} ready: {f'{workers} workers' if workers > 1 else '1 process'} "
             f"({platform.python_implementation()} {platform.python_version()}, data plane "
             f"{options['dataplane']}: {options['dataplane-why']}), realm "
             f"{options['realm'] or socket.getfqdn()}",
             f"listening: {_listeners(listeners)}",
             f"relaying from: {relays}, ports {options['min-port']}-{options['max-port']}",
             f"credentials: {_credentials(options, first)}",
             f"usage ledger: {_ledger(options, backends)}"]
    hint = collector_hint(workers)
    if hint:
        lines.append(hint)
    tls = _tls(options)
    if tls:
        lines.append(f"TLS: {tls}")
    for what, url in http:
        lines.append(f"{what}: {url}")
    api = next((url for what, url in http if what == "tokens API"), None)
    if first is not None and api is not None:
        lines += _first_run_lines(options, relay_ips, first, api)
    return "\n".join(lines)


def _first_run_lines(options: Options, relay_ips: Dict[int, str], first: FirstRun,
                     api: str) -> List[str]:
    port = options["listening-port"][0]
    transports = [t for t in ("udp", "tcp") if not options[f"no-{t}"]]
    urls = [f"turn:{_url_host(public_host(options, relay_ips))}:{port}?transport={t}"
            for t in transports]
    ice = json.dumps({"urls": urls, "username": first.username, "credential": first.password})
    # -y: two allocations relaying to each other; -s: Send indications, as uclient's channel
    # numbers are RFC 5766's (--rfc5766-channels).
    uclient = ["turnutils_uclient", "-y", "-s", "-u", first.username, "-w", first.password]
    if port != 3478:
        uclient += ["-p", str(port)]
    if options["no-udp"]:
        uclient.append("-t")
    uclient.append(local_host(options))
    fragment = {"account": first.username, "apikey": first.api_key}
    if not options["cert"]:  # browsers refuse the self-signed certificate: test TURN only
        fragment["transports"] = ",".join(transports)
    mint = ["curl", "-s", "-u", f"{first.username}:{first.api_key}", "-d", "ttl=3600",
            f"{api}v1/accounts/{first.username}/tokens"]
    return [f"first run: paste these (kept in {first.path}; any --user or --auth, or "
            "--no-first-run, turns this off)",
            f"  ICE server:   {ice}",
            f"  relay test:   {shlex.join(uclient)}",
            f"  browser test: {api}test#{urlencode(fragment)}",
            f"  new token:    {shlex.join(mint)}"]
