"""Relays as real pods, on a real node (tests/support/k8s_node.py): the images built by
scripts/images.sh, run by a kubelet and containerd.

One story, in file order (tests/k8s/test_node_region_k8s.py checks the operator pod itself, the
region's endpoints and peers): `helm install` puts the operator in its pod; a hostNetwork
TurnRegion (its certificate from a kubernetes.io/tls Secret, TURN REST auth, its usage in a
PostgreSQL ledger) becomes Ready through the kubelet's probes; coturn's turnutils_uclient and
aioice relay through the pod over UDP, TCP and TLS, and the ledger holds exactly what they
sent; a killed relay is restarted by the kubelet; a certificate rotated in place reaches the
running relay; a config change, then `kubectl delete pod`, roll the relay while a live
allocation keeps relaying to the end of its drain.  The peer is a socket of the test's own on
the host end of the node's link, which the region's `peers` allows.
"""
from __future__ import annotations

import base64
import json
import os
import pathlib
import re
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from typing import Dict, Iterator, List, Tuple

import pytest
from prometheus_client.parser import text_string_to_metric_families

from relay.cli.turnclient import UDP, TurnClient, error_code
from relay.proto import stun
from support.aioice_client import relay_round_trips
from support.certs import make_cert
from support.db import create_accounts, raw_rows
from support.k8s_cluster import CHART, RELEASE, RELEASE_NAMESPACE, wait_for
from support.k8s_node import Node, condition, node, rest_credentials
from support.postgres import throwaway_cluster
from support.servers import running_echo_peer, tool

NAMESPACE, REGION, SECRET = "relays", "node-east", "node-rest-secret"
API_PORT = 8443
DRAIN_SECONDS = 20
MESSAGES = 20
# Usage per account from the region's ledger, as support.accounting sums it.
TOTALS = ("SELECT s.account_id, SUM(d.packets_from_client), SUM(d.packets_to_client)"
          " FROM sessions s JOIN usage_deltas d ON d.session_id = s.session_id GROUP BY s.account_id")


@pytest.fixture(scope="module")
def cluster_node() -> Iterator[Node]:
    with node() as running:
        print(f"\nnode timings (s): {json.dumps({k: round(v, 1) for k, v in running.timings.items()})}")
        yield running






def relay_pods(cluster_node: Node) -> List[dict]:
    return cluster_node.get("pods", "-n", NAMESPACE, "-l", f"app.kubernetes.io/instance={REGION}")["items"]


def ready_pod(cluster_node: Node) -> dict:
    """The region's one Ready relay pod, not terminating."""
    def ready():
        pods = [p for p in relay_pods(cluster_node)
                if not p["metadata"].get("deletionTimestamp") and condition(p, "Ready") == "True"]
        return pods[0] if len(pods) == 1 else None
    return wait_for(ready, timeout=120, what="a Ready relay pod")


@pytest.fixture(scope="module")
def ledger(cluster_node) -> Iterator[Tuple[str, str]]:
    """The region's PostgreSQL ledger: (DSN for the tests, DSN for the pods)."""
    host = cluster_node.host_address
    with throwaway_cluster(also_listen=host, trusted=f"{cluster_node.address}/32") as db:
        yield db.dsn, db.dsn.replace("127.0.0.1", host)


@pytest.fixture(scope="module")
def operator_release(cluster_node) -> Iterator[None]:
    """The chart installed, the operator running as its pod from its image."""
    cluster = cluster_node.cluster
    start = time.monotonic()
    cluster.helm("install", RELEASE, str(CHART), "--namespace", RELEASE_NAMESPACE, "--create-namespace",
                 "--wait", "--timeout", "180s")
    print(f"\noperator pod Ready after helm install: {time.monotonic() - start:.1f} s")
    yield


@pytest.fixture(scope="module")
def region(cluster_node, operator_release, ledger, tmp_path_factory) -> Iterator[dict]:
    """A hostNetwork region on the node, Ready."""
    certs = tmp_path_factory.mktemp("certs")
    cert, key = make_cert(certs, "relay", san=f"IP:{cluster_node.address}")
    secrets = [
        {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
         "metadata": {"name": "relay-cert", "namespace": NAMESPACE},
         "stringData": {"tls.crt": cert.read_text(), "tls.key": key.read_text()}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "rest", "namespace": NAMESPACE},
         "stringData": {"secret": SECRET}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "ledger", "namespace": NAMESPACE},
         "stringData": {"dsn": ledger[1]}}]
    body = {"apiVersion": "turnrelay.io/v1alpha1", "kind": "TurnRegion",
            "metadata": {"name": REGION, "namespace": NAMESPACE},
            "spec": {"region": REGION, "replicas": 1, "drainSeconds": DRAIN_SECONDS, "workers": 2,
                     "exposure": {"hostNetwork": True, "serviceType": "ClusterIP"},
                     "tls": {"secretName": "relay-cert"}, "auth": {"secretName": "rest"},
                     "accounting": {"secretName": "ledger"},
                     "peers": {"allowed": [f"{cluster_node.host_address}/32"]}}}
    cluster_node.kubectl("create", "namespace", NAMESPACE)
    start = time.monotonic()
    cluster_node.apply(*secrets, body)

    def ready():
        found = cluster_node.get("turnregion", REGION, "-n", NAMESPACE)
        return found if condition(found, "Ready") == "True" else None
    found = wait_for(ready, timeout=180, what="the TurnRegion Ready")
    print(f"\nTurnRegion Ready {time.monotonic() - start:.1f} s after kubectl apply")
    yield found


def test_host_network_region_is_ready_through_the_kubelets_probes(cluster_node, region):
    pod = ready_pod(cluster_node)
    assert pod["spec"]["hostNetwork"] and pod["status"]["podIP"] == cluster_node.address
    container = pod["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # What the kubelet probed, from the host.
    for path, code in (("/healthz", 200), ("/readyz", 200)):
        with urllib.request.urlopen(f"http://{cluster_node.address}:9641{path}", timeout=5) as answer:
            assert answer.status == code
    # The image built the native data plane, so the relay runs it: its default.
    assert "data plane native: the default" in "".join(
        log.read_text() for log in relay_log_files()), relay_logs(cluster_node)


def uclient(cluster_node: Node, peer: Tuple[str, int], user: str, *flags: str, port: int = 3478) -> str:
    """coturn's turnutils_uclient with Send indications (-s: its channel numbers are RFC 5766's),
    an RTP/RTCP pair of allocations (EVEN-PORT, RESERVATION-TOKEN)."""
    result = subprocess.run(
        [tool("turnutils_uclient"), "-s", *flags, "-W", SECRET, "-u", user, "-p", str(port),
         "-e", peer[0], "-r", str(peer[1]), "-n", str(MESSAGES), "-m", "1", cluster_node.address],
        capture_output=True, text=True, timeout=90)
    return result.stdout + result.stderr


def usage(dsn: str) -> Dict[str, Tuple[int, int]]:
    return {account: (int(sent), int(received)) for account, sent, received in raw_rows(dsn, TOTALS)}


@pytest.mark.parametrize("transport, flags, port", [
    ("udp", (), 3478), ("tcp", ("-t",), 3478), ("tls", ("-t", "-S"), 5349)])
def test_uclient_relays_through_the_pod_and_the_ledger_is_exact(cluster_node, region, ledger,
                                                                 transport, flags, port):
    user = f"uclient-{transport}"
    with running_echo_peer(cluster_node.host_address) as peer:
        output = uclient(cluster_node, peer, user, *flags, port=port)
    totals = re.findall(r"tot_send_msgs=(\d+), tot_recv_msgs=(\d+)", output)
    assert totals and totals[-1] == (str(2 * MESSAGES), str(2 * MESSAGES)), output
    assert "Total lost packets 0 (" in output, output
    # uclient's allocations end when it exits; the relay writes their usage within its interval.
    wait_for(lambda: usage(ledger[0]).get(user) == (2 * MESSAGES, 2 * MESSAGES), timeout=30,
             what=f"{user}'s usage in the ledger: {usage(ledger[0]).get(user)}")
    if transport == "udp":  # the first run: the native data plane relayed all of it, both ways
        assert native_forwarded(cluster_node) == 4 * MESSAGES


def native_forwarded(cluster_node: Node) -> float:
    """What the relay's native data planes forwarded, every worker's, from its /metrics."""
    with urllib.request.urlopen(f"http://{cluster_node.address}:9641/metrics", timeout=5) as answer:
        text = answer.read().decode()
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples
               if sample.name == "turnrelay_dataplane_datagrams_total"
               and sample.labels.get("what") == "forwarded")


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_aioice_relays_through_the_pod(cluster_node, region, transport):
    class Server:
        host, port = cluster_node.address, 3478
    username, password = rest_credentials(SECRET, f"aioice-{transport}")
    relayed = relay_round_trips(Server, username, password, [b"x" * 200, b"y" * 1000], transport=transport,
                                peer_host=cluster_node.host_address)
    assert relayed[0] == cluster_node.address


def allocate(cluster_node: Node, user: str) -> TurnClient:
    username, password = rest_credentials(SECRET, user)
    return TurnClient.connect(UDP, (cluster_node.address, 3478), username, password, REGION,
                              bind_host=cluster_node.host_address)


class HeldAllocation:
    """A UDP allocation of the test's own, relaying to a peer socket on the host."""

    def __init__(self, cluster_node: Node, user: str):
        self.client = allocate(cluster_node, user)
        reply = self.client.request(stun.ALLOCATE, (stun.REQUESTED_TRANSPORT, 17))
        assert reply.cls == stun.SUCCESS, error_code(reply)
        self.peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.peer.settimeout(5)
        self.peer.bind((cluster_node.host_address, 0))
        self.relayed = reply.get(stun.XOR_RELAYED_ADDRESS)
        reply = self.client.request(stun.CREATE_PERMISSION, (stun.XOR_PEER_ADDRESS, self.peer.getsockname()))
        assert reply.cls == stun.SUCCESS, error_code(reply)
        self.sent = 0

    def round_trip(self) -> None:
        payload = f"packet {self.sent}".encode()
        self.client.send_indication(self.peer.getsockname(), payload)
        data, source = self.peer.recvfrom(2048)
        assert data == payload and source == tuple(self.relayed)
        self.peer.sendto(payload, source)   # and back, as a Data indication
        peer, echoed = self.client.receive_data()
        assert (tuple(peer), echoed) == (self.peer.getsockname(), payload)
        self.sent += 1

    def close(self) -> None:
        self.client.request(stun.REFRESH, (stun.LIFETIME, 0))
        self.client.close()
        self.peer.close()


def test_killed_relay_is_restarted_by_the_kubelet(cluster_node, region):
    pod = ready_pod(cluster_node)
    name = pod["metadata"]["name"]
    restarts = pod["status"]["containerStatuses"][0]["restartCount"]
    os.kill(cluster_node.container_pid(name, NAMESPACE, "turnrelay"), signal.SIGKILL)
    start = time.monotonic()

    def restarted():
        found = cluster_node.get("pod", name, "-n", NAMESPACE)
        status = found["status"]["containerStatuses"][0]
        return status["restartCount"] == restarts + 1 and condition(found, "Ready") == "True"
    wait_for(restarted, timeout=90, what="the relay restarted and Ready")
    print(f"\nkilled relay Ready again after {time.monotonic() - start:.1f} s")
    wait_for(lambda: condition(cluster_node.get("turnregion", REGION, "-n", NAMESPACE), "Ready") == "True",
             timeout=30, what="the TurnRegion Ready again")
    with urllib.request.urlopen(f"http://{cluster_node.address}:9641/healthz", timeout=5) as answer:
        assert answer.status == 200
    held = HeldAllocation(cluster_node, "after-restart")
    held.round_trip()
    held.close()


def test_certificate_rotated_in_place_reaches_the_running_relay(cluster_node, region, tmp_path):
    pod = ready_pod(cluster_node)
    cert, key = make_cert(tmp_path, "rotated", san=f"IP:{cluster_node.address}")
    cluster_node.kubectl("patch", "secret", "relay-cert", "-n", NAMESPACE, "--type", "merge", "-p", json.dumps(
        {"stringData": {"tls.crt": cert.read_text(), "tls.key": key.read_text()}}))
    wanted = ssl.PEM_cert_to_DER_cert(cert.read_text())

    def served():
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        with socket.create_connection((cluster_node.address, 5349), timeout=5) as raw:
            with context.wrap_socket(raw) as tls:
                return tls.getpeercert(binary_form=True) == wanted
    wait_for(served, timeout=120, what="the rotated certificate served")
    # The same pod, never restarted.
    after = ready_pod(cluster_node)
    assert after["metadata"]["uid"] == pod["metadata"]["uid"]
    assert after["status"]["containerStatuses"][0]["restartCount"] == pod["status"]["containerStatuses"][0]["restartCount"]


def relay_log_files() -> List[pathlib.Path]:
    """The region's relay containers' logs, as the kubelet writes them."""
    return sorted(pathlib.Path("/var/log/pods").glob(f"{NAMESPACE}_{REGION}-*/turnrelay/*.log"))


def relay_logs(cluster_node: Node) -> str:
    """The region's pods and their relays' last log lines, from the kubelet's log folder."""
    pods = cluster_node.kubectl("get", "pods", "-n", NAMESPACE, "-o", "wide").stdout
    logs = []
    for log in relay_log_files():
        logs.append(f"--- {log}\n" + "".join(log.read_text().splitlines(True)[-15:]))
    return pods + "\n".join(logs)


def roll_drains(cluster_node: Node, ledger, user: str, roll) -> None:
    """`roll()` replaces the relay pod: the live allocation keeps relaying until drainSeconds,
    new Allocates on the draining relay are refused (508, no other relay to send them to), the
    new pod takes new clients, and the ledger holds every packet."""
    old = ready_pod(cluster_node)
    held = HeldAllocation(cluster_node, user)
    held.round_trip()
    roll()
    wait_for(lambda: cluster_node.get("pod", old["metadata"]["name"], "-n", NAMESPACE)["metadata"].get(
        "deletionTimestamp"), timeout=30, what="the old pod terminating")
    # Draining: SIGTERM after the preStop pause; the relay refuses new allocations.
    newcomer = allocate(cluster_node, f"{user}-refused")

    def refused():
        reply = newcomer.request(stun.ALLOCATE, (stun.REQUESTED_TRANSPORT, 17))
        if reply.cls == stun.SUCCESS:
            newcomer.request(stun.REFRESH, (stun.LIFETIME, 0))
            return None
        return error_code(reply)
    try:
        code = wait_for(refused, timeout=30, what="a new Allocate refused while draining")
    except AssertionError as err:
        raise AssertionError(f"{err}\n{relay_logs(cluster_node)}") from None
    assert code in (300, 508), relay_logs(cluster_node)
    newcomer.close()
    started = time.monotonic()
    while time.monotonic() - started < DRAIN_SECONDS - 8:
        held.round_trip()   # the live allocation relays on through the drain
        time.sleep(1)
    sent = held.sent
    held.close()
    new = ready_pod(cluster_node)
    assert new["metadata"]["uid"] != old["metadata"]["uid"]
    after = HeldAllocation(cluster_node, f"{user}-after")
    after.round_trip()
    after.close()
    wait_for(lambda: usage(ledger[0]).get(user) == (sent, sent), timeout=30,
             what=f"{user}'s {sent} packets in the ledger: {usage(ledger[0]).get(user)}")


def test_config_change_rolls_the_relay_with_a_drain(cluster_node, region, ledger):
    roll_drains(cluster_node, ledger, "rolled", lambda: cluster_node.kubectl(
        "patch", "turnregion", REGION, "-n", NAMESPACE, "--type", "merge", "-p", '{"spec": {"ratePerMB": 0.002}}'))


def test_kubectl_delete_pod_drains_the_same_way(cluster_node, region, ledger):
    name = ready_pod(cluster_node)["metadata"]["name"]
    roll_drains(cluster_node, ledger, "deleted", lambda: cluster_node.kubectl(
        "delete", "pod", name, "-n", NAMESPACE, "--wait=false"))


def mint_on(address: str, port: int, account: str, key: str) -> dict:
    """A token from the tokens API a relay pod serves (its certificate is the test's own)."""
    request = urllib.request.Request(
        f"https://{address}:{port}/v1/accounts/{account}/tokens", data=b"ttl=600", method="POST",
        headers={"Authorization": "Basic " + base64.b64encode(f"{account}:{key}".encode()).decode(),
                 "Content-Type": "application/x-www-form-urlencoded"})
    with urllib.request.urlopen(request, timeout=10, context=ssl._create_unverified_context()) as answer:
        return json.loads(answer.read())


def test_a_relay_pods_tokens_api_hands_out_the_nearest_serving_region(cluster_node, region, ledger,
                                                                      in_reactor):
    """Two regions on the node, where their cloud namesakes are: node-east (hostNetwork, its
    tokens API on) and node-west (pod network). node-east's relay answers with itself, then
    node-west; marked draining, its answers move to node-west within seconds: the operator
    rewrites the directory and nudges the pods, the kubelet swaps the mounted file, the relay
    re-reads it."""
    keys = in_reactor(create_accounts, ledger[0], ("acme",))
    west = {"apiVersion": "turnrelay.io/v1alpha1", "kind": "TurnRegion",
            "metadata": {"name": "node-west", "namespace": NAMESPACE},
            "spec": {"region": "node-west", "replicas": 1,
                     "location": {"latitude": 53.35, "longitude": -6.26, "country": "IE", "continent": "EU"},
                     "exposure": {"serviceType": "ClusterIP", "externalIPs": ["198.51.100.30"]}}}
    cluster_node.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "accounts", "namespace": NAMESPACE},
                        "stringData": {"dsn": ledger[1]}}, west)
    old = ready_pod(cluster_node)["metadata"]["uid"]
    cluster_node.kubectl("patch", "turnregion", REGION, "-n", NAMESPACE, "--type", "merge", "-p", json.dumps(
        {"spec": {"location": {"latitude": 38.94, "longitude": -77.46, "country": "US", "continent": "NA"},
                  "api": {"port": API_PORT, "secretName": "accounts"}}}))
    wait_for(lambda: ready_pod(cluster_node)["metadata"]["uid"] != old, timeout=120, what="node-east rolled")
    wait_for(lambda: condition(cluster_node.get("turnregion", "node-west", "-n", NAMESPACE), "Ready") == "True",
             timeout=120, what="node-west Ready")

    def answer(first: str) -> dict:
        def check():
            token = mint_on(cluster_node.address, API_PORT, "acme", keys["acme"])
            return token if token["region"] == first else None
        return check
    token = wait_for(answer(REGION), timeout=90, what="node-east's answer")
    if token["fallback_region"] != "node-west":  # node-west's readiness not yet in node-east's pod
        token = wait_for(lambda: (t := answer(REGION)()) and t["fallback_region"] == "node-west" and t,
                         timeout=90, what="node-west as the fallback")
    assert token["region_reason"] == "default"  # no GeoIP database: the relay's own region
    urls = [server["urls"] for server in token["ice_servers"]]
    assert urls[0] == f"stun:{cluster_node.address}:3478"
    assert "turn:198.51.100.30:3478?transport=udp" in urls
    started = time.monotonic()
    cluster_node.kubectl("patch", "turnregion", REGION, "-n", NAMESPACE, "--type", "merge", "-p",
                         '{"spec": {"draining": true}}')
    moved = wait_for(answer("node-west"), timeout=30, what="node-west first once node-east drains")
    took = time.monotonic() - started
    assert moved["region_note"].endswith(f"{REGION} is draining: the nearest serving region")
    assert moved["ice_servers"][0]["urls"] == "stun:198.51.100.30:3478"
    print(f"\nnode-east draining: its tokens API answered node-west {took:.1f} s after the patch")
    assert took < 15, took
    cluster_node.kubectl("patch", "turnregion", REGION, "-n", NAMESPACE, "--type", "merge", "-p",
                         '{"spec": {"draining": false}}')
    cluster_node.kubectl("delete", "turnregion", "node-west", "-n", NAMESPACE)


def test_helm_uninstall_stops_the_operator(cluster_node, operator_release):
    cluster_node.cluster.helm("uninstall", RELEASE, "--namespace", RELEASE_NAMESPACE, "--wait")
    ended: dict = {}  # the operator container's end, as the kubelet reported it

    def gone():
        pods = cluster_node.get("pods", "-n", RELEASE_NAMESPACE)["items"]
        for pod in pods:
            for status in pod["status"].get("containerStatuses") or []:
                end = status.get("state", {}).get("terminated") or status.get("lastState", {}).get("terminated")
                # ContainerStatusUnknown is the kubelet's stand-in for a container it removed
                # itself, not how the operator ended.
                if end and end.get("reason") != "ContainerStatusUnknown":
                    ended[status["name"]] = end
        assert not pods, [(p["metadata"]["name"], p["metadata"].get("deletionTimestamp"),
                           p["status"].get("containerStatuses")) for p in pods]
        return True
    # The 1.20 kubelet sometimes deletes a stopped pod only at a later sync, 30-40 s on (see
    # test_node_region_k8s's roll test): the wait allows that, and the operator's own exit,
    # where seen, must be its own (0), not the kill at the end of its grace period.
    wait_for(gone, timeout=120, what="the operator pod gone")
    assert all(end.get("exitCode") == 0 for end in ended.values()), ended
