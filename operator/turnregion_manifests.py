"""Pure builders: a TurnRegion in, the Kubernetes objects that run its relays out.

Nothing here talks to a cluster, so every child can be checked field by field (and against the
Kubernetes schemas) without one; the kopf handlers in turnregion_operator.py only read, create,
patch, adopt and write status.  A TurnRegion's spec is read through `with_defaults`, whose
DEFAULTS are the same values the CRD's OpenAPI schema declares (a test keeps the two equal), so
an object the API server defaulted and a bare dict in a unit test build the same children.

Children of TurnRegion NAME in its namespace:
    ConfigMap NAME-config         the relay's TOML config (`twistd turnrelay --config`)
    Deployment NAME               the relays; a config hash on the pod template rolls them
    Service NAME-udp, NAME-tcp    one per protocol: Kubernetes 1.20 has no mixed-protocol
                                  LoadBalancer; NAME-tcp carries TCP and TLS
    PodDisruptionBudget NAME      policy/v1 or policy/v1beta1, as the server offers
    NetworkPolicy NAME            when spec.networkPolicy is true
    ConfigMap NAME-alternates     hostNetwork only: the region's endpoint URIs, where a draining
                                  relay redirects new allocations (its --alternate-servers-file)
and, shared by every region of the namespace, ConfigMap turnrelay-regions (the directory):
every region's public host, location and readiness in the relay's --regions-file format, which
each region's relays read (mounted at REGIONS_DIR, re-read when the kubelet updates it), so the
tokens API of every region hands out the nearest region that serves.
"""
from __future__ import annotations

import copy
import hashlib
import ipaddress
import json
from typing import Any, Dict, Iterable, List, Mapping, Optional

GROUP, VERSION, PLURAL, KIND = "turnrelay.io", "v1alpha1", "turnregions", "TurnRegion"
DIRECTORY_NAME = "turnrelay-regions"
CONFIG_PATH = "/etc/turnrelay/turnrelay.toml"
TLS_DIR, AUTH_FILE = "/etc/turnrelay/tls", "/etc/turnrelay/auth/secret"
DSN_FILE = "/etc/turnrelay/accounting/dsn"
API_DSN_FILE = "/etc/turnrelay/api/dsn"
# spec.api.geoipVolume, read-only: a city database is 100 MB or more, beyond what a ConfigMap or
# Secret holds (1 MiB), so it comes from a volume (a PersistentVolumeClaim, an image volume).
GEOIP_DIR = "/etc/turnrelay/geoip"
# A directory mount, not a subPath, so the kubelet brings a rewritten ConfigMap into running pods.
ALTERNATES_DIR = "/etc/turnrelay/alternates"
ALTERNATES_FILE = f"{ALTERNATES_DIR}/endpoints"
# The directory, mounted whole (no subPath) so the kubelet brings a rewritten one into the pods.
REGIONS_DIR = "/etc/turnrelay/regions"
REGIONS_FILE = f"{REGIONS_DIR}/regions.toml"
CONTINENTS = ("AF", "AN", "AS", "EU", "NA", "OC", "SA")  # as relay.web.regions reads them
# On a Node: the address clients reach its hostNetwork relays at, instead of its ExternalIP or
# InternalIP (e.g. a public address a 1:1 NAT maps to the node, or a DNS name).
NODE_ADDRESS = "turnrelay.io/address"
STATE_DIR = "/var/lib/turnrelay"
CONFIG_HASH = "turnrelay.io/config-hash"
# On relay pods: the directory's resourceVersion they were last told of (a change makes the
# kubelet bring the rewritten ConfigMap into the pod at once).
REGIONS_VERSION = "turnrelay.io/regions-version"
SECRET_VERSIONS = "turnrelay.io/secret-versions"
RELAY_UID = 10001
# Draining a relay: the preStop pause lets the endpoints controller take the terminating pod out
# of its Services before SIGTERM; then the relay refuses new allocations, lets live ones run on
# for drainSeconds (its --drain-grace) and writes their usage, within the ledger's 10 s.
PRESTOP_SECONDS, LEDGER_FLUSH_SECONDS = 5, 10

# The CRD's schema defaults, in one place for code that sees a spec the API server never saw.
DEFAULTS: Dict[str, Any] = {
    "replicas": 2,
    "image": "turnrelay:0.1.0",
    "listeners": {"transports": ["udp", "tcp", "tls"], "port": 3478, "tlsPort": 5349,
                  "metricsPort": 9641},
    "relayPorts": {"min": 49152, "max": 65535},
    "exposure": {"serviceType": "LoadBalancer", "hostNetwork": False, "externalIPs": [],
                 "tlsServicePort": 0, "proxyProtocolFrom": []},
    "quotas": {"user": 0, "source": 0, "total": 0, "monthlyMB": 0},
    "drainSeconds": 30,
    "draining": False,
    "networkPolicy": False,
    "clusterCIDRs": [],
    "peers": {"allowed": [], "denied": [], "allowLoopback": False},
}


# Each transport's listener, in the order every child lists them: the port's name in the pod
# and the Services, its protocol, the `listeners` field holding its number, its URI scheme.
LISTENERS = (("udp", "turn-udp", "UDP", "port", "turn"),
             ("tcp", "turn-tcp", "TCP", "port", "turn"),
             ("tls", "turns-tls", "TCP", "tlsPort", "turns"))


def with_defaults(spec: Mapping[str, Any]) -> Dict[str, Any]:
    """`spec` with every absent defaulted field filled in, one level of nesting deep."""
    full = copy.deepcopy(dict(spec))
    for key, default in DEFAULTS.items():
        if isinstance(default, dict):
            full[key] = {**default, **full.get(key, {})}
        else:
            full.setdefault(key, default)
    return full


def spec_problems(spec: Mapping[str, Any]) -> List[str]:
    """What the CRD schema cannot reject on Kubernetes 1.20 (it has no CEL rules): reported by
    the operator as a Degraded condition instead of building children from a broken spec."""
    spec = with_defaults(spec)
    problems = []
    low, high = spec["relayPorts"]["min"], spec["relayPorts"]["max"]
    if low >= high:
        problems.append(f"relayPorts: min {low} must be below max {high}")
    listeners = spec["listeners"]
    transports = set(listeners["transports"])
    if not transports:
        problems.append("listeners.transports: name at least one of udp, tcp, tls")
    if "tls" in transports and ({"udp", "tcp"} & transports) and listeners["port"] == listeners["tlsPort"]:
        problems.append(f"listeners: port and tlsPort are both {listeners['port']}")
    for port in {listeners["port"], listeners["tlsPort"], listeners["metricsPort"]}:
        if low <= port <= high:
            problems.append(f"listeners: port {port} lies inside relayPorts {low}-{high}")
    if listeners["metricsPort"] in {listeners["port"], listeners["tlsPort"]}:
        problems.append(f"listeners: metricsPort {listeners['metricsPort']} is also a TURN port")
    for field, cidrs in (("clusterCIDRs", spec["clusterCIDRs"]),
                         ("peers.allowed", spec["peers"]["allowed"]),
                         ("peers.denied", spec["peers"]["denied"]),
                         ("exposure.proxyProtocolFrom", spec["exposure"]["proxyProtocolFrom"])):
        for cidr in cidrs:
            try:
                ipaddress.ip_network(cidr)
            except ValueError as err:
                problems.append(f"{field}: {err}")
    tls_service = spec["exposure"]["tlsServicePort"]
    if tls_service and "tcp" in transports and tls_service == listeners["port"]:
        problems.append(f"exposure.tlsServicePort {tls_service} is also the TCP port")
    try:
        families = [ipaddress.ip_address(ip).version for ip in spec["exposure"]["externalIPs"]]
    except ValueError as err:
        problems.append(f"exposure.externalIPs: {err}")
        families = []
    if len(families) != len(set(families)):
        problems.append("exposure.externalIPs: give at most one IPv4 and one IPv6 address "
                        "(each is the address clients see for the relay's ports)")
    if spec.get("api"):
        port = spec["api"]["port"]
        if port in {listeners["port"], listeners["tlsPort"], listeners["metricsPort"]} or low <= port <= high:
            problems.append(f"api.port {port} is also a listener or relay port")
        for needed, why in (("tls", "the tokens API serves HTTPS with the region's certificate"),
                            ("auth", "the tokens API mints credentials with the region's shared secret")):
            if not spec.get(needed):
                problems.append(f"api: needs {needed}.secretName ({why})")
        geoip, volume = spec["api"].get("geoipDB"), spec["api"].get("geoipVolume")
        if volume and not geoip:
            problems.append("api.geoipVolume: needs api.geoipDB, the database's path in it")
        elif geoip and not volume and not geoip.startswith("/"):
            problems.append(f"api.geoipDB {geoip!r}: a relative path needs api.geoipVolume "
                            "(else give the absolute path inside the relay image)")
        if volume and len(volume) != 1:
            problems.append("api.geoipVolume: one volume source, e.g. "
                            "{persistentVolumeClaim: {claimName: geoip, readOnly: true}}")
    return problems + location_problems(spec.get("location"))


def location_problems(location: Optional[Mapping[str, Any]]) -> List[str]:
    """What the relays' --regions-file would refuse in `location` (the CRD's schema says the
    same, but a spec may come from elsewhere, or an old CRD without the schema)."""
    if location is None:
        return []
    problems = []
    for key, limit in (("latitude", 90), ("longitude", 180)):
        value = location.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -limit <= value <= limit:
            problems.append(f"location.{key}: {value!r} is not a number of degrees from {-limit} to {limit}")
    country, continent = location.get("country"), location.get("continent")
    if country is not None and not (isinstance(country, str) and len(country) == 2
                                    and country.isascii() and country.isupper()):
        problems.append(f"location.country: {country!r} is not an ISO 3166 code such as \"IE\"")
    if continent is not None and continent not in CONTINENTS:
        problems.append(f"location.continent: {continent!r} is not one of {' '.join(CONTINENTS)}")
    return problems


def labels(body: Mapping[str, Any], component: str = "relay") -> Dict[str, str]:
    """The standard app.kubernetes.io labels, plus the region for `kubectl get -l`."""
    return {
        "app.kubernetes.io/name": "turnrelay",
        "app.kubernetes.io/instance": body["metadata"]["name"],
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": "turnrelay",
        "app.kubernetes.io/managed-by": "turnrelay-operator",
        "turnrelay.io/region": body["spec"]["region"],
    }


def selector(body: Mapping[str, Any]) -> Dict[str, str]:
    """Pod selector: only labels that never change, since a Deployment's selector is immutable."""
    return {"app.kubernetes.io/name": "turnrelay",
            "app.kubernetes.io/instance": body["metadata"]["name"]}


def _meta(body: Mapping[str, Any], name: str, component: str = "relay") -> Dict[str, Any]:
    return {"name": name, "namespace": body["metadata"]["namespace"],
            "labels": labels(body, component)}


def _listener_ports(listeners: Mapping[str, Any]) -> List[Dict[str, Any]]:
    """The enabled listeners, as container ports, in LISTENERS order."""
    return [{"name": name, "containerPort": listeners[field], "protocol": protocol}
            for transport, name, protocol, field, _ in LISTENERS
            if transport in listeners["transports"]]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value)  # integers, and strings: a JSON string is a valid TOML basic string


def relay_config(body: Mapping[str, Any]) -> Dict[str, Any]:
    """The relay's options (the names of `twistd turnrelay --help`) this region runs with."""
    spec = with_defaults(body["spec"])
    listeners, transports = spec["listeners"], set(spec["listeners"]["transports"])
    config: Dict[str, Any] = {
        "region": spec["region"],
        "realm": spec.get("realm", spec["region"]),
        "listening-port": [listeners["port"]],
        "tls-listening-port": [listeners["tlsPort"]],
        "min-port": spec["relayPorts"]["min"],
        "max-port": spec["relayPorts"]["max"],
        "user-quota": spec["quotas"]["user"],
        "source-quota": spec["quotas"]["source"],
        "total-quota": spec["quotas"]["total"],
        "state-dir": STATE_DIR,
        "drain-grace": spec["drainSeconds"],
        # /metrics, /healthz and /readyz for Prometheus and the kubelet's probes, on the pod IP.
        "prometheus": True,
        "prometheus-address": "0.0.0.0",
        "prometheus-port": listeners["metricsPort"],
        # The other regions, where they are and whether they serve (the directory, mounted).
        "regions-file": REGIONS_FILE,
    }
    for transport in ("udp", "tcp", "tls"):
        if transport not in transports:
            config[f"no-{transport}"] = True
    if spec["exposure"]["externalIPs"]:
        config["external-ip"] = list(spec["exposure"]["externalIPs"])
    if spec.get("tls"):
        config["cert"], config["pkey"] = f"{TLS_DIR}/tls.crt", f"{TLS_DIR}/tls.key"
    if spec.get("auth"):
        config["auth"] = [f"rest-secret:secret-file={AUTH_FILE}"]
    if spec.get("workers"):
        config["workers"] = spec["workers"]
    peers = spec["peers"]
    if peers["allowed"]:
        config["allowed-peer-ip"] = list(peers["allowed"])
    if peers["denied"]:
        config["denied-peer-ip"] = list(peers["denied"])
    if peers["allowLoopback"]:
        config["allow-loopback-peers"] = True
    if spec["clusterCIDRs"]:
        config["cluster-cidr"] = cluster_networks(spec)
    if spec["exposure"]["hostNetwork"]:
        config["alternate-servers-file"] = ALTERNATES_FILE
    if spec["exposure"]["proxyProtocolFrom"]:
        config["proxy-protocol-from"] = list(spec["exposure"]["proxyProtocolFrom"])
    if spec.get("api"):
        # Every pod serves the tokens API on its own address; the TCP Service carries its port.
        config.update({"api-port": spec["api"]["port"], "api-listening-ip": "0.0.0.0",
                       "api-cert": f"{TLS_DIR}/tls.crt", "api-pkey": f"{TLS_DIR}/tls.key",
                       "api-secret-file": AUTH_FILE})
        if spec["api"].get("geoipDB"):
            config["geoip-db"] = geoip_path(spec["api"])
    if spec["quotas"]["monthlyMB"]:
        config["monthly-quota-mb"] = str(spec["quotas"]["monthlyMB"])
    if spec.get("ratePerMB") is not None:
        # A TOML string, as the relay wants money: the shortest text of the JSON number the
        # API server stored is the decimal the user wrote (up to 15 significant digits).
        config["rate-per-mb"] = repr(spec["ratePerMB"])
    return config


def geoip_path(api: Mapping[str, Any]) -> str:
    """spec.api.geoipDB as the relay reads it: a relative path lies in spec.api.geoipVolume,
    an absolute one in the relay's image."""
    path = api["geoipDB"]
    return path if path.startswith("/") else f"{GEOIP_DIR}/{path}"


def cluster_networks(spec: Mapping[str, Any]) -> List[str]:
    """The relay's --cluster-cidr: `clusterCIDRs` less the `peers.allowed` CIDRs that lie
    wholly inside one of them.  The relay refuses its cluster networks above every allow rule,
    so a broad rule (10.0.0.0/8 for a media network) never opens the cluster by accident; a
    CIDR inside a cluster network (an in-cluster SFU's pods) can only be there on purpose, and
    is cut out of it."""
    spec = with_defaults(spec)
    holes = [ipaddress.ip_network(cidr) for cidr in spec["peers"]["allowed"]]
    kept: List[Any] = []
    for cidr in spec["clusterCIDRs"]:
        network = ipaddress.ip_network(cidr)
        parts = [network]
        for hole in holes:
            if hole.version != network.version or not hole.subnet_of(network):  # type: ignore[arg-type]
                continue
            parts = [rest for part in parts for rest in
                     (part.address_exclude(hole) if hole.subnet_of(part) else  # type: ignore[arg-type]
                      [] if part.subnet_of(hole) else [part])]  # type: ignore[arg-type]
        kept.extend(sorted(parts))
    return [str(network) for network in kept]


def config_toml(body: Mapping[str, Any]) -> str:
    return "".join(f"{key} = {_toml_value(value)}\n" for key, value in relay_config(body).items())


def config_map(body: Mapping[str, Any]) -> Dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": _meta(body, f"{body['metadata']['name']}-config"),
            "data": {"turnrelay.toml": config_toml(body)}}


def command(body: Mapping[str, Any]) -> List[str]:
    """The relay's command line.  A DSN is a secret that must not sit in the ConfigMap, and the
    TOML file cannot refer to a file for it, so with an accounting DSN (the region's relays
    share one usage ledger; without it each relay keeps its own SQLite ledger in its state
    directory) or the tokens API's account database a shell reads the mounted Secrets into
    `--accounting postgresql:dsn=...` and `--api-db ...` and execs twistd."""
    twistd = ["twistd", "--nodaemon", "--pidfile=", "--logfile=-", "turnrelay", "--config", CONFIG_PATH]
    reads = []
    if body["spec"].get("accounting"):
        reads.append(f'--accounting "postgresql:dsn=$(cat {DSN_FILE})"')
    if body["spec"].get("api"):
        reads.append(f'--api-db "$(cat {API_DSN_FILE})"')
    if not reads:
        return twistd
    return ["sh", "-c", "exec " + " ".join(twistd + reads)]


def _secret_volume(name: str, secret: str, items: Optional[List[Dict[str, str]]] = None) -> Dict[str, Any]:
    source: Dict[str, Any] = {"secretName": secret, "defaultMode": 0o440}
    if items:
        source["items"] = items
    return {"name": name, "secret": source}


def _probe(path: str, period: int) -> Dict[str, Any]:
    """An HTTP probe of the relay's health endpoints: /readyz answers 503 from the moment a
    draining relay stops taking allocations, /healthz only says the process is alive."""
    return {"httpGet": {"path": path, "port": "metrics"}, "periodSeconds": period,
            "failureThreshold": 3}


def deployment(body: Mapping[str, Any], secret_versions: str = "") -> Dict[str, Any]:
    """The relays.  The pod template carries the config's hash and the mounted Secrets'
    resourceVersions, so a changed config, certificate or secret is a rolling update."""
    spec = with_defaults(body["spec"])
    name = body["metadata"]["name"]
    listeners = spec["listeners"]
    host_network = spec["exposure"]["hostNetwork"]
    ports = _listener_ports(listeners) + _api_port(spec) + [
        {"name": "metrics", "containerPort": listeners["metricsPort"], "protocol": "TCP"}]
    mounts = [{"name": "config", "mountPath": CONFIG_PATH, "subPath": "turnrelay.toml", "readOnly": True},
              {"name": "state", "mountPath": STATE_DIR},
              # The root filesystem is read-only; the parent of workers keeps the table of live
              # relay ports it shares with them in a temporary file.
              {"name": "tmp", "mountPath": "/tmp"}]
    # The directory is not optional: the operator writes it before the Deployment, and a relay
    # started without it would never see the other regions.
    mounts.append({"name": "regions", "mountPath": REGIONS_DIR, "readOnly": True})
    volumes: List[Dict[str, Any]] = [
        {"name": "config", "configMap": {"name": f"{name}-config"}},
        {"name": "state", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {"medium": "Memory"}},
        {"name": "regions", "configMap": {"name": DIRECTORY_NAME}}]
    if spec.get("tls"):
        volumes.append(_secret_volume("tls", spec["tls"]["secretName"]))
        mounts.append({"name": "tls", "mountPath": TLS_DIR, "readOnly": True})
    if host_network:
        volumes.append({"name": "alternates",
                        "configMap": {"name": f"{name}-alternates", "optional": True}})
        mounts.append({"name": "alternates", "mountPath": ALTERNATES_DIR, "readOnly": True})
    for volume, ref, path in (("auth", spec.get("auth"), AUTH_FILE),
                              ("accounting", spec.get("accounting"), DSN_FILE),
                              ("api", spec.get("api"), API_DSN_FILE)):
        if ref:
            directory, filename = path.rsplit("/", 1)
            volumes.append(_secret_volume(volume, ref["secretName"],
                                          [{"key": ref.get("key", filename), "path": filename}]))
            mounts.append({"name": volume, "mountPath": directory, "readOnly": True})
    if spec.get("api", {}).get("geoipVolume"):
        volumes.append({**spec["api"]["geoipVolume"], "name": "geoip"})
        mounts.append({"name": "geoip", "mountPath": GEOIP_DIR, "readOnly": True})
    container: Dict[str, Any] = {
        "name": "turnrelay",
        "image": spec["image"],
        "command": command(body),
        "ports": ports,
        "volumeMounts": mounts,
        "resources": spec.get("resources", {}),
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(PRESTOP_SECONDS)]}}},
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}},
    }
    container["readinessProbe"], container["livenessProbe"] = _probe("/readyz", 5), _probe("/healthz", 20)
    pod_spec: Dict[str, Any] = {
        "containers": [container],
        "volumes": volumes,
        "terminationGracePeriodSeconds": PRESTOP_SECONDS + spec["drainSeconds"] + LEDGER_FLUSH_SECONDS + 5,
        "automountServiceAccountToken": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": RELAY_UID, "runAsGroup": RELAY_UID,
                            "fsGroup": RELAY_UID, "seccompProfile": {"type": "RuntimeDefault"}},
    }
    for key in ("nodeSelector", "tolerations", "affinity"):
        if spec.get(key):
            pod_spec[key] = spec[key]
    if host_network:
        # Relay ports on the node's own addresses: one relay per node, since they would collide.
        pod_spec["hostNetwork"], pod_spec["dnsPolicy"] = True, "ClusterFirstWithHostNet"
        pod_spec.setdefault("affinity", {}).setdefault("podAntiAffinity", {
            "requiredDuringSchedulingIgnoredDuringExecution": [
                {"labelSelector": {"matchLabels": selector(body)},
                 "topologyKey": "kubernetes.io/hostname"}]})
    annotations = {CONFIG_HASH: hashlib.sha256(config_toml(body).encode()).hexdigest()[:16]}
    if secret_versions:
        annotations[SECRET_VERSIONS] = secret_versions
    # On the pod network a new relay starts before an old one stops: never below replicas.
    # A hostNetwork relay holds its node's ports, so a surge needs a spare node and would stall
    # the roll on a full region; instead one relay at a time stops, and only once the others
    # are ready (the Deployment keeps replicas - 1 available), so a region of two or more never
    # lacks a ready relay.  One replica cannot have that: see `rollout_note`.
    surge = {"maxSurge": 0, "maxUnavailable": 1} if host_network else {"maxSurge": 1, "maxUnavailable": 0}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": _meta(body, name),
        "spec": {
            "replicas": spec["replicas"],
            "selector": {"matchLabels": selector(body)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": surge},
            "template": {"metadata": {"labels": labels(body), "annotations": annotations},
                         "spec": pod_spec},
        },
    }


def rollout_note(spec: Mapping[str, Any]) -> str:
    """What a roll or an eviction costs this region, said in its Progressing condition."""
    spec = with_defaults(spec)
    if spec["exposure"]["hostNetwork"] and spec["replicas"] == 1:
        return ("one hostNetwork relay: a roll or an eviction leaves the region without a ready "
                "relay until its successor is ready (live allocations run on for drainSeconds; "
                "new Allocates get 508); run two or more on two or more nodes to avoid it")
    return "rolls keep a ready relay"


def alternates_config_map(body: Mapping[str, Any], endpoints: Iterable[str]) -> Dict[str, Any]:
    """ConfigMap NAME-alternates of a hostNetwork region: its endpoint URIs (one per ready
    relay's node), the file a draining relay picks a ready peer from for its 300 redirects."""
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": _meta(body, f"{body['metadata']['name']}-alternates"),
            "data": {ALTERNATES_FILE.rsplit("/", 1)[1]: "".join(f"{uri}\n" for uri in endpoints)}}


def _api_port(spec: Mapping[str, Any]) -> List[Dict[str, Any]]:
    """The tokens API's port, when the region serves it (spec.api), as a container port."""
    if not spec.get("api"):
        return []
    return [{"name": "api", "containerPort": spec["api"]["port"], "protocol": "TCP"}]


def _service_port(spec: Mapping[str, Any], name: str, container_port: int) -> int:
    """A listener's port on its Service: the container's, but for TLS exposure.tlsServicePort
    when set (443 through firewalls, while the relay, not root, listens on an unprivileged one)."""
    if name == "turns-tls" and spec["exposure"]["tlsServicePort"]:
        return spec["exposure"]["tlsServicePort"]
    return container_port


def services(body: Mapping[str, Any]) -> List[Dict[str, Any]]:
    """One Service per protocol (1.20 has no mixed-protocol LoadBalancer), for the enabled
    listeners only.  External traffic stays on the node it arrived at so the relay sees the
    client's own address, which its nonces, quotas and XOR-MAPPED-ADDRESS depend on."""
    spec = with_defaults(body["spec"])
    name, exposure = body["metadata"]["name"], spec["exposure"]
    listening = _listener_ports(spec["listeners"]) + _api_port(spec)
    built = []
    for protocol in ("UDP", "TCP"):
        ports = [{"name": p["name"], "protocol": protocol,
                  "port": _service_port(spec, p["name"], p["containerPort"]),
                  "targetPort": p["containerPort"]} for p in listening if p["protocol"] == protocol]
        if not ports:
            continue
        service_spec: Dict[str, Any] = {"type": exposure["serviceType"], "selector": selector(body),
                                        "ports": ports}
        if exposure["serviceType"] != "ClusterIP":
            service_spec["externalTrafficPolicy"] = "Local"
        if exposure["externalIPs"]:
            service_spec["externalIPs"] = list(exposure["externalIPs"])
        built.append({"apiVersion": "v1", "kind": "Service",
                      "metadata": _meta(body, f"{name}-{protocol.lower()}"), "spec": service_spec})
    return built


def pod_disruption_budget(body: Mapping[str, Any], api_version: str) -> Dict[str, Any]:
    """At most one relay down at a time for voluntary disruptions (drains, upgrades)."""
    return {"apiVersion": api_version, "kind": "PodDisruptionBudget",
            "metadata": _meta(body, body["metadata"]["name"]),
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector(body)}}}


def network_policy(body: Mapping[str, Any]) -> Dict[str, Any]:
    """Ingress to the relays on their TCP listeners and on UDP: UDP without a port admits the
    whole relay range, which a NetworkPolicy cannot name on 1.20 (no endPort before 1.22).
    The metrics port admits pods of any namespace (Prometheus), nothing from outside."""
    spec = with_defaults(body["spec"])
    listeners = spec["listeners"]
    ports = [{"protocol": "UDP"}] + [{"protocol": "TCP", "port": p["containerPort"]}
                                     for p in _listener_ports(listeners) + _api_port(spec)
                                     if p["protocol"] == "TCP"]
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": _meta(body, body["metadata"]["name"]),
            "spec": {"podSelector": {"matchLabels": selector(body)}, "policyTypes": ["Ingress"],
                     "ingress": [{"ports": ports},
                                 {"ports": [{"protocol": "TCP", "port": listeners["metricsPort"]}],
                                  "from": [{"namespaceSelector": {}}]}]}}


def children(body: Mapping[str, Any], pdb_api_version: str = "policy/v1",
             secret_versions: str = "") -> List[Dict[str, Any]]:
    """Every object the region should own, in the order they are best created."""
    built = [config_map(body), *services(body), deployment(body, secret_versions),
             pod_disruption_budget(body, pdb_api_version)]
    spec = with_defaults(body["spec"])
    if spec["networkPolicy"]:
        built.append(network_policy(body))
    if spec["exposure"]["hostNetwork"]:
        built.append(alternates_config_map(body, (body.get("status") or {}).get("endpoints") or []))
    return built


def node_address(node: Mapping[str, Any]) -> Optional[str]:
    """Where clients reach a node's hostNetwork relays: its turnrelay.io/address annotation,
    else its ExternalIP, else its InternalIP (the first of each kind the node reports)."""
    override = (node["metadata"].get("annotations") or {}).get(NODE_ADDRESS)
    if override:
        return override
    addresses = (node.get("status") or {}).get("addresses") or []
    for kind in ("ExternalIP", "InternalIP"):
        for address in addresses:
            if address.get("type") == kind and address.get("address"):
                return address["address"]
    return None


def pod_ready(pod: Mapping[str, Any]) -> bool:
    """Ready by the kubelet's probes, and not on its way out."""
    if pod["metadata"].get("deletionTimestamp"):
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (pod.get("status") or {}).get("conditions") or [])


def relay_nodes(pods: Iterable[Mapping[str, Any]]) -> List[str]:
    """The names of the nodes running a ready relay, sorted (one relay per node with hostNetwork)."""
    return sorted({pod["spec"]["nodeName"] for pod in pods
                   if pod_ready(pod) and pod.get("spec", {}).get("nodeName")})


def endpoint_hosts(spec: Mapping[str, Any], service_statuses: Iterable[Mapping[str, Any]],
                   node_addresses: Iterable[str] = ()) -> List[str]:
    """Where clients reach the region: the explicit external IPs; else, with hostNetwork, the
    addresses of the nodes running ready relays (`node_address` of each); else the load
    balancers' ingress addresses (IP or host name) in the order the Services report them."""
    exposure = with_defaults(spec)["exposure"]
    if exposure["externalIPs"]:
        return list(exposure["externalIPs"])
    hosts: List[str] = []
    if exposure["hostNetwork"]:
        for host in node_addresses:
            if host not in hosts:
                hosts.append(host)
        return hosts
    for status in service_statuses:
        for ingress in (status or {}).get("loadBalancer", {}).get("ingress", []) or []:
            host = ingress.get("ip") or ingress.get("hostname")
            if host and host not in hosts:
                hosts.append(host)
    return hosts


def endpoint_uris(spec: Mapping[str, Any], hosts: Iterable[str]) -> List[str]:
    """turn:/turns: URIs (RFC 7065) for each host and enabled transport."""
    full = with_defaults(spec)
    listeners = full["listeners"]
    uris = []
    for host in hosts:
        shown = f"[{host}]" if ":" in host else host
        for transport, name, protocol, field, scheme in LISTENERS:
            if transport in listeners["transports"]:
                port = _service_port(full, name, listeners[field])
                uris.append(f"{scheme}:{shown}:{port}?transport={protocol.lower()}")
    return uris


def condition(kind: str, status: bool, reason: str, message: str, now: str,
              previous: Iterable[Mapping[str, Any]] = ()) -> Dict[str, Any]:
    """A status condition whose lastTransitionTime moves only when its status changes."""
    value = "True" if status else "False"
    since = now
    for old in previous:
        if old.get("type") == kind and old.get("status") == value:
            since = old.get("lastTransitionTime", now)
    return {"type": kind, "status": value, "reason": reason, "message": message,
            "lastTransitionTime": since}


def region_status(body: Mapping[str, Any], deployment_status: Optional[Mapping[str, Any]],
                  service_statuses: Iterable[Mapping[str, Any]], problems: List[str],
                  now: str, node_addresses: Iterable[str] = ()) -> Dict[str, Any]:
    """The TurnRegion's status from what its children report (and, with hostNetwork, the
    addresses of the nodes running its ready relays).  A spec the operator refuses
    (`problems`) is Degraded and keeps the children of the last good spec running."""
    spec = with_defaults(body["spec"])
    previous = (body.get("status") or {}).get("conditions", [])
    deployed = deployment_status or {}
    wanted, ready = spec["replicas"], deployed.get("readyReplicas", 0)
    updated = deployed.get("updatedReplicas", 0)
    hosts = endpoint_hosts(spec, service_statuses, node_addresses)
    rolling = deployment_status is None or updated < wanted or deployed.get("replicas", 0) > wanted
    if problems:
        degraded = condition("Degraded", True, "InvalidSpec", "; ".join(problems), now, previous)
    elif wanted and not ready:
        degraded = condition("Degraded", False, "NoPodReadyYet", "waiting for the first relay", now, previous)
    else:
        degraded = condition("Degraded", False, "AsExpected", "children match the spec", now, previous)
    conditions = [
        condition("Ready", bool(wanted) and ready >= wanted and not problems,
                  "InvalidSpec" if problems else "ScaledToZero" if not wanted
                  else "ReplicasReady" if ready >= wanted else "ReplicasNotReady",
                  f"{ready}/{wanted} relays ready", now, previous),
        condition("Progressing", rolling, "RollingUpdate" if rolling else "Complete",
                  f"{updated}/{wanted} relays updated; {rollout_note(spec)}", now, previous),
        degraded,
    ]
    status: Dict[str, Any] = {
        "observedGeneration": body["metadata"].get("generation", 0),
        "replicas": wanted,
        "readyReplicas": ready,
        # None, not "": a merge patch then removes a stale host (and 1.20 stores "" as null).
        "endpoint": hosts[0] if hosts else None,
        "endpoints": endpoint_uris(spec, hosts),
        "conditions": conditions,
    }
    return status


def serving(body: Mapping[str, Any]) -> Dict[str, bool]:
    """The region's `ready` and `draining` in the directory: ready while one relay or more is
    ready (the Deployment's readyReplicas, in the status); draining when its spec says so or it
    is scaled to zero, so the tokens APIs stop handing it out before its last relay goes.  (A
    deleted region leaves the directory at once.)"""
    spec, status = with_defaults(body["spec"]), body.get("status") or {}
    return {"ready": status.get("readyReplicas", 0) > 0,
            "draining": bool(spec["draining"]) or spec["replicas"] == 0}


def regions_entry(body: Mapping[str, Any]) -> str:
    """The region's table in --regions-file format (relay.web.regions): its first public host,
    the ports clients reach it on, its location, and whether it serves."""
    spec, status = with_defaults(body["spec"]), body.get("status") or {}
    listeners = spec["listeners"]
    entry: Dict[str, Any] = {"host": status["endpoint"], "port": listeners["port"],
                             "tls-port": _service_port(spec, "turns-tls", listeners["tlsPort"])}
    location = spec.get("location") or {}
    for key in ("latitude", "longitude", "country", "continent"):
        if location.get(key) is not None:
            entry[key] = location[key]
    entry.update(serving(body))
    return f"[regions.{json.dumps(spec['region'])}]\n" + "".join(
        f"{key} = {_toml_value(value)}\n" for key, value in entry.items())


def directory(regions: Iterable[Mapping[str, Any]], namespace: str) -> Dict[str, Any]:
    """ConfigMap turnrelay-regions: every region's endpoints, location, readiness and rate.
    `regions.toml` is the --regions-file every region's relays read (regions with a public
    host only; empty until one has); `regions.json` adds the URIs, the rate per MB and the
    ready relays for anything else that wants them."""
    toml, table = [], {}
    for body in sorted(regions, key=lambda b: b["spec"]["region"]):
        spec, status = with_defaults(body["spec"]), body.get("status") or {}
        table[spec["region"]] = {"turnRegion": body["metadata"]["name"],
                                 "endpoints": status.get("endpoints", []),
                                 "ratePerMB": spec.get("ratePerMB"),
                                 "readyReplicas": status.get("readyReplicas", 0),
                                 "location": spec.get("location"),
                                 **serving(body)}
        if status.get("endpoint"):
            toml.append(regions_entry(body))
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": DIRECTORY_NAME, "namespace": namespace,
                         "labels": {"app.kubernetes.io/name": "turnrelay",
                                    "app.kubernetes.io/component": "region-directory",
                                    "app.kubernetes.io/part-of": "turnrelay",
                                    "app.kubernetes.io/managed-by": "turnrelay-operator"}},
            "data": {"regions.toml": "\n".join(toml),
                     "regions.json": json.dumps(table, indent=2, sort_keys=True) + "\n"}}
