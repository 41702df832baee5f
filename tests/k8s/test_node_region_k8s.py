"""Issue 23 on a real node (tests/support/k8s_node.py): the operator as its pod, under a uid
with no passwd entry, probed, and `helm install --wait` failing when it cannot start; a
hostNetwork TurnRegion whose endpoints are the node's address and whose relay reaches the peer
its `peers` allows and refuses one it does not; Ready following a killed relay within 5 s; a
roll of two relays on the pod network that never leaves the region without a ready relay; the
region's PodDisruptionBudget refusing a second eviction at once.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from typing import Dict, Iterator, List

import kubernetes
import pytest

from relay.cli.turnclient import UDP, TurnClient, error_code
from relay.proto import stun
from support.k8s_cluster import CHART, RELEASE, RELEASE_NAMESPACE, wait_for
from support.k8s_node import Node, condition, node, rest_credentials
from support.servers import running_echo_peer, tool

NAMESPACE, REGION, SECRET = "issue23", "edge", "edge-rest-secret"
MESSAGES = 20
REST_SECRET = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "rest", "namespace": NAMESPACE},
               "stringData": {"secret": SECRET}}


@pytest.fixture(scope="module")
def cluster_node() -> Iterator[Node]:
    with node() as running:
        running.kubectl("create", "namespace", NAMESPACE)
        yield running





def test_helm_install_wait_fails_when_the_operator_cannot_start(cluster_node):
    """An operator that exits at start (here an unknown kopf flag, as the passwd crash did) is
    never Ready, so `--wait` reports the failure instead of a success."""
    cluster = cluster_node.cluster
    result = cluster.helm("install", "broken", str(CHART), "--namespace", "broken-system", "--create-namespace",
                          "--set", "operator.watchNamespaces={broken-system}",
                          "--set-json", 'operator.extraArgs=["--no-such-flag"]',
                          "--wait", "--timeout", "25s", check=False)
    assert result.returncode != 0, result.stdout
    assert "context deadline exceeded" in result.stderr or "timed out" in result.stderr, result.stderr
    [pod] = cluster_node.get("pods", "-n", "broken-system")["items"]
    assert condition(pod, "Ready") != "True"
    status = pod["status"]["containerStatuses"][0]
    # It did start, and exit (restarted at once, or waiting out the kubelet's 10 s back-off).
    assert status["restartCount"] >= 1 or "terminated" in status.get("lastState", {}) \
        or "terminated" in status.get("state", {}), status
    cluster.helm("uninstall", "broken", "--namespace", "broken-system", "--wait")


@pytest.fixture(scope="module")
def operator_release(cluster_node) -> Iterator[None]:
    cluster_node.cluster.helm("install", RELEASE, str(CHART), "--namespace", RELEASE_NAMESPACE,
                              "--create-namespace", "--set", f"operator.watchNamespaces={{{NAMESPACE}}}",
                              "--wait", "--timeout", "180s")
    yield


def test_operator_pod_ready_under_a_uid_without_passwd_entry_with_probes(cluster_node, operator_release):
    [pod] = cluster_node.get("pods", "-n", RELEASE_NAMESPACE)["items"]
    assert condition(pod, "Ready") == "True"
    container = pod["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert pod["status"]["containerStatuses"][0]["restartCount"] == 0
    pid = cluster_node.container_pid(pod["metadata"]["name"], RELEASE_NAMESPACE, "operator")
    assert open(f"/proc/{pid}/status").read().split("Uid:")[1].split()[:4] == ["10001"] * 4
    # No passwd entry for it in the image: what crashed kopf before it took POD_ID.
    root = f"/proc/{pid}/root"
    assert not any(line.split(":")[2] == "10001" for line in open(f"{root}/etc/passwd").read().splitlines())
    logs = cluster_node.kubectl("logs", "-n", RELEASE_NAMESPACE, pod["metadata"]["name"]).stdout
    assert "getpwuid" not in logs



@pytest.fixture(scope="module")
def region(cluster_node, operator_release) -> Iterator[dict]:
    body = {"apiVersion": "turnrelay.io/v1alpha1", "kind": "TurnRegion",
            "metadata": {"name": REGION, "namespace": NAMESPACE},
            "spec": {"region": REGION, "replicas": 1, "workers": 1, "drainSeconds": 5,
                     "exposure": {"hostNetwork": True, "serviceType": "ClusterIP"},
                     "auth": {"secretName": "rest"},
                     "peers": {"allowed": [f"{cluster_node.host_address}/32"]}}}
    cluster_node.apply(REST_SECRET, body)
    yield wait_for(lambda: condition(r := cluster_node.get("turnregion", REGION, "-n", NAMESPACE), "Ready") == "True"
                   and r, timeout=180, what="the TurnRegion Ready")


def test_host_network_endpoints_are_the_nodes_address(cluster_node, region):
    address = cluster_node.address  # the node's InternalIP: it reports no ExternalIP
    assert region["status"]["endpoints"] == [f"turn:{address}:3478?transport=udp", f"turn:{address}:3478?transport=tcp",
                                             f"turns:{address}:5349?transport=tcp"]
    assert region["status"]["endpoint"] == address
    alternates = cluster_node.get("configmap", f"{REGION}-alternates", "-n", NAMESPACE)
    assert alternates["data"]["endpoints"].splitlines() == region["status"]["endpoints"]


def uclient(cluster_node: Node, uri: str, peer, user: str) -> str:
    """coturn's turnutils_uclient on one of the region's endpoint URIs (Send indications, -s)."""
    match = re.fullmatch(r"turn:([0-9.]+):(\d+)\?transport=(udp|tcp)", uri)
    assert match, uri
    host, port, transport = match.groups()
    result = subprocess.run(
        [tool("turnutils_uclient"), "-s", *(["-t"] if transport == "tcp" else []), "-W", SECRET, "-u", user,
         "-p", port, "-e", peer[0], "-r", str(peer[1]), "-n", str(MESSAGES), "-m", "1", host],
        capture_output=True, text=True, timeout=90)
    return result.stdout + result.stderr


def test_endpoints_relay_to_the_allowed_peer_and_refuse_another(cluster_node, region):
    with running_echo_peer(cluster_node.host_address) as peer:
        for uri in region["status"]["endpoints"]:
            if uri.startswith("turn:"):
                output = uclient(cluster_node, uri, peer, "allowed")
                totals = re.findall(r"tot_send_msgs=(\d+), tot_recv_msgs=(\d+)", output)
                assert totals and totals[-1] == (str(2 * MESSAGES), str(2 * MESSAGES)), output
    # A private address the region's peers do not allow: refused with 403, as the relay's
    # --allowed-peer-ip leaves every other private range denied.
    username, password = rest_credentials(SECRET, "refused")
    client = TurnClient.connect(UDP, (cluster_node.address, 3478), username, password, REGION,
                                bind_host=cluster_node.host_address)
    try:
        assert client.request(stun.ALLOCATE, (stun.REQUESTED_TRANSPORT, 17)).cls == stun.SUCCESS
        other = (cluster_node.host_address.rsplit(".", 1)[0] + ".77", 9)
        assert error_code(client.request(stun.CREATE_PERMISSION, (stun.XOR_PEER_ADDRESS, other))) == 403
        allowed = (cluster_node.host_address, 9)
        assert client.request(stun.CREATE_PERMISSION, (stun.XOR_PEER_ADDRESS, allowed)).cls == stun.SUCCESS
        client.request(stun.REFRESH, (stun.LIFETIME, 0))
    finally:
        client.close()


def first_time(check, timeout: float, what: str) -> float:
    """The monotonic time `check` first holds, polled every 0.1 s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return time.monotonic()
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_ready_follows_a_killed_relay_within_5_s(cluster_node, region):
    [pod] = [p for p in cluster_node.get("pods", "-n", NAMESPACE, "-l", f"app.kubernetes.io/instance={REGION}")["items"]
             if condition(p, "Ready") == "True"]
    name = pod["metadata"]["name"]

    def pod_ready():
        return condition(cluster_node.get("pod", name, "-n", NAMESPACE), "Ready") == "True"

    def region_ready():
        return condition(cluster_node.get("turnregion", REGION, "-n", NAMESPACE), "Ready") == "True"

    os.kill(cluster_node.container_pid(name, NAMESPACE, "turnrelay"), signal.SIGKILL)
    pod_down = first_time(lambda: not pod_ready(), 60, "the pod unready")
    region_down = first_time(lambda: not region_ready(), 30, "the region unready")
    pod_up = first_time(pod_ready, 120, "the pod Ready again")
    region_up = first_time(region_ready, 30, "the region Ready again")
    print(f"\nregion Ready=False {region_down - pod_down:.1f} s after its pod, Ready=True {region_up - pod_up:.1f} s after")
    assert region_down - pod_down <= 5 and region_up - pod_up <= 5


def ready_relays(pods: Dict[str, dict]) -> List[str]:
    return sorted(name for name, p in pods.items()
                  if not p["metadata"].get("deletionTimestamp") and condition(p, "Ready") == "True")


def test_a_roll_of_two_relays_on_the_pod_network_always_has_a_ready_relay(cluster_node, operator_release):
    """One node holds one hostNetwork relay, so two relays run on the pod network (their
    strategy: a new one Ready before an old one stops).  Every pod event of the roll is seen
    through a watch, and after each one a ready relay remains."""
    name = "pair"
    body = {"apiVersion": "turnrelay.io/v1alpha1", "kind": "TurnRegion",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"region": name, "replicas": 2, "workers": 1, "drainSeconds": 3,
                     "exposure": {"serviceType": "ClusterIP"}, "auth": {"secretName": "rest"}}}
    cluster_node.apply(REST_SECRET, body)
    wait_for(lambda: condition(cluster_node.get("turnregion", name, "-n", NAMESPACE), "Ready") == "True",
             timeout=180, what="two relays Ready")
    core = kubernetes.client.CoreV1Api(kubernetes.config.new_client_from_config(
        config_file=cluster_node.cluster.admin_kubeconfig))
    selector = f"app.kubernetes.io/instance={name}"
    listed = core.list_namespaced_pod(NAMESPACE, label_selector=selector)
    pods = {p.metadata.name: core.api_client.sanitize_for_serialization(p) for p in listed.items}
    before = set(ready_relays(pods))
    assert len(before) == 2
    lowest: List[int] = []
    deleted: List[str] = []
    failures: List[BaseException] = []
    done = threading.Event()
    stream = kubernetes.watch.Watch()

    def watch():
        # With a timeout the client ends the stream quietly when its connection drops (a CI run lost
        # the roll's deletions so): it is watched again from the last event seen, none missed.
        version = listed.metadata.resource_version
        try:
            while not done.is_set():
                for event in stream.stream(core.list_namespaced_pod, NAMESPACE,
                                           label_selector=selector, resource_version=version,
                                           timeout_seconds=170):
                    obj = core.api_client.sanitize_for_serialization(event["object"])
                    version = obj["metadata"]["resourceVersion"]
                    if event["type"] == "DELETED":
                        pods.pop(obj["metadata"]["name"], None)
                        deleted.append(obj["metadata"]["name"])
                    else:
                        pods[obj["metadata"]["name"]] = obj
                    lowest.append(len(ready_relays(pods)))
                    if done.is_set():
                        return
        except Exception as err:  # noqa: BLE001 - reported below unless the test is over
            if not done.is_set():
                failures.append(err)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    cluster_node.kubectl("patch", "turnregion", name, "-n", NAMESPACE, "--type", "merge",
                         "-p", '{"spec": {"ratePerMB": 0.002}}')

    def rolled():
        current = set(ready_relays(pods))
        deployment = cluster_node.get("deployment", name, "-n", NAMESPACE)["status"]
        return (len(current) == 2 and not current & before and deployment.get("updatedReplicas") == 2
                and deployment.get("replicas") == 2)
    wait_for(rolled, timeout=180, what="the roll to finish")
    # An old relay ends a few seconds after its preStop, but the 1.20 kubelet then often removes
    # the exited container before its own kill of it, fails that kill ("not found": the pod shows
    # ContainerStatusUnknown) and deletes the pod only at a later sync, 30-40 s on: the wait
    # covers that, with room for a loaded machine.
    wait_for(lambda: set(deleted) >= before or failures, timeout=120, what="the old pods' deletion seen")
    done.set()
    stream.stop()
    assert not failures, failures
    assert set(deleted) >= before  # the watch saw the whole roll, to the old pods' end
    assert lowest and min(lowest) >= 1, lowest
    print(f"\nready relays after each of the roll's {len(lowest)} pod events: {lowest}")


def test_the_disruption_budget_lets_one_relay_of_two_be_evicted_at_a_time(cluster_node, operator_release):
    """Voluntary evictions (a node drain) go through the region's PodDisruptionBudget: with two
    relays, the first eviction passes and a second one at once is refused (429)."""
    name = "pair"  # the two relays of the roll test, or made here
    cluster_node.apply(REST_SECRET, {
        "apiVersion": "turnrelay.io/v1alpha1", "kind": "TurnRegion", "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {"region": name, "replicas": 2, "workers": 1, "drainSeconds": 3,
                 "exposure": {"serviceType": "ClusterIP"}, "auth": {"secretName": "rest"}}})
    wait_for(lambda: cluster_node.get("pdb", name, "-n", NAMESPACE).get("status", {}).get("disruptionsAllowed") == 1,
             timeout=180, what="the budget allowing one disruption (both relays Ready)")
    core = kubernetes.client.CoreV1Api(kubernetes.config.new_client_from_config(
        config_file=cluster_node.cluster.admin_kubeconfig))
    pods = ready_relays({p["metadata"]["name"]: p for p in cluster_node.get(
        "pods", "-n", NAMESPACE, "-l", f"app.kubernetes.io/instance={name}")["items"]})
    assert len(pods) == 2

    def evict(pod: str) -> int:
        try:
            core.create_namespaced_pod_eviction(pod, NAMESPACE, {
                "apiVersion": "policy/v1beta1", "kind": "Eviction", "metadata": {"name": pod, "namespace": NAMESPACE}})
            return 201
        except kubernetes.client.ApiException as err:
            return err.status
    assert evict(pods[0]) == 201
    assert evict(pods[1]) == 429  # the budget is spent until a replacement is Ready
    wait_for(lambda: len(ready_relays({p["metadata"]["name"]: p for p in cluster_node.get(
        "pods", "-n", NAMESPACE, "-l", f"app.kubernetes.io/instance={name}")["items"]})) == 2,
        timeout=180, what="a replacement Ready")
