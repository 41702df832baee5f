"""The operator's pure builders: each child of a TurnRegion, checked without a cluster.

Built-in kinds are checked against the Kubernetes schemas by kubernetes-validate (strict: an
unknown field fails); the ConfigMap is proven by running turnrelay locally with it.
"""
from __future__ import annotations

import copy
import ipaddress
import json
import os
import pathlib
import ssl
import time
import urllib.request

import kubernetes_validate
import pytest
import tomllib
import turnregion_manifests as m
import yaml

from relay.auth.tokens import mint
from relay.service.host import usable_cpus
from relay.service.options import Options
from relay.web.regions import choose, regions_from_table
from support.aioice_client import relay_round_trips
from support.api import Api
from support.certs import make_cert
from support.config_volume import kubelet_write
from support.db import create_accounts
from support.k8s_cluster import SCHEMA_VERSION, wait_for
from support.servers import RELAY_PORTS, free_port, launch

CRD = pathlib.Path(__file__).resolve().parents[2] / "helm" / "turnrelay" / "crds" / "turnregions.turnrelay.io.yaml"
# The oldest schema kubernetes-validate ships; the real 1.20 API server checks the rest.
FULL_SPEC = {
    "region": "eu-west", "replicas": 3, "image": "registry.example/turnrelay:1.2",
    "realm": "example.org",
    "listeners": {"transports": ["udp", "tcp", "tls"], "port": 3478, "tlsPort": 5349},
    "relayPorts": {"min": 50000, "max": 60000},
    "exposure": {"serviceType": "NodePort", "hostNetwork": True, "externalIPs": ["203.0.113.7"],
                 "tlsServicePort": 443, "proxyProtocolFrom": ["10.0.0.0/8"]},
    "tls": {"secretName": "relay-cert"},
    "auth": {"secretName": "rest-secret", "key": "shared"},
    "accounting": {"secretName": "ledger", "key": "dsn"},
    "ratePerMB": 0.004, "quotas": {"user": 5, "source": 10, "total": 1000, "monthlyMB": 50000},
    "drainSeconds": 20, "workers": 2, "draining": False,
    "location": {"latitude": 53.35, "longitude": -6.26, "country": "IE", "continent": "EU"}, "networkPolicy": True, "clusterCIDRs": ["10.244.0.0/16", "10.96.0.0/12"],
    "resources": {"requests": {"cpu": "500m", "memory": "256Mi"}},
    "nodeSelector": {"turnrelay.io/edge": "true"},
    "tolerations": [{"key": "edge", "operator": "Exists", "effect": "NoSchedule"}],
}


def region(spec, name="eu", namespace="relays", generation=1):
    return {"apiVersion": "turnrelay.io/v1alpha1", "kind": "TurnRegion",
            "metadata": {"name": name, "namespace": namespace, "generation": generation,
                         "uid": "0000-1111"},
            "spec": spec}


def by_kind(children):
    return {(c["kind"], c["metadata"]["name"]): c for c in children}


def crd_spec_schema():
    crd = yaml.safe_load(CRD.read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]


def test_defaults_are_the_crd_schema_defaults():
    properties = crd_spec_schema()["properties"]
    for key, default in m.DEFAULTS.items():
        if isinstance(default, dict):
            assert properties[key]["default"] == {}, key
            nested = {k: v["default"] for k, v in properties[key]["properties"].items()}
            assert nested == default, key
        else:
            assert properties[key]["default"] == default, key


@pytest.mark.parametrize("spec", [{"region": "us-east"}, FULL_SPEC], ids=["minimal", "full"])
def test_children_pass_the_kubernetes_schemas(spec):
    for child in m.children(region(spec), "policy/v1", "tls=12345"):
        kubernetes_validate.validate(child, SCHEMA_VERSION, strict=True)


def test_children_of_a_minimal_region():
    children = by_kind(m.children(region({"region": "us-east"})))
    assert sorted(children) == [("ConfigMap", "eu-config"), ("Deployment", "eu"),
                                ("PodDisruptionBudget", "eu"), ("Service", "eu-tcp"),
                                ("Service", "eu-udp")]
    for child in children.values():
        assert child["metadata"]["namespace"] == "relays"
        assert child["metadata"]["labels"]["app.kubernetes.io/instance"] == "eu"
        assert child["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "turnrelay-operator"
        assert child["metadata"]["labels"]["turnrelay.io/region"] == "us-east"
    udp, tcp = children[("Service", "eu-udp")]["spec"], children[("Service", "eu-tcp")]["spec"]
    assert [(p["protocol"], p["port"]) for p in udp["ports"]] == [("UDP", 3478)]
    assert [(p["protocol"], p["port"]) for p in tcp["ports"]] == [("TCP", 3478), ("TCP", 5349)]
    assert udp["type"] == "LoadBalancer" and udp["externalTrafficPolicy"] == "Local"
    deployment = children[("Deployment", "eu")]["spec"]
    assert deployment["replicas"] == 2
    pod = deployment["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == ["twistd", "--nodaemon", "--pidfile=", "--logfile=-",
                                    "turnrelay", "--config", m.CONFIG_PATH]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert {"name": "metrics", "containerPort": 9641, "protocol": "TCP"} in container["ports"]
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    # The kubelet waits for the preStop pause, the relay's drain and its last ledger writes.
    assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]
    assert pod["terminationGracePeriodSeconds"] == 5 + 30 + 10 + 5  # drainSeconds defaults to 30
    assert "drain-grace = 20\n" in m.config_toml(region(FULL_SPEC))
    assert "workers = 2\n" in m.config_toml(region(FULL_SPEC))
    assert "workers" not in m.config_toml(region({"region": "eu"}))  # the pod's CPUs decide
    assert "hostNetwork" not in pod


def test_secrets_are_mounted_never_inlined():
    children = m.children(region(FULL_SPEC), "policy/v1beta1", "tls=77")
    text = yaml.safe_dump_all(children)
    assert "secretKeyRef" not in text
    deployment = by_kind(children)[("Deployment", "eu")]
    pod = deployment["spec"]["template"]["spec"]
    secrets = {v["name"]: v["secret"] for v in pod["volumes"] if "secret" in v}
    assert secrets["tls"]["secretName"] == "relay-cert"
    assert secrets["auth"]["items"] == [{"key": "shared", "path": "secret"}]
    assert secrets["accounting"]["items"] == [{"key": "dsn", "path": "dsn"}]
    command = pod["containers"][0]["command"]
    assert command[:2] == ["sh", "-c"]
    assert command[2].endswith(f'--accounting "postgresql:dsn=$(cat {m.DSN_FILE})"')
    assert "postgresql://" not in text
    assert by_kind(children)[("PodDisruptionBudget", "eu")]["apiVersion"] == "policy/v1beta1"
    assert deployment["spec"]["template"]["metadata"]["annotations"][m.SECRET_VERSIONS] == "tls=77"


def test_host_network_exposure_and_scheduling():
    children = by_kind(m.children(region(FULL_SPEC)))
    pod = children[("Deployment", "eu")]["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    anti = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["topologyKey"] == "kubernetes.io/hostname"
    assert children[("Deployment", "eu")]["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
    assert pod["nodeSelector"] == FULL_SPEC["nodeSelector"]
    assert pod["tolerations"] == FULL_SPEC["tolerations"]
    service = children[("Service", "eu-udp")]["spec"]
    assert service["externalIPs"] == ["203.0.113.7"] and service["type"] == "NodePort"
    policy = children[("NetworkPolicy", "eu")]["spec"]
    assert policy["ingress"][0]["ports"] == [{"protocol": "UDP"}, {"protocol": "TCP", "port": 3478},
                                             {"protocol": "TCP", "port": 5349}]
    assert policy["ingress"][1] == {"ports": [{"protocol": "TCP", "port": 9641}],
                                    "from": [{"namespaceSelector": {}}]}


def test_udp_only_region_has_one_service_and_is_probed_over_http():
    spec = {"region": "ap", "listeners": {"transports": ["udp"]}, "exposure": {"serviceType": "ClusterIP"}}
    children = by_kind(m.children(region(spec)))
    assert ("Service", "eu-tcp") not in children
    assert "externalTrafficPolicy" not in children[("Service", "eu-udp")]["spec"]
    container = children[("Deployment", "eu")]["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert "no-tcp = true" in m.config_toml(region(spec))


def test_config_change_changes_the_rollout_hash_and_scaling_does_not():
    def config_hash(spec):
        return m.deployment(region(spec))["spec"]["template"]["metadata"]["annotations"][m.CONFIG_HASH]
    base = {"region": "us-east"}
    assert config_hash(base) == config_hash({**base, "replicas": 7})
    assert config_hash(base) != config_hash({**base, "quotas": {"user": 3}})


@pytest.mark.parametrize("change, problem", [
    ({"relayPorts": {"min": 60000, "max": 50000}}, "relayPorts: min 60000 must be below max 50000"),
    ({"relayPorts": {"min": 50000, "max": 50000}}, "must be below max"),
    ({"listeners": {"port": 50001}, "relayPorts": {"min": 50000, "max": 60000}}, "lies inside relayPorts"),
    ({"listeners": {"port": 5000, "tlsPort": 5000}}, "port and tlsPort are both 5000"),
    ({"listeners": {"metricsPort": 5349}}, "metricsPort 5349 is also a TURN port"),
    ({"clusterCIDRs": ["10.0.0.1/8"]}, "clusterCIDRs: 10.0.0.1/8 has host bits set"),
    ({"exposure": {"externalIPs": ["203.0.113.1", "203.0.113.2"]}}, "at most one IPv4"),
    ({"exposure": {"externalIPs": ["1.2.3"]}}, "does not appear to be an IPv4 or IPv6 address"),
    ({"exposure": {"proxyProtocolFrom": ["10.0.0.300"]}}, "exposure.proxyProtocolFrom: "),
    ({"exposure": {"tlsServicePort": 3478}}, "tlsServicePort 3478 is also the TCP port"),
])
def test_problems_the_schema_cannot_express(change, problem):
    problems = m.spec_problems({"region": "r", **change})
    assert any(problem in p for p in problems), problems


def test_full_spec_has_no_problems():
    assert m.spec_problems(FULL_SPEC) == []


def test_status_from_children():
    body = region({"region": "us-east", "replicas": 2}, generation=4)
    lb = [{"loadBalancer": {"ingress": [{"ip": "198.51.100.9"}]}},
          {"loadBalancer": {"ingress": [{"ip": "198.51.100.9"}, {"hostname": "turn.example.org"}]}}]
    status = m.region_status(body, {"replicas": 2, "readyReplicas": 1, "updatedReplicas": 2}, lb, [], "T1")
    assert status["observedGeneration"] == 4 and status["readyReplicas"] == 1
    assert status["endpoint"] == "198.51.100.9"
    assert status["endpoints"][:3] == ["turn:198.51.100.9:3478?transport=udp",
                                       "turn:198.51.100.9:3478?transport=tcp",
                                       "turns:198.51.100.9:5349?transport=tcp"]
    assert "turns:turn.example.org:5349?transport=tcp" in status["endpoints"]
    conditions = {c["type"]: c for c in status["conditions"]}
    assert (conditions["Ready"]["status"], conditions["Ready"]["reason"]) == ("False", "ReplicasNotReady")
    assert conditions["Progressing"]["status"] == "False"
    assert conditions["Degraded"]["status"] == "False"
    # lastTransitionTime moves only with the status.
    body["status"] = status
    later = m.region_status(body, {"replicas": 2, "readyReplicas": 1, "updatedReplicas": 2}, lb, [], "T2")
    assert {c["lastTransitionTime"] for c in later["conditions"]} == {"T1"}
    broken = m.region_status(body, None, [], ["relayPorts: min 2 must be below max 1"], "T3")
    conditions = {c["type"]: c for c in broken["conditions"]}
    assert conditions["Degraded"]["status"] == "True" and conditions["Degraded"]["reason"] == "InvalidSpec"
    assert conditions["Degraded"]["message"] == "relayPorts: min 2 must be below max 1"
    assert conditions["Degraded"]["lastTransitionTime"] == "T3"


def test_tls_on_service_port_443_and_proxy_protocol():
    """The TLS Service answers on 443 and forwards to the relay's unprivileged tlsPort; the
    advertised turns: URI is the Service's; the relays trust the balancer's PROXY headers."""
    spec = {"region": "r", "exposure": {"tlsServicePort": 443, "externalIPs": ["203.0.113.7"],
                                        "proxyProtocolFrom": ["10.0.0.0/8"]}}
    [tcp] = [s for s in m.services(region(spec)) if s["metadata"]["name"] == "eu-tcp"]
    ports = {p["name"]: (p["port"], p["targetPort"]) for p in tcp["spec"]["ports"]}
    assert ports == {"turn-tcp": (3478, 3478), "turns-tls": (443, 5349)}
    assert "turns:203.0.113.7:443?transport=tcp" in m.region_status(
        region(spec), None, [], [], "T")["endpoints"]
    assert m.relay_config(region(spec))["proxy-protocol-from"] == ["10.0.0.0/8"]


def test_external_ips_are_the_endpoints():
    spec = {"region": "r", "exposure": {"externalIPs": ["2001:db8::7"]}, "listeners": {"transports": ["tls"]}}
    status = m.region_status(region(spec), None, [], [], "T")
    assert status["endpoints"] == ["turns:[2001:db8::7]:5349?transport=tcp"]


def test_directory_lists_every_region_with_rate_and_a_regions_file():
    east = region({"region": "us-east", "ratePerMB": 0.002}, name="east")
    east["status"] = {"endpoint": "198.51.100.1", "endpoints": ["turn:198.51.100.1:3478?transport=udp"]}
    west = region({"region": "us-west", "ratePerMB": 0.003}, name="west")
    directory = m.directory([west, east], "relays")
    kubernetes_validate.validate(directory, SCHEMA_VERSION, strict=True)
    table = yaml.safe_load(directory["data"]["regions.json"])
    assert table["us-east"]["ratePerMB"] == 0.002 and table["us-west"]["endpoints"] == []
    regions = regions_from_table(tomllib.loads(directory["data"]["regions.toml"]))
    assert list(regions) == ["us-east"] and regions["us-east"].host == "198.51.100.1"


def test_config_map_is_a_valid_relay_config(tmp_path):
    """Every key the builder writes is an option the relay accepts (paths mounted in tmp)."""
    cert, key = make_cert(tmp_path, "relay")
    (tmp_path / "auth").mkdir()
    (tmp_path / "auth" / "secret").write_text("s3cret\n")
    text = m.config_toml(region(FULL_SPEC))
    text = text.replace(f"{m.TLS_DIR}/tls.crt", str(cert)).replace(f"{m.TLS_DIR}/tls.key", str(key))
    text = text.replace(m.AUTH_FILE, str(tmp_path / "auth" / "secret"))
    # The directory as the operator writes it, the region's own entry in it.
    listed = region(FULL_SPEC)
    listed["status"] = {"endpoint": "203.0.113.7", "readyReplicas": 3}
    (tmp_path / "regions.toml").write_text(m.directory([listed], "relays")["data"]["regions.toml"])
    text = text.replace(m.REGIONS_FILE, str(tmp_path / "regions.toml"))
    config = tmp_path / "turnrelay.toml"
    config.write_text(text)
    options = Options()
    options.parseOptions(["--config", str(config)])
    assert options["regions"]["eu-west"].location == (53.35, -6.26)
    assert (options["regions"]["eu-west"].tls_port, options["regions"]["eu-west"].serving) == (443, True)
    assert (options["min-port"], options["max-port"], options["user-quota"]) == (50000, 60000, 5)
    assert options["external-map"] == {None: "203.0.113.7"} and options["region"] == "eu-west"
    assert str(options["rates"].rate_at("eu-west", "2026-11-23T00:00:00Z")) == "0.004"
    assert options["monthly-quota-bytes"] == 50000 * 10**6
    assert options["cluster-cidr"] == ["10.244.0.0/16", "10.96.0.0/12"]
    assert [str(n) for n in options["proxy-trust"].networks] == ["10.0.0.0/8"]


def test_generated_config_map_starts_a_working_relay(tmp_path):
    """The ConfigMap as the pod sees it: Secrets mounted as files, then a real allocation."""
    port, tls_port, metrics_port = free_port(), free_port(), free_port()
    spec = {"region": "test-local", "realm": "turnrelay.test",
            "listeners": {"port": port, "tlsPort": tls_port, "metricsPort": metrics_port},
            "relayPorts": {"min": RELAY_PORTS[0], "max": RELAY_PORTS[1]},
            "tls": {"secretName": "cert"}, "auth": {"secretName": "rest"}, "quotas": {"user": 2}}
    cm = m.config_map(region(spec))
    mounts = tmp_path / "etc"
    (mounts / "tls").mkdir(parents=True)
    (mounts / "auth").mkdir()
    make_cert(tmp_path, "relay")
    os.rename(tmp_path / "relay.pem", mounts / "tls" / "tls.crt")
    os.rename(tmp_path / "relay.key", mounts / "tls" / "tls.key")
    (mounts / "auth" / "secret").write_text("region-secret\n")
    # The directory before any region has a public address: no regions yet.
    (mounts / "regions").mkdir()
    (mounts / "regions" / "regions.toml").write_text(
        m.directory([region(spec)], "relays")["data"]["regions.toml"])
    text = cm["data"]["turnrelay.toml"].replace("/etc/turnrelay", str(mounts))
    text = text.replace(m.STATE_DIR, str(tmp_path / "state"))
    config = mounts / "turnrelay.toml"
    config.write_text(text)
    # Only what a test machine needs on top: loopback addresses (pods bind every address).
    server = launch(["--config", str(config), "--listening-ip", "127.0.0.1",
                     "--relay-ip", "127.0.0.1", "--allow-loopback-peers",
                     "--prometheus-address", "127.0.0.1"], "127.0.0.1", port, tls_port,
                    cwd=str(tmp_path))
    try:
        username, password = mint(b"region-secret", "acme", 600, time.time())
        relayed = relay_round_trips(server, username, password)
        assert relayed[0] == "127.0.0.1" and RELAY_PORTS[0] <= relayed[1] <= RELAY_PORTS[1]
        relay_round_trips(server, username, password, transport="tcp")
        # What the pod's probes ask, once every worker (one per CPU here) is up: a worker can
        # still be starting after its sibling relayed, and /readyz waits for all of them.
        if usable_cpus() > 1:
            server.search(r"all \d+ workers ready")
        for path in ("/readyz", "/healthz"):
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}{path}", timeout=5) as answer:
                assert answer.status == 200, path
    finally:
        log = server.stop()
    assert "self-signed" not in log


def test_peers_map_onto_the_relay_flags_and_carve_only_deliberate_holes_in_the_cluster():
    spec = {"region": "r", "clusterCIDRs": ["10.244.0.0/16", "10.96.0.0/12"],
            "peers": {"allowed": ["10.0.0.0/8", "10.244.3.0/24", "192.0.2.10"],
                      "denied": ["203.0.113.0/24"], "allowLoopback": True}}
    assert m.spec_problems(spec) == []
    config = m.relay_config(region(spec))
    assert config["allowed-peer-ip"] == ["10.0.0.0/8", "10.244.3.0/24", "192.0.2.10"]
    assert config["denied-peer-ip"] == ["203.0.113.0/24"] and config["allow-loopback-peers"] is True
    # 10.0.0.0/8 holds the whole cluster: not a deliberate hole, the cluster stays refused;
    # 10.244.3.0/24 lies inside the pod network: cut out of it, so the SFU's pods are reachable.
    cluster = [ipaddress.ip_network(c) for c in config["cluster-cidr"]]
    assert ipaddress.ip_network("10.96.0.0/12") in cluster
    assert not any(ipaddress.ip_address("10.244.3.17") in net for net in cluster)
    for inside in ("10.244.0.1", "10.244.2.255", "10.244.4.0", "10.244.255.254"):
        assert any(ipaddress.ip_address(inside) in net for net in cluster), inside
    from relay.core.peers import PeerPolicy
    policy = PeerPolicy(config["allowed-peer-ip"], config["denied-peer-ip"], True, config["cluster-cidr"])
    assert policy.permits("10.244.3.17") and policy.permits("10.1.2.3") and policy.permits("127.0.0.1")
    assert not policy.permits("10.244.7.1") and not policy.permits("10.100.0.1")
    assert not policy.permits("203.0.113.5") and not policy.permits("172.16.0.1")
    # Without peers, the defaults: nothing in the config.
    plain = m.relay_config(region({"region": "r"}))
    assert not {"allowed-peer-ip", "denied-peer-ip", "allow-loopback-peers"} & set(plain)


@pytest.mark.parametrize("peers, problem", [
    ({"allowed": ["10.0.0.300/8"]}, "peers.allowed: "),
    ({"denied": ["192.0.2.1/24"]}, "peers.denied: 192.0.2.1/24 has host bits set"),
])
def test_a_bad_peer_cidr_is_a_clear_problem(peers, problem):
    problems = m.spec_problems({"region": "r", "peers": peers})
    assert any(p.startswith(problem) for p in problems), problems


def node(name, annotations=None, **addresses):
    return {"metadata": {"name": name, "annotations": annotations or {}},
            "status": {"addresses": [{"type": k, "address": v} for k, v in addresses.items()]}}


def test_node_address_prefers_the_annotation_then_external_then_internal():
    assert m.node_address(node("a", InternalIP="10.0.0.1", ExternalIP="198.51.100.1")) == "198.51.100.1"
    assert m.node_address(node("b", InternalIP="10.0.0.2", Hostname="b")) == "10.0.0.2"
    assert m.node_address(node("c", {m.NODE_ADDRESS: "203.0.113.3"}, InternalIP="10.0.0.3")) == "203.0.113.3"
    assert m.node_address(node("d", Hostname="d")) is None


def pod(node_name, ready, deleting=False):
    return {"metadata": {"name": f"p-{node_name}", **({"deletionTimestamp": "T"} if deleting else {})},
            "spec": {"nodeName": node_name},
            "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


def test_host_network_endpoints_are_the_nodes_of_ready_relays():
    pods = [pod("n2", True), pod("n1", True), pod("n3", False), pod("n4", True, deleting=True),
            {"metadata": {"name": "pending"}, "spec": {}, "status": {}}]
    assert m.relay_nodes(pods) == ["n1", "n2"]
    spec = {"region": "r", "exposure": {"hostNetwork": True}, "listeners": {"transports": ["udp", "tls"]}}
    status = m.region_status(region(spec), {"replicas": 2, "readyReplicas": 2, "updatedReplicas": 2},
                             [{"loadBalancer": {"ingress": [{"ip": "198.51.100.9"}]}}], [], "T",
                             ["10.0.0.1", "10.0.0.2", "10.0.0.1"])
    assert status["endpoint"] == "10.0.0.1"
    assert status["endpoints"] == ["turn:10.0.0.1:3478?transport=udp", "turns:10.0.0.1:5349?transport=tcp",
                                   "turn:10.0.0.2:3478?transport=udp", "turns:10.0.0.2:5349?transport=tcp"]
    # Explicit external IPs still win.
    spec["exposure"]["externalIPs"] = ["203.0.113.7"]
    assert m.region_status(region(spec), None, [], [], "T", ["10.0.0.1"])["endpoint"] == "203.0.113.7"


def test_host_network_relays_read_their_alternates_from_a_config_map_the_operator_writes():
    body = region({"region": "r", "replicas": 1, "exposure": {"hostNetwork": True}})
    body["status"] = {"endpoints": ["turn:10.0.0.1:3478?transport=udp"]}
    children = by_kind(m.children(body))
    alternates = children[("ConfigMap", "eu-alternates")]
    kubernetes_validate.validate(alternates, SCHEMA_VERSION, strict=True)
    assert alternates["data"] == {"endpoints": "turn:10.0.0.1:3478?transport=udp\n"}
    pod_spec = children[("Deployment", "eu")]["spec"]["template"]["spec"]
    volume = next(v for v in pod_spec["volumes"] if v["name"] == "alternates")
    assert volume["configMap"] == {"name": "eu-alternates", "optional": True}
    mount = next(v for v in pod_spec["containers"][0]["volumeMounts"] if v["name"] == "alternates")
    assert mount == {"name": "alternates", "mountPath": m.ALTERNATES_DIR, "readOnly": True}  # no subPath
    assert m.relay_config(body)["alternate-servers-file"] == m.ALTERNATES_FILE
    # A rewritten list of endpoints is no config change: no roll.
    moved = copy.deepcopy(body)
    moved["status"]["endpoints"] = []
    assert m.deployment(moved) == m.deployment(body)
    # What the region gets from a roll, said plainly.
    progressing = next(c for c in m.region_status(body, None, [], [], "T")["conditions"]
                       if c["type"] == "Progressing")
    assert "without a ready relay" in progressing["message"]
    two = {"region": "r", "replicas": 2, "exposure": {"hostNetwork": True}}
    assert m.deployment(region(two))["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    assert "keep a ready relay" in m.rollout_note(two)
    assert ("ConfigMap", "eu-alternates") not in by_kind(m.children(region({"region": "r"})))


FOUR = {  # the cloud regions of these names: N. Virginia, Oregon, Dublin, Mumbai
    "us-east": {"latitude": 38.94, "longitude": -77.46, "country": "US", "continent": "NA"},
    "us-west": {"latitude": 45.84, "longitude": -119.7, "country": "US", "continent": "NA"},
    "eu-west": {"latitude": 53.35, "longitude": -6.26, "country": "IE", "continent": "EU"},
    "ap-south": {"latitude": 19.08, "longitude": 72.88, "country": "IN", "continent": "AS"},
}


def listed_region(name, ready=1, replicas=2, **spec):
    body = region({"region": name, "replicas": replicas, "location": FOUR[name], **spec}, name=name)
    body["status"] = {"endpoint": f"turn-{name}.example.org", "readyReplicas": ready}
    return body


def test_directory_is_a_regions_file_with_locations_and_readiness():
    """The relays' --regions-file: where each region is, whether it serves, and the ports its
    Services offer; regions.json says the same for other readers."""
    bodies = [listed_region("us-east"), listed_region("us-west", ready=0),
              listed_region("eu-west", draining=True), listed_region("ap-south", replicas=0),
              listed_region("us-east", exposure={"tlsServicePort": 443})]
    bodies[-1]["spec"]["region"], bodies[-1]["metadata"]["name"] = "us-east-2", "us-east-2"
    directory = m.directory(bodies, "relays")
    parsed = regions_from_table(tomllib.loads(directory["data"]["regions.toml"]))
    assert sorted(parsed) == ["ap-south", "eu-west", "us-east", "us-east-2", "us-west"]
    east = parsed["us-east"]
    assert (east.host, east.udp_port, east.tls_port) == ("turn-us-east.example.org", 3478, 5349)
    assert (east.location, east.country, east.continent) == ((38.94, -77.46), "US", "NA")
    assert parsed["us-east-2"].tls_port == 443  # where clients reach TLS, the Service's port
    assert {name: r.state for name, r in parsed.items()} == {
        "us-east": "ready", "us-east-2": "ready", "us-west": "not ready",
        "eu-west": "draining", "ap-south": "draining"}  # scaled to zero: draining
    # A user in Paris: eu-west drains and us-west has no ready relay, so us-east, then us-east-2.
    assert choose(parsed, "us-east", "auto", (48.86, 2.35)).order == ("us-east", "us-east-2")
    table = json.loads(directory["data"]["regions.json"])
    assert table["us-west"] == {"turnRegion": "us-west", "endpoints": [], "ratePerMB": None,
                                "readyReplicas": 0, "location": FOUR["us-west"],
                                "ready": False, "draining": False}
    # Without a location the entry has none; the relays order such regions last.
    bare = region({"region": "lab"}, name="lab")
    bare["status"] = {"endpoint": "10.0.0.9", "readyReplicas": 1}
    assert regions_from_table(tomllib.loads(m.directory([bare], "relays")["data"]["regions.toml"]))[
        "lab"].location is None


def test_relays_mount_the_directory_whole_and_read_it():
    pod = m.deployment(region({"region": "us-east"}))["spec"]["template"]["spec"]
    assert {"name": "regions", "configMap": {"name": m.DIRECTORY_NAME}} in pod["volumes"]
    mount = next(v for v in pod["containers"][0]["volumeMounts"] if v["name"] == "regions")
    assert mount == {"name": "regions", "mountPath": m.REGIONS_DIR, "readOnly": True}  # no subPath
    assert m.relay_config(region({"region": "us-east"}))["regions-file"] == m.REGIONS_FILE
    # Readiness and draining live in the directory, not in the relays' config: no roll.
    assert m.deployment(region({"region": "us-east", "draining": True})) == m.deployment(region({"region": "us-east"}))


@pytest.mark.parametrize("location, problem", [
    ({"latitude": 91, "longitude": 0}, "location.latitude: 91 is not a number of degrees from -90 to 90"),
    ({"latitude": 0, "longitude": -180.5}, "location.longitude: -180.5 is not a number of degrees from -180 to 180"),
    ({"latitude": 10}, "location.longitude: None is not a number of degrees from -180 to 180"),
    ({"latitude": 0, "longitude": 0, "country": "ie"}, "location.country: 'ie' is not an ISO 3166 code such as \"IE\""),
    ({"latitude": 0, "longitude": 0, "continent": "EUR"}, "location.continent: 'EUR' is not one of AF AN AS EU NA OC SA"),
])
def test_a_bad_location_is_a_clear_problem(location, problem):
    assert m.spec_problems({"region": "r", "location": location}) == [problem]


def test_relays_serve_the_tokens_api_and_hand_out_the_nearest_serving_region_of_the_directory(
        tmp_path, in_reactor):
    """spec.api on a relay started from the generated ConfigMap and command, its directory
    mounted as the kubelet mounts it: the answer names the region and why, and a directory
    update (the kubelet's ..data swap) marking this region not ready moves the next answer
    to the other region within seconds."""
    port, tls_port, metrics_port, api_port = free_port(), free_port(), free_port(), free_port()
    spec = {"region": "test-local", "realm": "turnrelay.test", "location": FOUR["us-east"],
            "listeners": {"port": port, "tlsPort": tls_port, "metricsPort": metrics_port},
            "relayPorts": {"min": RELAY_PORTS[0], "max": RELAY_PORTS[1]},
            "tls": {"secretName": "cert"}, "auth": {"secretName": "rest"},
            "api": {"port": api_port, "secretName": "accounts"}}
    assert m.spec_problems(spec) == []
    body = region(spec, name="test-local")
    mounts = tmp_path / "etc"
    (mounts / "tls").mkdir(parents=True)
    (mounts / "auth").mkdir()
    (mounts / "api").mkdir()
    (mounts / "regions").mkdir()
    make_cert(tmp_path, "relay")
    os.rename(tmp_path / "relay.pem", mounts / "tls" / "tls.crt")
    os.rename(tmp_path / "relay.key", mounts / "tls" / "tls.key")
    (mounts / "auth" / "secret").write_text("region-secret\n")
    dsn = f"sqlite:///{tmp_path / 'accounts.db'}"
    keys = in_reactor(create_accounts, dsn, ("acme",))
    (mounts / "api" / "dsn").write_text(dsn)
    here = copy.deepcopy(body)
    here["status"] = {"endpoint": "127.0.0.1", "readyReplicas": 1}

    def publish(stamp, **serving):
        """The directory as the operator writes it, mounted as the kubelet updates it."""
        listed = copy.deepcopy(here)
        listed["status"]["readyReplicas"] = serving.get("ready", 1)
        text = m.directory([listed, listed_region("eu-west")], "relays")["data"]["regions.toml"]
        kubelet_write(mounts / "regions", text, stamp)
    publish("2026_12_03_10_00_00.1")
    text = m.config_map(body)["data"]["turnrelay.toml"].replace("/etc/turnrelay", str(mounts))
    (mounts / "turnrelay.toml").write_text(text.replace(m.STATE_DIR, str(tmp_path / "state")))
    # The pod's shell reads the DSN Secret into --api-db; then what a test machine needs.
    command = m.command(body)
    assert command[:2] == ["sh", "-c"] and command[2].endswith(f'--api-db "$(cat {m.API_DSN_FILE})"')
    server = launch(["--config", str(mounts / "turnrelay.toml"), "--api-db", (mounts / "api" / "dsn").read_text(),
                     "--listening-ip", "127.0.0.1", "--relay-ip", "127.0.0.1",
                     "--api-listening-ip", "127.0.0.1", "--prometheus-address", "127.0.0.1"],
                    "127.0.0.1", port, tls_port, cwd=str(tmp_path))
    try:
        server.read_until(f"tokens API listening on https [127.0.0.1]:{api_port}")
        api = Api(server, api_port, ssl._create_unverified_context(), keys)
        answer = api.mint().body
        assert (answer["region"], answer["region_reason"], answer["fallback_region"]) == (
            "test-local", "default", "eu-west")
        assert answer["ice_servers"][0]["urls"] == f"stun:127.0.0.1:{port}"
        assert any(s["urls"] == "turns:turn-eu-west.example.org:5349?transport=tcp" for s in answer["ice_servers"])
        publish("2026_12_03_10_00_01.2", ready=0)
        moved = wait_for(lambda: (a := api.mint().body)["region"] == "eu-west" and a, timeout=5,
                         what="the other region within 5 s of the directory's update")
        assert moved["region_note"].endswith("test-local is not ready: the nearest serving region")
        assert moved["fallback_region"] is None
    finally:
        server.stop()


def test_the_tokens_api_is_a_port_of_the_pods_and_the_tcp_service():
    spec = {"region": "us-east", "tls": {"secretName": "cert"}, "auth": {"secretName": "rest"},
            "networkPolicy": True, "api": {"port": 8443, "secretName": "accounts", "geoipDB": "/geo/city.mmdb"}}
    children = by_kind(m.children(region(spec)))
    for child in children.values():
        kubernetes_validate.validate(child, SCHEMA_VERSION, strict=True)
    tcp = children[("Service", "eu-tcp")]["spec"]["ports"]
    assert {"name": "api", "protocol": "TCP", "port": 8443, "targetPort": 8443} in tcp
    assert {"protocol": "TCP", "port": 8443} in children[("NetworkPolicy", "eu")]["spec"]["ingress"][0]["ports"]
    pod = children[("Deployment", "eu")]["spec"]["template"]["spec"]
    assert {"name": "api", "mountPath": "/etc/turnrelay/api", "readOnly": True} in pod["containers"][0]["volumeMounts"]
    assert next(v for v in pod["volumes"] if v["name"] == "api")["secret"]["items"] == [{"key": "dsn", "path": "dsn"}]
    config = m.relay_config(region(spec))
    assert (config["api-port"], config["api-secret-file"], config["geoip-db"]) == (8443, m.AUTH_FILE, "/geo/city.mmdb")
    assert "--api-db" not in m.config_toml(region(spec))  # a secret: read by the pod's shell
    assert m.spec_problems({"region": "r", "api": {"port": 8443, "secretName": "a"}}) == [
        "api: needs tls.secretName (the tokens API serves HTTPS with the region's certificate)",
        "api: needs auth.secretName (the tokens API mints credentials with the region's shared secret)"]
    assert m.spec_problems({**spec, "api": {"port": 3478, "secretName": "a"}}) == [
        "api.port 3478 is also a listener or relay port"]


def test_the_geoip_database_comes_from_a_volume_of_the_spec():
    claim = {"persistentVolumeClaim": {"claimName": "geoip", "readOnly": True}}
    spec = {"region": "us-east", "tls": {"secretName": "cert"}, "auth": {"secretName": "rest"},
            "api": {"port": 8443, "secretName": "accounts", "geoipDB": "dbip-city.mmdb",
                    "geoipVolume": claim}}
    children = by_kind(m.children(region(spec)))
    for child in children.values():
        kubernetes_validate.validate(child, SCHEMA_VERSION, strict=True)
    pod = children[("Deployment", "eu")]["spec"]["template"]["spec"]
    assert {"name": "geoip", **claim} in pod["volumes"]
    assert {"name": "geoip", "mountPath": m.GEOIP_DIR, "readOnly": True} in pod["containers"][0]["volumeMounts"]
    assert m.relay_config(region(spec))["geoip-db"] == f"{m.GEOIP_DIR}/dbip-city.mmdb"
    api = spec["api"]
    assert m.spec_problems({**spec, "api": {**api, "geoipDB": None}}) == [
        "api.geoipVolume: needs api.geoipDB, the database's path in it"]
    assert m.spec_problems({**spec, "api": {**api, "geoipVolume": None}}) == [
        "api.geoipDB 'dbip-city.mmdb': a relative path needs api.geoipVolume (else give the "
        "absolute path inside the relay image)"]
    assert m.spec_problems({**spec, "api": {**api, "geoipVolume": {**claim, "emptyDir": {}}}}) == [
        "api.geoipVolume: one volume source, e.g. {persistentVolumeClaim: {claimName: geoip, "
        "readOnly: true}}"]
