"""kopf handlers that keep each TurnRegion's relays matching its spec.

Run with `kopf run operator/turnregion_operator.py --namespace NS` (or `--all-namespaces`).
The handlers hold no logic of their own about what a relay looks like: turnregion_manifests.py
builds every child; here they are only read, created when missing, patched when they differ,
adopted through owner references (so deleting a TurnRegion lets the garbage collector take
its children), and summed up in the TurnRegion's status.

The status also follows the relays as they change: events of the regions' pods and
Deployments rewrite it at once (readiness; for hostNetwork regions, the nodes whose ready relays
are the endpoints).

One `reconcile` serves creation, every spec change, operator start-up (`resume`: children are
found by their fixed names, so a restart creates no duplicates) and a timer that repairs drift
every TURNRELAY_DRIFT_SECONDS (default 30): a deleted or edited child comes back, a changed
Secret rolls the relays, and readiness and load-balancer addresses reach the status.  No
handler needs a finalizer, so a TurnRegion is deleted at once even with no operator running.
"""
from __future__ import annotations

import asyncio
import collections
import datetime
import functools
import logging
import os
import threading
from typing import Any, Dict, List, Mapping, Optional

import kopf
import kubernetes
import turnregion_manifests as m
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import ConflictError, NotFoundError, ResourceNotFoundError

DRIFT_SECONDS = float(os.environ.get("TURNRELAY_DRIFT_SECONDS", "30"))
MANAGED_BY = "app.kubernetes.io/managed-by=turnrelay-operator"


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Progress in annotations only: the CRD's structural schema would prune kopf's status keys.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage()
    # One operator replica (the chart's Deployment uses Recreate): no peering objects needed.
    # Its identity comes from POD_ID (the chart sets the pod's name), never from the passwd
    # database, which has no entry for the image's uid.
    settings.peering.standalone = True
    settings.posting.level = logging.WARNING


@functools.lru_cache(maxsize=None)
def client() -> DynamicClient:
    """One discovery-backed client: it serves every kind by apiVersion and kind, and tells
    which PodDisruptionBudget version this server has."""
    kubernetes.config.load_config()
    return DynamicClient(kubernetes.client.ApiClient())


@functools.lru_cache(maxsize=None)
def pdb_api_version() -> str:
    """policy/v1 where served (1.21+), else policy/v1beta1 (1.20, the test server)."""
    for version in ("policy/v1", "policy/v1beta1"):
        try:
            client().resources.get(api_version=version, kind="PodDisruptionBudget")
            return version
        except ResourceNotFoundError:
            continue
    raise kopf.PermanentError("the server offers no PodDisruptionBudget API")


def managed_kinds() -> List[tuple]:
    return [("v1", "ConfigMap"), ("v1", "Service"), ("apps/v1", "Deployment"),
            (pdb_api_version(), "PodDisruptionBudget"), ("networking.k8s.io/v1", "NetworkPolicy")]


def _contains(current: Any, desired: Any) -> bool:
    """Whether `current` already has every field `desired` sets (server defaults aside)."""
    if isinstance(desired, dict):
        return isinstance(current, dict) and all(_contains(current.get(k), v) for k, v in desired.items())
    if isinstance(desired, list):
        return (isinstance(current, list) and len(current) == len(desired)
                and all(_contains(c, d) for c, d in zip(current, desired)))
    return current == desired


def ensure(child: Dict[str, Any]) -> Dict[str, Any]:
    """Create `child` if it is missing, patch it if it differs; the object as stored."""
    resource = client().resources.get(api_version=child["apiVersion"], kind=child["kind"])
    name, namespace = child["metadata"]["name"], child["metadata"]["namespace"]
    try:
        current = resource.get(name=name, namespace=namespace).to_dict()
    except NotFoundError:
        try:
            return resource.create(body=child, namespace=namespace).to_dict()
        except ConflictError:  # created meanwhile by a concurrent handler: patch it instead
            current = resource.get(name=name, namespace=namespace).to_dict()
    if _contains(current, child):
        return current
    if child["kind"] == "Service":
        # A merge patch replaces the ports list: keep the node ports the server allocated.
        allocated = {p["name"]: p.get("nodePort") for p in current["spec"].get("ports", [])}
        for port in child["spec"]["ports"]:
            if allocated.get(port["name"]):
                port["nodePort"] = allocated[port["name"]]
    return resource.patch(body=child, name=name, namespace=namespace,
                          content_type="application/merge-patch+json").to_dict()


def owned(body: Mapping[str, Any], api_version: str, kind: str) -> List[Dict[str, Any]]:
    """The stored children of `kind` this region owns, found by the labels every child carries."""
    selector = f"{MANAGED_BY},app.kubernetes.io/instance={body['metadata']['name']}"
    resource = client().resources.get(api_version=api_version, kind=kind)
    items = resource.get(namespace=body["metadata"]["namespace"], label_selector=selector).to_dict()["items"]
    return [item for item in items if body["metadata"]["uid"] in
            {ref["uid"] for ref in item["metadata"].get("ownerReferences") or []}]


def prune(body: Mapping[str, Any], keep: List[Dict[str, Any]], logger: logging.Logger) -> None:
    """Delete children this region no longer wants (a transport turned off, the NetworkPolicy
    disabled)."""
    wanted = {(c["kind"], c["metadata"]["name"]) for c in keep}
    for api_version, kind in managed_kinds():
        for item in owned(body, api_version, kind):
            if (kind, item["metadata"]["name"]) not in wanted:
                logger.info(f"deleting {kind} {item['metadata']['name']}: no longer in the spec")
                client().resources.get(api_version=api_version, kind=kind).delete(
                    name=item["metadata"]["name"], namespace=body["metadata"]["namespace"])


def secret_versions(spec: Mapping[str, Any], namespace: str) -> tuple:
    """The auth and accounting Secrets' resourceVersions ("auth=34,accounting=56"): in the pod
    template they make a rotated secret a rolling update, since the relay reads them at start.
    A certificate rotated in place rolls nothing: the kubelet updates the mounted Secret and the
    running relays reload it (they look at their certificate files every few seconds).  Also
    the missing Secrets' names."""
    secrets = client().resources.get(api_version="v1", kind="Secret")
    versions, missing = [], []
    for field in ("tls", "auth", "accounting"):
        if spec.get(field):
            name = spec[field]["secretName"]
            try:
                secret = secrets.get(name=name, namespace=namespace)
                if field != "tls":
                    versions.append(f"{field}={secret.metadata.resourceVersion}")
            except NotFoundError:
                missing.append(f"{field}.secretName: Secret {name!r} not found in namespace {namespace}")
    return ",".join(versions), missing


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@kopf.on.resume(m.GROUP, m.VERSION, m.PLURAL)
@kopf.on.create(m.GROUP, m.VERSION, m.PLURAL)
@kopf.on.update(m.GROUP, m.VERSION, m.PLURAL)
def region_changed(body: kopf.Body, logger: logging.Logger, **_: Any) -> None:
    reconcile(dict(body), logger)


@kopf.index(m.GROUP, m.VERSION, m.PLURAL)
def region_names(namespace: str, name: str, **_: Any) -> Dict[tuple, bool]:
    """Every TurnRegion the operator watches, for the drift timer."""
    return {(namespace, name): True}


@kopf.on.startup()
async def start_drift_timer(region_names: kopf.Index, memo: kopf.Memo, logger: logging.Logger,
                            **_: Any) -> None:
    """The drift timer.  Not a @kopf.timer: kopf puts a finalizer on every object with a timer,
    so a TurnRegion could not be deleted while the operator is down, nor at all once
    `helm uninstall` has removed the operator with its regions."""
    memo.drift_timer = asyncio.create_task(repair_drift(region_names, logger))


@kopf.on.cleanup()
async def stop_drift_timer(memo: kopf.Memo, **_: Any) -> None:
    memo.drift_timer.cancel()


async def repair_drift(region_names: kopf.Index, logger: logging.Logger) -> None:
    regions = client().resources.get(api_version=f"{m.GROUP}/{m.VERSION}", kind=m.KIND)
    while True:
        await asyncio.sleep(DRIFT_SECONDS)
        for namespace, name in list(region_names):
            try:
                body = (await asyncio.to_thread(regions.get, name=name, namespace=namespace)).to_dict()
                if not body["metadata"].get("deletionTimestamp"):
                    await asyncio.to_thread(reconcile, body, logger)
            except NotFoundError:
                continue  # deleted since the index saw it
            except Exception:  # noqa: BLE001 - one broken region must not stop the others' repair
                logger.exception(f"repairing {namespace}/{name} failed; retrying in {DRIFT_SECONDS} s")


def reconcile(region: Dict[str, Any], logger: logging.Logger) -> None:
    """Bring the children in line with the spec and write the status.  A spec the operator
    refuses, or one naming a missing Secret, leaves the children as they were (the relays of
    the last good spec keep serving, so the status and the directory keep their endpoints)
    and says why in the Degraded condition."""
    versions, problems = secret_versions(region["spec"], region["metadata"]["namespace"])
    problems = m.spec_problems(region["spec"]) + problems
    if problems:
        logger.warning("not reconciling: " + "; ".join(problems))
    else:
        # The relays mount the directory: it exists before their first pod does.
        update_directory(region["metadata"]["namespace"], region)
        wanted = m.children(region, pdb_api_version(), versions)
        for child in wanted:
            kopf.append_owner_reference(child, owner=region)
            ensure(child)
        prune(region, wanted, logger)
    write_status(region, problems)


# One status writer at a time per region: each reads the children afresh under the lock, so
# the last write is never one computed from older reads than a write it overtook.
_status_locks: Dict[tuple, threading.Lock] = collections.defaultdict(threading.Lock)


def write_status(region: Dict[str, Any], problems: List[str]) -> None:
    """The status from the children as stored now, the alternates of a hostNetwork region
    (its draining relays' redirect targets), and the namespace's directory."""
    namespace, name = region["metadata"]["namespace"], region["metadata"]["name"]
    regions = client().resources.get(api_version=f"{m.GROUP}/{m.VERSION}", kind=m.KIND)
    with _status_locks[(namespace, name)]:
        # Read again under the lock: a handler that waited here may hold a spec older than
        # the one the writer before it used (a `draining` just set or cleared).
        try:
            region = regions.get(name=name, namespace=namespace).to_dict()
        except NotFoundError:
            return  # deleted meanwhile; region_deleted takes it out of the directory
        if region["metadata"].get("deletionTimestamp"):
            return
        host_network = m.with_defaults(region["spec"])["exposure"]["hostNetwork"]
        deployments, services = owned(region, "apps/v1", "Deployment"), owned(region, "v1", "Service")
        addresses = relay_node_addresses(region) if host_network else []
        status = m.region_status(region, deployments[0].get("status") if deployments else None,
                                 [s.get("status") for s in services], problems, now(), addresses)
        # Written here rather than through kopf's patch: the drift timer runs outside any handler.
        regions.status.patch(
            body={"status": status}, name=name, namespace=namespace,
            content_type="application/merge-patch+json")
        if host_network and not problems:
            alternates = m.alternates_config_map(region, status["endpoints"])
            kopf.append_owner_reference(alternates, owner=region)
            ensure(alternates)
        # Still under the lock: a directory written from an older status never lands after
        # one written from a newer.
        update_directory(namespace, {**region, "status": status})


def relay_node_addresses(region: Mapping[str, Any]) -> List[str]:
    """The client-facing addresses (`m.node_address`) of the nodes running this region's
    ready relays."""
    pods = client().resources.get(api_version="v1", kind="Pod").get(
        namespace=region["metadata"]["namespace"],
        label_selector=",".join(f"{k}={v}" for k, v in m.selector(region).items())).to_dict()["items"]
    nodes = client().resources.get(api_version="v1", kind="Node")
    addresses = []
    for node_name in m.relay_nodes(pods):
        try:
            address = m.node_address(nodes.get(name=node_name).to_dict())
        except NotFoundError:
            continue  # the node went away; its pods will follow
        if address:
            addresses.append(address)
    return addresses


@kopf.on.event("apps/v1", "deployments", labels={"app.kubernetes.io/managed-by": "turnrelay-operator"})
@kopf.on.event("v1", "pods", labels={"app.kubernetes.io/managed-by": "turnrelay-operator"})
def relays_changed(namespace: str, labels: Mapping[str, str], type: Optional[str],
                   logger: logging.Logger, **_: Any) -> None:
    """A relay pod or a region's Deployment changed: the status follows at once (readiness,
    the nodes of ready hostNetwork relays) rather than at the next drift repair."""
    if type is None:  # the initial listing: the resume handler writes every status anyway
        return
    regions = client().resources.get(api_version=f"{m.GROUP}/{m.VERSION}", kind=m.KIND)
    try:
        region = regions.get(name=labels["app.kubernetes.io/instance"], namespace=namespace).to_dict()
    except NotFoundError:
        return  # the region is gone; the garbage collector takes its children
    if region["metadata"].get("deletionTimestamp"):
        return
    versions_missing = secret_versions(region["spec"], namespace)[1]
    write_status(region, m.spec_problems(region["spec"]) + versions_missing)


@kopf.on.delete(m.GROUP, m.VERSION, m.PLURAL, optional=True)
def region_deleted(body: kopf.Body, **_: Any) -> None:
    """Children go with their owner through the garbage collector; only the directory, which
    every region shares, needs this region taken out.  Optional: no finalizer, so a region is
    never stuck when the operator is down (the next reconcile rewrites the directory)."""
    update_directory(body["metadata"]["namespace"], None, gone=body["metadata"]["uid"])


def update_directory(namespace: str, fresh: Optional[Mapping[str, Any]], gone: str = "") -> None:
    """Rewrite ConfigMap turnrelay-regions from every live region of the namespace, `fresh`
    standing in for its stored self.  Each region is an owner, so the garbage collector
    deletes the directory with the last of them."""
    with _directory_locks[namespace]:
        _write_directory(namespace, fresh, gone)


# One directory writer at a time per namespace, so the relays' last nudge names the
# directory's last version (handlers run on kopf's thread pool).
_directory_locks: Dict[str, threading.Lock] = collections.defaultdict(threading.Lock)


def _write_directory(namespace: str, fresh: Optional[Mapping[str, Any]], gone: str) -> None:
    listed = client().resources.get(api_version=f"{m.GROUP}/{m.VERSION}", kind=m.KIND)
    regions = {}
    for item in listed.get(namespace=namespace).to_dict()["items"]:
        uid = item["metadata"]["uid"]
        if uid != gone and not item["metadata"].get("deletionTimestamp"):
            regions[uid] = item
    if fresh is not None:
        regions[fresh["metadata"]["uid"]] = fresh
    if not regions:
        return
    directory = m.directory(regions.values(), namespace)
    directory["metadata"]["ownerReferences"] = [
        {"apiVersion": f"{m.GROUP}/{m.VERSION}", "kind": m.KIND, "name": r["metadata"]["name"],
         "uid": uid} for uid, r in sorted(regions.items())]
    version = ensure(directory)["metadata"]["resourceVersion"]
    if _directory_versions.get(namespace) != version:
        _directory_versions[namespace] = version
        nudge_relays(namespace, version)


# The directory's resourceVersion each namespace's relays were last nudged with.
_directory_versions: Dict[str, str] = {}


def nudge_relays(namespace: str, version: str) -> None:
    """Bring a rewritten directory into the running relays now.  The kubelet updates a mounted
    ConfigMap only when it syncs the pod, which it does every minute or so (its syncFrequency)
    or when the pod changes: so the directory's resourceVersion goes on every relay pod as an
    annotation, and a region that stops serving leaves the other regions' answers within
    seconds, not a minute."""
    pods = client().resources.get(api_version="v1", kind="Pod")
    listed = pods.get(namespace=namespace, label_selector=f"{MANAGED_BY},app.kubernetes.io/component=relay")
    for pod in listed.to_dict()["items"]:
        meta = pod["metadata"]
        if meta.get("deletionTimestamp") or (meta.get("annotations") or {}).get(m.REGIONS_VERSION) == version:
            continue
        try:
            pods.patch(body={"metadata": {"annotations": {m.REGIONS_VERSION: version}}}, name=meta["name"],
                       namespace=namespace, content_type="application/merge-patch+json")
        except NotFoundError:
            continue  # gone meanwhile
