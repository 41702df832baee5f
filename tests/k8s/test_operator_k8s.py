"""The chart and the operator against a real Kubernetes 1.20 API server (tests/support/k8s_cluster.py).

One story, in file order, as an operator of a fleet would live it: lint and render the chart,
install it, create two regions, scale and reconfigure one, break children by hand, send an
invalid spec, restart the operator, delete a region, uninstall.  No kubelet runs, so pods stay
Pending: readiness is 0 throughout (tests/k8s/test_operator_manifests.py runs the relay itself).
The operator runs as a local `kopf run` process with the chart's ServiceAccount identity, so
every call it makes is checked against the chart's RBAC.
"""
from __future__ import annotations

import copy
import json
from typing import Dict, Iterator

import kubernetes_validate
import pytest
import turnregion_manifests as m
import yaml
from kubernetes.dynamic.exceptions import NotFoundError, UnprocessibleEntityError

from support.k8s_cluster import (
    CHART,
    RELEASE,
    RELEASE_NAMESPACE,
    SCHEMA_VERSION,
    Cluster,
    apply_crd,
    control_plane,
    wait_for,
)
from support.k8s_operator import Operator

NAMESPACE = "relays"
INSTANCE = "app.kubernetes.io/instance"
VALUES_REGION = {"name": "ap-south", "namespace": NAMESPACE, "spec": {"region": "ap-south", "replicas": 1, "ratePerMB": 0.005}}


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with control_plane() as running:
        yield running


@pytest.fixture(scope="module")
def operator(cluster) -> Iterator[Operator]:
    running = Operator(cluster, NAMESPACE)
    yield running
    running.stop()


@pytest.fixture(autouse=True)
def operator_log(operator) -> Iterator[None]:
    """The operator's log lines of this test, printed (so shown when the test fails)."""
    start = operator.log.stat().st_size if operator.log.exists() else 0
    yield
    if operator.log.exists():
        with open(operator.log, errors="replace") as log:
            log.seek(start)
            print(log.read()[-20000:])


def api(cluster, api_version, kind):
    return cluster.client().resources.get(api_version=api_version, kind=kind)


def regions(cluster):
    return api(cluster, "turnrelay.io/v1alpha1", "TurnRegion")


def get(cluster, api_version, kind, name, namespace=NAMESPACE) -> Dict:
    return api(cluster, api_version, kind).get(name=name, namespace=namespace).to_dict()


def children_of(cluster, instance) -> Dict:
    """Every object labelled as `instance`'s child, by (kind, name)."""
    found = {}
    for api_version, kind in (("v1", "ConfigMap"), ("v1", "Service"), ("apps/v1", "Deployment"),
                              ("policy/v1beta1", "PodDisruptionBudget"), ("networking.k8s.io/v1", "NetworkPolicy")):
        for item in api(cluster, api_version, kind).get(namespace=NAMESPACE, label_selector=f"{INSTANCE}={instance}").to_dict()["items"]:
            found[(kind, item["metadata"]["name"])] = item
    return found


def status_of(cluster, name) -> Dict:
    return get(cluster, "turnrelay.io/v1alpha1", "TurnRegion", name).get("status") or {}


def condition(status, kind) -> Dict:
    return next(c for c in status.get("conditions", []) if c["type"] == kind)


def render(cluster, *values: str) -> list:
    out = cluster.helm("template", RELEASE, str(CHART), "--namespace", RELEASE_NAMESPACE, "--include-crds", *values).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def test_helm_lint_strict(cluster):
    result = cluster.helm("lint", "--strict", str(CHART))
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("values", [[], ["--set", f"operator.watchNamespaces={{{NAMESPACE},other}}"]],
                         ids=["cluster-wide", "namespaced"])
def test_rendered_chart_is_valid(cluster, values):
    """Built-in kinds against the Kubernetes schemas; the CRD and a TurnRegion from values by
    the real API server, which validates and stores nothing (a server-side dry run)."""
    docs = render(cluster, "--set", "regions[0].name=ap-south", "--set", "regions[0].spec.region=ap-south", *values)
    kinds = sorted({d["kind"] for d in docs})
    assert "CustomResourceDefinition" in kinds and "TurnRegion" in kinds and "Deployment" in kinds
    for doc in docs:
        if doc["kind"] not in ("CustomResourceDefinition", "TurnRegion"):
            kubernetes_validate.validate(doc, SCHEMA_VERSION, strict=True)
    roles = [d for d in docs if d["kind"] in ("Role", "ClusterRole")]
    if values:
        assert sorted(r["metadata"]["namespace"] for r in roles if r["kind"] == "Role") == sorted([NAMESPACE, "other"])
        args = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
        assert f"--namespace={NAMESPACE}" in args and "--all-namespaces" not in args
    crd = apply_crd(cluster, dry_run=True)
    assert crd["spec"]["names"]["shortNames"] == ["tr"]
    region = next(d for d in docs if d["kind"] == "TurnRegion")
    region["metadata"]["namespace"] = "default"
    created = regions(cluster).create(body=region, namespace="default", dry_run="All").to_dict()
    assert created["spec"]["replicas"] == 2 and created["spec"]["listeners"]["port"] == 3478  # defaulted
    with pytest.raises(NotFoundError):
        regions(cluster).get(name="ap-south", namespace="default")


def test_helm_install(cluster, operator):
    ns = api(cluster, "v1", "Namespace")
    ns.create(body={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
    cluster.helm("install", RELEASE, str(CHART), "--namespace", RELEASE_NAMESPACE, "--create-namespace",
                 "--set", f"operator.watchNamespaces={{{NAMESPACE}}}",
                 "--set-json", "regions=" + json.dumps([VALUES_REGION]))
    deployment = get(cluster, "apps/v1", "Deployment", f"{RELEASE}-operator", RELEASE_NAMESPACE)
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == RELEASE
    get(cluster, "rbac.authorization.k8s.io/v1", "Role", RELEASE, NAMESPACE)
    # No kubelet here: the operator the chart deployed cannot run, so run the same code locally.
    operator.start()
    wait_for(lambda: children_of(cluster, "ap-south").get(("Deployment", "ap-south")),
             what="the values region's Deployment")
    operator.check()


US_EAST = {"apiVersion": "turnrelay.io/v1alpha1", "kind": "TurnRegion",
           "metadata": {"name": "us-east", "namespace": NAMESPACE},
           "spec": {"region": "us-east", "replicas": 2, "ratePerMB": 0.002}}
EU_WEST = {"apiVersion": "turnrelay.io/v1alpha1", "kind": "TurnRegion",
           "metadata": {"name": "eu-west", "namespace": NAMESPACE},
           "spec": {"region": "eu-west", "replicas": 1, "ratePerMB": 0.003, "networkPolicy": True,
                    "listeners": {"transports": ["udp", "tls"]},
                    "exposure": {"serviceType": "ClusterIP", "externalIPs": ["203.0.113.7"]}}}
EXPECTED = {
    "us-east": {("ConfigMap", "us-east-config"), ("Service", "us-east-udp"), ("Service", "us-east-tcp"),
                ("Deployment", "us-east"), ("PodDisruptionBudget", "us-east")},
    "eu-west": {("ConfigMap", "eu-west-config"), ("Service", "eu-west-udp"), ("Service", "eu-west-tcp"),
                ("Deployment", "eu-west"), ("PodDisruptionBudget", "eu-west"), ("NetworkPolicy", "eu-west")},
}


def wait_for_children(cluster, name):
    return wait_for(lambda: set(children_of(cluster, name)) == EXPECTED[name] and children_of(cluster, name),
                    what=f"{name}'s children")


def directory(cluster) -> Dict:
    return json.loads(get(cluster, "v1", "ConfigMap", m.DIRECTORY_NAME)["data"]["regions.json"])


def test_two_regions(cluster, operator):
    for body in (US_EAST, EU_WEST):
        regions(cluster).create(body=copy.deepcopy(body), namespace=NAMESPACE)
    for name in EXPECTED:
        owner = get(cluster, "turnrelay.io/v1alpha1", "TurnRegion", name)
        assert not owner["metadata"].get("finalizers")  # deletable with no operator running
        for (kind, child_name), child in wait_for_children(cluster, name).items():
            assert child["metadata"]["ownerReferences"] == [
                {"apiVersion": "turnrelay.io/v1alpha1", "kind": "TurnRegion", "name": name,
                 "uid": owner["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}], child_name
            assert child["metadata"]["labels"] == m.labels(owner), child_name
        assert children_of(cluster, name)[("PodDisruptionBudget", name)]["apiVersion"] == "policy/v1beta1"
    eu = wait_for(lambda: status_of(cluster, "eu-west").get("endpoints") and status_of(cluster, "eu-west"))
    assert eu["endpoints"] == ["turn:203.0.113.7:3478?transport=udp", "turns:203.0.113.7:5349?transport=tcp"]
    assert eu["observedGeneration"] == 1 and eu["readyReplicas"] == 0
    assert (condition(eu, "Ready")["status"], condition(eu, "Ready")["reason"]) == ("False", "ReplicasNotReady")
    assert condition(eu, "Ready")["message"] == "0/1 relays ready"
    assert condition(eu, "Degraded")["status"] == "False"
    udp = get(cluster, "v1", "Service", "eu-west-udp")["spec"]
    assert udp["externalIPs"] == ["203.0.113.7"] and [p["protocol"] for p in udp["ports"]] == ["UDP"]
    # No cloud here: play the cloud controller, giving the load balancers an address.
    for service in ("us-east-udp", "us-east-tcp"):
        api(cluster, "v1", "Service").status.patch(
            body={"status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.10"}]}}}, name=service,
            namespace=NAMESPACE, content_type="application/merge-patch+json")
    us = wait_for(lambda: status_of(cluster, "us-east").get("endpoint") == "198.51.100.10" and status_of(cluster, "us-east"))
    assert "turns:198.51.100.10:5349?transport=tcp" in us["endpoints"]
    table = cluster.client().request(
        "get", f"/apis/turnrelay.io/v1alpha1/namespaces/{NAMESPACE}/turnregions",
        header_params={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"}).to_dict()
    assert [c["name"] for c in table["columnDefinitions"]] == ["Name", "Region", "Replicas", "Ready", "Endpoint", "Age"]
    rows = {row["cells"][0]: row["cells"][1:5] for row in table["rows"]}
    assert rows["us-east"] == ["us-east", 2, 0, "198.51.100.10"]
    assert rows["eu-west"] == ["eu-west", 1, 0, "203.0.113.7"]
    listed = wait_for(lambda: len(directory(cluster)) == 3 and directory(cluster), what="the region directory")
    assert {r: listed[r]["ratePerMB"] for r in listed} == {"ap-south": 0.005, "eu-west": 0.003, "us-east": 0.002}
    assert listed["eu-west"]["endpoints"] == eu["endpoints"]
    operator.check()


def test_scale_and_reconfigure_patch_in_place(cluster, operator):
    before = get(cluster, "apps/v1", "Deployment", "us-east")
    config_hash = before["spec"]["template"]["metadata"]["annotations"][m.CONFIG_HASH]
    regions(cluster).patch(body={"spec": {"replicas": 3}}, name="us-east", namespace=NAMESPACE,
                           content_type="application/merge-patch+json")
    scaled = wait_for(lambda: (d := get(cluster, "apps/v1", "Deployment", "us-east"))["spec"]["replicas"] == 3 and d)
    assert scaled["metadata"]["uid"] == before["metadata"]["uid"]
    assert scaled["spec"]["template"]["metadata"]["annotations"][m.CONFIG_HASH] == config_hash
    regions(cluster).patch(body={"spec": {"quotas": {"user": 4}}}, name="us-east", namespace=NAMESPACE,
                           content_type="application/merge-patch+json")
    wait_for(lambda: "user-quota = 4" in get(cluster, "v1", "ConfigMap", "us-east-config")["data"]["turnrelay.toml"])
    rolled = wait_for(lambda: (d := get(cluster, "apps/v1", "Deployment", "us-east"))["spec"]["template"]["metadata"]["annotations"][m.CONFIG_HASH] != config_hash and d)
    assert rolled["metadata"]["uid"] == before["metadata"]["uid"]
    # The Deployment controller starts a rollout: a second ReplicaSet for the new template.
    wait_for(lambda: len(api(cluster, "apps/v1", "ReplicaSet").get(
        namespace=NAMESPACE, label_selector=f"{INSTANCE}=us-east").to_dict()["items"]) == 2, what="a rollout")
    wait_for(lambda: status_of(cluster, "us-east").get("observedGeneration") == 3)
    operator.check()


def test_deleted_or_edited_children_come_back(cluster, operator):
    for kind, name in (("Service", "us-east-udp"), ("ConfigMap", "us-east-config")):
        old = get(cluster, "v1", kind, name)["metadata"]["uid"]
        api(cluster, "v1", kind).delete(name=name, namespace=NAMESPACE)
        wait_for(lambda: get(cluster, "v1", kind, name)["metadata"]["uid"] != old, what=f"{kind} {name} back")
    api(cluster, "apps/v1", "Deployment").patch(body={"spec": {"replicas": 9}}, name="us-east", namespace=NAMESPACE,
                                                content_type="application/merge-patch+json")
    wait_for(lambda: get(cluster, "apps/v1", "Deployment", "us-east")["spec"]["replicas"] == 3, what="replicas repaired")
    operator.check()


def test_refused_spec_keeps_the_serving_relays_endpoints(cluster, operator):
    """The relays of the last good spec keep serving, so their load balancers' address stays
    in the status and the directory while the spec is Degraded."""
    regions(cluster).patch(body={"spec": {"relayPorts": {"min": 60000, "max": 50000}}}, name="us-east",
                           namespace=NAMESPACE, content_type="application/merge-patch+json")
    status = wait_for(lambda: condition(s := status_of(cluster, "us-east"), "Degraded")["status"] == "True" and s)
    assert status["endpoint"] == "198.51.100.10"
    assert "turn:198.51.100.10:3478?transport=udp" in status["endpoints"]
    assert directory(cluster)["us-east"]["endpoints"] == status["endpoints"]
    regions(cluster).patch(body={"spec": {"relayPorts": None}}, name="us-east", namespace=NAMESPACE,
                           content_type="application/merge-patch+json")
    wait_for(lambda: condition(status_of(cluster, "us-east"), "Degraded")["status"] == "False")
    operator.check()


@pytest.mark.parametrize("spec, message", [
    ({"replicas": 2}, "spec.region: Required value"),
    ({"region": "x", "replicas": 500}, "spec.replicas: Invalid value: 500: spec.replicas in body should be less than or equal to 100"),
    ({"region": "x", "listeners": {"transports": ["sctp"]}}, 'spec.listeners.transports: Unsupported value: "sctp": supported values: "udp", "tcp", "tls"'),
    ({"region": "x", "relayPorts": {"min": 80}}, "spec.relayPorts.min: Invalid value: 80: spec.relayPorts.min in body should be greater than or equal to 1024"),
    ({"region": "Not_A_Region"}, "spec.region in body should match"),
], ids=["missing-region", "replicas-out-of-range", "unknown-transport", "bad-port", "bad-region-name"])
def test_invalid_spec_is_rejected_with_a_clear_message(cluster, spec, message):
    body = {"apiVersion": "turnrelay.io/v1alpha1", "kind": "TurnRegion",
            "metadata": {"name": "broken", "namespace": NAMESPACE}, "spec": spec}
    with pytest.raises(UnprocessibleEntityError) as rejected:
        regions(cluster).create(body=body, namespace=NAMESPACE)
    assert message in json.loads(rejected.value.body)["message"]


def test_port_range_the_schema_cannot_order_is_degraded(cluster, operator):
    body = {"apiVersion": "turnrelay.io/v1alpha1", "kind": "TurnRegion",
            "metadata": {"name": "bad-ports", "namespace": NAMESPACE},
            "spec": {"region": "bad-ports", "replicas": 1, "relayPorts": {"min": 60000, "max": 50000}}}
    regions(cluster).create(body=body, namespace=NAMESPACE)
    status = wait_for(lambda: condition(s := status_of(cluster, "bad-ports"), "Degraded")["status"] == "True" and s)
    degraded = condition(status, "Degraded")
    assert (degraded["reason"], degraded["message"]) == ("InvalidSpec", "relayPorts: min 60000 must be below max 50000")
    assert children_of(cluster, "bad-ports") == {}
    regions(cluster).patch(body={"spec": {"relayPorts": {"max": 61000}}}, name="bad-ports", namespace=NAMESPACE,
                           content_type="application/merge-patch+json")
    wait_for(lambda: condition(status_of(cluster, "bad-ports"), "Degraded")["status"] == "False")
    assert ("Deployment", "bad-ports") in children_of(cluster, "bad-ports")
    regions(cluster).delete(name="bad-ports", namespace=NAMESPACE)
    wait_for(lambda: children_of(cluster, "bad-ports") == {}, what="bad-ports' children collected")
    operator.check()


def test_operator_restart_resumes_without_duplicates(cluster, operator):
    def uids():
        return {(name, key): child["metadata"]["uid"]
                for name in EXPECTED for key, child in children_of(cluster, name).items()}
    before = uids()
    operator.stop()
    # A change made while the operator is down is applied when it resumes.
    regions(cluster).patch(body={"spec": {"replicas": 2}}, name="eu-west", namespace=NAMESPACE,
                           content_type="application/merge-patch+json")
    operator.start()
    wait_for(lambda: get(cluster, "apps/v1", "Deployment", "eu-west")["spec"]["replicas"] == 2, what="resume")
    assert uids() == before
    deployments = api(cluster, "apps/v1", "Deployment").get(namespace=NAMESPACE).to_dict()["items"]
    assert sorted(d["metadata"]["name"] for d in deployments) == ["ap-south", "eu-west", "us-east"]
    operator.check()


def test_deleting_a_region_takes_its_children(cluster, operator):
    regions(cluster).delete(name="eu-west", namespace=NAMESPACE)
    wait_for(lambda: children_of(cluster, "eu-west") == {}, what="the garbage collector")
    wait_for(lambda: sorted(directory(cluster)) == ["ap-south", "us-east"], what="the directory without eu-west")
    assert set(children_of(cluster, "us-east")) == EXPECTED["us-east"]
    operator.check()


def test_helm_uninstall(cluster, operator):
    operator.stop()  # its permissions go with the release
    cluster.helm("uninstall", RELEASE, "--namespace", RELEASE_NAMESPACE, "--wait")
    with pytest.raises(NotFoundError):
        get(cluster, "apps/v1", "Deployment", f"{RELEASE}-operator", RELEASE_NAMESPACE)
    with pytest.raises(NotFoundError):
        get(cluster, "rbac.authorization.k8s.io/v1", "Role", RELEASE, NAMESPACE)
    # The release's own TurnRegion goes, and its children with it; the CRD stays (crds/).
    wait_for(lambda: children_of(cluster, "ap-south") == {}, what="ap-south's children collected")
    assert sorted(r["metadata"]["name"] for r in regions(cluster).get(namespace=NAMESPACE).to_dict()["items"]) == ["us-east"]
