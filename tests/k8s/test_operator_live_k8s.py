"""The operator against a real API server and controller-manager, playing the kubelet and the
scheduler by hand (binding pods to Node objects, setting their readiness): its identity under a
uid without a passwd entry, the status following the relays at once (the drift timer set to
10 minutes, so only the watch can explain a change), hostNetwork endpoints from the nodes of
ready relays and the alternates a draining relay reads, and `peers` checked and mapped.

tests/k8s/test_node_k8s.py-style end-to-end runs on a real kubelet do the same with real pods.
"""
from __future__ import annotations

import json
import time
import urllib.request
from typing import Dict, Iterator

import kubernetes
import pytest
import tomllib
import turnregion_manifests as m
import yaml
from kubernetes.dynamic.exceptions import UnprocessibleEntityError

from relay.web.regions import regions_from_table
from support.k8s_cluster import CHART, RELEASE, RELEASE_NAMESPACE, Cluster, control_plane, wait_for
from support.k8s_operator import AS_UID_WITHOUT_PASSWD, NO_PASSWD_UID, Operator
from support.servers import free_port

NAMESPACE = "live"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with control_plane() as running:
        running.workdir.chmod(0o711)  # the operator's uid reads its kubeconfig and the CA there
        api(running, "v1", "Namespace").create(
            body={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
        running.helm("install", RELEASE, str(CHART), "--namespace", RELEASE_NAMESPACE, "--create-namespace",
                     "--set", f"operator.watchNamespaces={{{NAMESPACE}}}")
        yield running


def api(cluster, api_version, kind):
    return cluster.client().resources.get(api_version=api_version, kind=kind)


def core(cluster) -> kubernetes.client.CoreV1Api:
    return kubernetes.client.CoreV1Api(kubernetes.config.new_client_from_config(config_file=cluster.admin_kubeconfig))


@pytest.fixture(scope="module")
def liveness_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def operator(cluster, liveness_port) -> Iterator[Operator]:
    """As its pod runs it: uid 10001 with no passwd entry, its identity from POD_ID (what the
    chart sets), kopf's liveness endpoint on; drift repair only every 10 minutes."""
    running = Operator(cluster, NAMESPACE, drift_seconds=600, log_name="live-operator.log")
    running.start(prefix=AS_UID_WITHOUT_PASSWD, env={"POD_ID": "turnrelay-operator-0", "HOME": "/nonexistent"},
                  args=[f"--liveness=http://127.0.0.1:{liveness_port}/healthz"])
    yield running
    running.stop()


def test_chart_gives_the_operator_its_identity_probes_and_extra_values(cluster):
    out = cluster.helm("template", RELEASE, str(CHART), "--namespace", RELEASE_NAMESPACE,
                       "--set-json", 'operator.extraEnv=[{"name":"HTTPS_PROXY","value":"http://proxy:3128"}]',
                       "--set-json", 'operator.extraArgs=["--verbose"]',
                       "--set-json", 'operator.nodeSelector={"pool":"system"}',
                       "--set-json", 'operator.tolerations=[{"key":"system","operator":"Exists"}]',
                       "--set", "operator.resources.limits.memory=300Mi").stdout
    deployment = next(d for d in yaml.safe_load_all(out) if d and d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["HTTPS_PROXY"]["value"] == "http://proxy:3128"
    assert container["args"][-2:] == ["--verbose", "/app/turnregion_operator.py"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}, probe
    assert "--liveness=http://0.0.0.0:8080/healthz" in container["args"]
    assert pod["securityContext"]["runAsUser"] == NO_PASSWD_UID and pod["securityContext"]["runAsNonRoot"]
    assert pod["nodeSelector"] == {"pool": "system"} and pod["tolerations"][0]["key"] == "system"
    assert container["resources"]["limits"]["memory"] == "300Mi"


def test_without_an_explicit_identity_kopf_cannot_run_under_that_uid(cluster):
    """What the operator's pod did before the chart set POD_ID: the failure the fix is for."""
    failing = Operator(cluster, NAMESPACE, log_name="no-identity.log")
    failing.start(prefix=AS_UID_WITHOUT_PASSWD, env={"HOME": "/nonexistent"})
    assert failing.process.wait(timeout=60) != 0
    assert "getpwuid(): uid not found: 10001" in failing.log.read_text()


def test_operator_runs_under_a_uid_without_passwd_entry_and_answers_its_probe(operator, liveness_port):
    def healthy():
        with urllib.request.urlopen(f"http://127.0.0.1:{liveness_port}/healthz", timeout=2) as answer:
            return answer.status == 200
    wait_for(healthy, timeout=60, what="kopf's liveness endpoint")
    operator.check()


def region_body(name: str, spec: Dict) -> Dict:
    return {"apiVersion": "turnrelay.io/v1alpha1", "kind": "TurnRegion",
            "metadata": {"name": name, "namespace": NAMESPACE}, "spec": spec}


def status_of(cluster, name) -> Dict:
    return api(cluster, "turnrelay.io/v1alpha1", "TurnRegion").get(name=name, namespace=NAMESPACE).to_dict().get("status") or {}


def ready(status) -> str:
    return next((c["status"] for c in status.get("conditions", []) if c["type"] == "Ready"), "")


def make_node(cluster, name, annotations=None, **addresses):
    core(cluster).create_node({"apiVersion": "v1", "kind": "Node",
                               "metadata": {"name": name, "annotations": annotations or {}}})
    core(cluster).patch_node_status(name, {"status": {"addresses": [
        {"type": kind, "address": address} for kind, address in addresses.items()]}})


def relay_pods(cluster, instance):
    return core(cluster).list_namespaced_pod(
        NAMESPACE, label_selector=f"app.kubernetes.io/instance={instance}").items


def bind(cluster, pod_name, node):
    """The scheduler's part."""
    core(cluster).create_namespaced_pod_binding(
        pod_name, NAMESPACE, {"apiVersion": "v1", "kind": "Binding", "metadata": {"name": pod_name},
                              "target": {"apiVersion": "v1", "kind": "Node", "name": node}},
        _preload_content=False)


def set_ready(cluster, pod_name, value: bool):
    """The kubelet's part: the readiness its probes found."""
    flag = "True" if value else "False"
    core(cluster).patch_namespaced_pod_status(pod_name, NAMESPACE, {"status": {
        "phase": "Running", "conditions": [{"type": "Ready", "status": flag},
                                           {"type": "ContainersReady", "status": flag}]}})


def test_host_network_status_follows_the_relays_at_once(cluster, operator):
    make_node(cluster, "node-a", InternalIP="10.1.0.1", ExternalIP="198.51.100.1")
    make_node(cluster, "node-b", InternalIP="10.1.0.2")
    make_node(cluster, "node-c", {m.NODE_ADDRESS: "203.0.113.3"}, InternalIP="10.1.0.3")
    api(cluster, "turnrelay.io/v1alpha1", "TurnRegion").create(body=region_body("edge", {
        "region": "edge", "replicas": 2, "listeners": {"transports": ["udp", "tls"]},
        "exposure": {"hostNetwork": True, "serviceType": "ClusterIP"}}), namespace=NAMESPACE)
    pods = wait_for(lambda: len(relay_pods(cluster, "edge")) == 2 and relay_pods(cluster, "edge"),
                    what="the relays' pods")
    wait_for(lambda: ready(status_of(cluster, "edge")) == "False", what="a first status")
    assert status_of(cluster, "edge")["endpoints"] == []  # no relay ready: nothing to hand out
    first, second = sorted(p.metadata.name for p in pods)
    bind(cluster, first, "node-a")
    bind(cluster, second, "node-c")

    set_ready(cluster, first, True)
    wait_for(lambda: status_of(cluster, "edge")["endpoints"] == [
        "turn:198.51.100.1:3478?transport=udp", "turns:198.51.100.1:5349?transport=tcp"],
        timeout=5, what="the ready relay's node as the endpoint")
    set_ready(cluster, second, True)
    started = time.monotonic()
    status = wait_for(lambda: ready(s := status_of(cluster, "edge")) == "True" and s, timeout=5,
                      what="Ready within 5 s of the pods' readiness")
    ready_after = time.monotonic() - started
    assert status["readyReplicas"] == 2 and status["endpoint"] == "198.51.100.1"
    assert status["endpoints"] == ["turn:198.51.100.1:3478?transport=udp", "turns:198.51.100.1:5349?transport=tcp",
                                   "turn:203.0.113.3:3478?transport=udp", "turns:203.0.113.3:5349?transport=tcp"]
    alternates = core(cluster).read_namespaced_config_map("edge-alternates", NAMESPACE)
    assert alternates.data["endpoints"].splitlines() == status["endpoints"]
    assert alternates.metadata.owner_references[0].name == "edge"

    # The kubelet finds one relay unready (a killed process, a draining relay): within 5 s the
    # region says so and stops handing out its node.
    set_ready(cluster, first, False)
    status = wait_for(lambda: ready(s := status_of(cluster, "edge")) == "False" and s, timeout=5,
                      what="Ready=False within 5 s")
    assert status["readyReplicas"] == 1
    assert [c["message"] for c in status["conditions"] if c["type"] == "Ready"] == ["1/2 relays ready"]
    wait_for(lambda: status_of(cluster, "edge")["endpoints"] == [
        "turn:203.0.113.3:3478?transport=udp", "turns:203.0.113.3:5349?transport=tcp"], timeout=5)
    wait_for(lambda: core(cluster).read_namespaced_config_map("edge-alternates", NAMESPACE).data["endpoints"]
             == "turn:203.0.113.3:3478?transport=udp\nturns:203.0.113.3:5349?transport=tcp\n", timeout=5)
    directory = json.loads(core(cluster).read_namespaced_config_map(m.DIRECTORY_NAME, NAMESPACE).data["regions.json"])
    assert directory["edge"]["endpoints"] == ["turn:203.0.113.3:3478?transport=udp", "turns:203.0.113.3:5349?transport=tcp"]
    print(f"Ready=True {ready_after:.2f} s after the second pod's readiness")
    operator.check()


def test_peers_are_checked_and_mapped(cluster, operator):
    regions = api(cluster, "turnrelay.io/v1alpha1", "TurnRegion")
    with pytest.raises(UnprocessibleEntityError) as refused:
        regions.create(body=region_body("bad", {"region": "bad", "peers": {"allowed": ["media-net"]}}),
                       namespace=NAMESPACE)
    assert "spec.peers.allowed" in json.loads(refused.value.body)["message"]
    regions.create(body=region_body("sfu", {
        "region": "sfu", "replicas": 1, "clusterCIDRs": ["10.244.0.0/16"],
        "peers": {"allowed": ["10.244.7.0/24", "10.0.0.1/8"]}}), namespace=NAMESPACE)
    degraded = wait_for(lambda: next((c for c in status_of(cluster, "sfu").get("conditions", [])
                                      if c["type"] == "Degraded" and c["status"] == "True"), None),
                        timeout=10, what="Degraded")
    assert degraded["reason"] == "InvalidSpec"
    assert degraded["message"] == "peers.allowed: 10.0.0.1/8 has host bits set"
    regions.patch(body={"spec": {"peers": {"allowed": ["10.244.7.0/24"], "allowLoopback": True}}},
                  name="sfu", namespace=NAMESPACE, content_type="application/merge-patch+json")
    config = wait_for(lambda: core(cluster).read_namespaced_config_map("sfu-config", NAMESPACE).data["turnrelay.toml"],
                      what="the relays' config")
    assert 'allowed-peer-ip = ["10.244.7.0/24"]\n' in config and "allow-loopback-peers = true\n" in config
    assert '"10.244.7.0/24"' not in config.split("cluster-cidr = ")[1].splitlines()[0]
    assert '"10.244.0.0/22"' in config and '"10.244.8.0/21"' in config  # the rest stays refused
    wait_for(lambda: any(c["type"] == "Degraded" and c["status"] == "False"
                         for c in status_of(cluster, "sfu").get("conditions", [])), timeout=10)
    operator.check()


NYC = {"latitude": 38.94, "longitude": -77.46, "country": "US", "continent": "NA"}


def directory_regions(cluster) -> Dict:
    """The directory's regions.toml as the relays read it (their --regions-file)."""
    text = core(cluster).read_namespaced_config_map(m.DIRECTORY_NAME, NAMESPACE).data["regions.toml"]
    return regions_from_table(tomllib.loads(text))


@pytest.mark.parametrize("location, message", [
    ({"latitude": 91, "longitude": 0},
     "spec.location.latitude: Invalid value: 91: spec.location.latitude in body should be less than or equal to 90"),
    ({"latitude": 0, "longitude": -181},
     "spec.location.longitude: Invalid value: -181: spec.location.longitude in body should be greater than or equal to -180"),
    ({"latitude": 0}, "spec.location.longitude: Required value"),
    ({"latitude": 0, "longitude": 0, "country": "usa"}, "spec.location.country in body should match '^[A-Z]{2}$'"),
    ({"latitude": 0, "longitude": 0, "continent": "EUR"}, 'spec.location.continent: Unsupported value: "EUR"'),
], ids=["latitude", "longitude", "half", "country", "continent"])
def test_a_bad_location_is_refused_with_a_clear_message(cluster, location, message):
    with pytest.raises(UnprocessibleEntityError) as refused:
        api(cluster, "turnrelay.io/v1alpha1", "TurnRegion").create(
            body=region_body("lost", {"region": "lost", "location": location}), namespace=NAMESPACE)
    assert message in json.loads(refused.value.body)["message"]


def test_the_directory_follows_the_regions_deployment_status(cluster, operator):
    """Where the region is, from its spec, and whether it serves, from its Deployment's status
    (the ReplicaSet and Deployment controllers summing the pods' readiness), reach the
    directory the relays read within seconds; `draining` takes the region out."""
    regions = api(cluster, "turnrelay.io/v1alpha1", "TurnRegion")
    regions.create(body=region_body("nyc", {
        "region": "us-east", "replicas": 2, "location": NYC,
        "exposure": {"serviceType": "ClusterIP", "externalIPs": ["198.51.100.20"]}}), namespace=NAMESPACE)
    assert regions.get(name="nyc", namespace=NAMESPACE).to_dict()["spec"]["location"] == NYC
    listed = wait_for(lambda: "us-east" in (d := directory_regions(cluster)) and d["us-east"],
                      timeout=10, what="us-east in the directory")
    assert (listed.host, listed.location, listed.country, listed.continent) == (
        "198.51.100.20", (38.94, -77.46), "US", "NA")
    assert listed.state == "not ready"  # no relay ready yet
    deployment = api(cluster, "apps/v1", "Deployment").get(name="nyc", namespace=NAMESPACE).to_dict()
    pod = deployment["spec"]["template"]["spec"]
    assert next(v for v in pod["volumes"] if v["name"] == "regions")["configMap"]["name"] == m.DIRECTORY_NAME
    assert "regions-file = \"/etc/turnrelay/regions/regions.toml\"\n" in \
        core(cluster).read_namespaced_config_map("nyc-config", NAMESPACE).data["turnrelay.toml"]

    make_node(cluster, "node-r", InternalIP="10.1.0.9")
    pods = wait_for(lambda: len(relay_pods(cluster, "nyc")) == 2 and relay_pods(cluster, "nyc"))
    for relay in pods:
        bind(cluster, relay.metadata.name, "node-r")
    set_ready(cluster, pods[0].metadata.name, True)
    started = time.monotonic()
    wait_for(lambda: directory_regions(cluster)["us-east"].state == "ready", timeout=5,
             what="ready in the directory within 5 s of a relay's readiness")
    ready_after = time.monotonic() - started
    assert api(cluster, "apps/v1", "Deployment").get(
        name="nyc", namespace=NAMESPACE).to_dict()["status"]["readyReplicas"] == 1
    set_ready(cluster, pods[1].metadata.name, True)
    wait_for(lambda: json.loads(core(cluster).read_namespaced_config_map(
        m.DIRECTORY_NAME, NAMESPACE).data["regions.json"])["us-east"]["readyReplicas"] == 2, timeout=5)
    # One relay gone unready leaves the region serving; the last one takes it out.
    set_ready(cluster, pods[0].metadata.name, False)
    wait_for(lambda: json.loads(core(cluster).read_namespaced_config_map(
        m.DIRECTORY_NAME, NAMESPACE).data["regions.json"])["us-east"]["readyReplicas"] == 1, timeout=5)
    assert directory_regions(cluster)["us-east"].state == "ready"
    set_ready(cluster, pods[1].metadata.name, False)
    started = time.monotonic()
    wait_for(lambda: directory_regions(cluster)["us-east"].state == "not ready", timeout=5,
             what="not ready in the directory within 5 s")
    unready_after = time.monotonic() - started
    set_ready(cluster, pods[1].metadata.name, True)
    wait_for(lambda: directory_regions(cluster)["us-east"].state == "ready", timeout=5)
    # Marked draining in its spec: out of the answers while its relays keep serving.
    regions.patch(body={"spec": {"draining": True}}, name="nyc", namespace=NAMESPACE,
                  content_type="application/merge-patch+json")
    wait_for(lambda: directory_regions(cluster)["us-east"].state == "draining", timeout=5)
    regions.patch(body={"spec": {"draining": False}}, name="nyc", namespace=NAMESPACE,
                  content_type="application/merge-patch+json")
    wait_for(lambda: directory_regions(cluster)["us-east"].state == "ready", timeout=5)
    # Every relay pod is told the directory's version: the kubelet then updates its mounted
    # copy at once rather than at its next periodic sync of the pod.
    def nudged():
        version = core(cluster).read_namespaced_config_map(m.DIRECTORY_NAME, NAMESPACE).metadata.resource_version
        annotated = [p.metadata.annotations.get(m.REGIONS_VERSION) for p in relay_pods(cluster, "nyc")]
        assert set(annotated) == {version}, f"directory {version}, pods {annotated}"
        return True
    wait_for(nudged, timeout=5, what="the relay pods annotated with the directory's current version")
    print(f"directory ready {ready_after:.2f} s, not ready {unready_after:.2f} s after the pods' readiness")
    operator.check()
