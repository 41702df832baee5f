"""A real node for the control plane of k8s_cluster.py: Debian's containerd + runc with the CNI
bridge plugin, and the kubelet and kube-scheduler built by scripts/k8s-tools.sh, running the
images scripts/images.sh builds (imported into containerd's `k8s.io` namespace, so nothing is
ever pulled).

The node lives in a network namespace made for it: a veth pair joins it to the host, the host
end carrying the API server's address, the other end the node's (the kubelet refuses a loopback
node IP).  The namespace's default route (the relay picks its relay address from it) leads to
the host end and no further (the host does not forward), the cloud metadata address is dropped,
and the `kubernetes` Service's ClusterIP is DNATed to the API server (there is no kube-proxy).
hostNetwork pods (the relays) listen on the node's address, which the tests reach from the host.
The kubelet and the scheduler act as `admin`; the API server reaches the kubelet anonymously,
inside the namespace's private link.  Missing parts fail the tests: nothing here skips.
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

import pytest
import yaml

from support.k8s_cluster import CONTROLLERS, KUBE, Cluster, _alive, _start, binary, control_plane, wait_for
from support.servers import stop_process

ROOT = pathlib.Path(__file__).resolve().parents[2]

NODE_NAME = "node-1"
# A short name, as the images were tagged: containerd normalizes it to the same reference.
PAUSE_IMAGE = "turnrelay-pause:1"
# What a node's pods need besides CONTROLLERS: the node's not-ready taint lifted, Services'
# endpoints, the disruption budgets.
NODE_CONTROLLERS = CONTROLLERS + ",nodelifecycle,endpoint,endpointslice,disruption,podgc"
KUBERNETES_SERVICE_IP = "10.96.0.1"


def images() -> Dict[str, str]:
    """The image archives by name (pause, relay, operator), built or found in the cache by
    scripts/images.sh (scripts/test.sh has run it already, so this only hashes)."""
    result = subprocess.run(["bash", str(ROOT / "scripts" / "images.sh")], capture_output=True, text=True)
    if result.returncode:
        pytest.fail(f"scripts/images.sh failed:\n{result.stderr[-3000:]}")
    return dict(line.split("=", 1) for line in result.stdout.split())


def condition(obj: dict, kind: str) -> str:
    """The status ("True", "False", "Unknown"; "" when absent) of `obj`'s condition `kind`."""
    return next((c["status"] for c in obj.get("status", {}).get("conditions", []) if c["type"] == kind), "")


def rest_credentials(secret: str, user: str) -> Tuple[str, str]:
    """TURN REST API credentials for `user`, valid for an hour (the relay's rest-secret auth,
    coturn's -W)."""
    username = f"{int(time.time()) + 3600}:{user}"
    password = base64.b64encode(hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()).decode()
    return username, password


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


@dataclass
class Node:
    cluster: Cluster
    netns: str
    address: str  # the node's InternalIP, where hostNetwork pods listen
    host_address: str  # the host end of the node's link: the API server's, and the tests' peers'
    workdir: pathlib.Path
    socket: str
    processes: List[subprocess.Popen] = field(default_factory=list)
    timings: Dict[str, float] = field(default_factory=dict)

    def kubectl(self, *args: str, check: bool = True, timeout: float = 120,
                input: Optional[str] = None) -> subprocess.CompletedProcess:
        result = subprocess.run([binary(KUBE / "kubectl"), "--kubeconfig", self.cluster.admin_kubeconfig, *args],
                                capture_output=True, text=True, timeout=timeout, input=input)
        if check and result.returncode:
            raise AssertionError(f"kubectl {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
        return result

    def get(self, *args: str) -> dict:
        """`kubectl get ARGS` as a dict."""
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def apply(self, *objects: dict) -> None:
        self.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(objects))

    def ctr(self, *args: str) -> str:
        return subprocess.run(["ctr", "--address", self.socket, "--namespace", "k8s.io", *args],
                              check=True, capture_output=True, text=True).stdout

    def in_netns(self, *args: str) -> List[str]:
        """A command line that runs `args` in the node's network namespace (and nothing else of
        it: `ip netns exec` would remount /sys and hide the cgroups)."""
        return ["nsenter", f"--net=/run/netns/{self.netns}", *args]

    def container_pid(self, pod: str, namespace: str, container: str) -> int:
        """The host PID of a running container's first process, from containerd."""
        status = json.loads(self.kubectl("get", "pod", pod, "-n", namespace, "-o", "json").stdout)["status"]
        ids = [c["containerID"] for c in status.get("containerStatuses", [])
               if c["name"] == container and c.get("containerID")]
        assert ids, f"{container} of {namespace}/{pod} has no container yet: {status}"
        task = ids[0].split("://", 1)[1]
        for line in self.ctr("tasks", "ls").splitlines()[1:]:
            fields = line.split()
            if fields[0] == task and fields[2] == "RUNNING":
                return int(fields[1])
        raise AssertionError(f"no running task {task} in containerd")


def _netns(name: str, host: str, node: str, host_if: str, node_if: str) -> None:
    _run("ip", "netns", "add", name)
    _run("ip", "link", "add", host_if, "type", "veth", "peer", "name", node_if)
    _run("ip", "link", "set", node_if, "netns", name)
    _run("ip", "addr", "add", f"{host}/24", "dev", host_if)
    _run("ip", "link", "set", host_if, "up")
    ns = ["ip", "-n", name]
    _run(*ns, "link", "set", "lo", "up")
    _run(*ns, "addr", "add", f"{node}/24", "dev", node_if)
    _run(*ns, "link", "set", node_if, "up")
    _run(*ns, "route", "add", "default", "via", host)


def _iptables(name: str, *rule: str) -> None:
    _run("ip", "netns", "exec", name, "iptables", "-w", *rule)


def _free_subnet() -> int:
    """A 10.213.X.0/24 no route of the host uses yet (two runs may share the machine)."""
    used = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True, check=True).stdout
    for _ in range(100):
        x = random.randrange(1, 255)
        if f"10.213.{x}." not in used:
            return x
    raise AssertionError("no free 10.213.X.0/24 for the node's link")


def _containerd_config(work: pathlib.Path) -> pathlib.Path:
    (work / "cni").mkdir()
    (work / "cni" / "10-bridge.conflist").write_text(json.dumps({
        "cniVersion": "0.4.0", "name": "turnrelay-test",
        "plugins": [{"type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": True,
                     "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.214.0.0/24"}]],
                              "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(work / "ipam")}}]}))
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    config = work / "containerd.toml"
    # No CAP_SYS_RESOURCE here: restrict_oom_score_adj; no AppArmor; cgroupfs, as the kubelet.
    config.write_text(f"""version = 2
root = "{work}/containerd/root"
state = "{work}/containerd/state"
[grpc]
  address = "{work}/containerd.sock"
[{cri}]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  disable_apparmor = true
  # Pods' network namespaces under the state folder (not /run/netns), gone with the node.
  netns_mounts_under_state_dir = true
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri}.containerd.runtimes.runc.options]
        SystemdCgroup = false
  [{cri}.cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{work}/cni"
""")
    return config


def _kubelet_config(work: pathlib.Path, address: str) -> pathlib.Path:
    config = work / "kubelet.yaml"
    config.write_text(yaml.safe_dump({
        "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
        "address": address, "port": 10250, "readOnlyPort": 0, "healthzPort": 0,
        "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
        "authorization": {"mode": "AlwaysAllow"},
        "cgroupDriver": "cgroupfs", "cgroupsPerQOS": False, "enforceNodeAllocatable": [],
        "failSwapOn": False, "resolvConf": "/etc/resolv.conf",
        # A shared machine's disk and memory are not this node's to guard: never evict.
        "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
        "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
        "nodeStatusUpdateFrequency": "2s", "syncFrequency": "5s"}))
    return config


def _clean(work: pathlib.Path, socket: str) -> None:
    """What the node leaves behind when stopped: containers' shims (their command line names the
    node's own containerd socket, so only this node's are ended) and mounts under its folder."""
    for proc in pathlib.Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if socket.encode() in (proc / "cmdline").read_bytes():
                os.kill(int(proc.name), signal.SIGKILL)
    mounts = [line.split()[1] for line in pathlib.Path("/proc/mounts").read_text().splitlines()]
    for mount in sorted((m for m in mounts if m.startswith(str(work))), key=len, reverse=True):
        subprocess.run(["umount", "-l", mount], capture_output=True)


@contextlib.contextmanager
def node() -> Iterator[Node]:
    """A control plane with one Ready node, the images imported.  Timings (seconds) in
    Node.timings: `images` (hashing, building what changed), `control_plane`, `node_ready`."""
    start = time.monotonic()
    archives = images()
    timings = {"images": time.monotonic() - start}
    for tool in ("containerd", "ctr", "runc", "nsenter", "iptables"):
        shutil.which(tool) or pytest.fail(f"{tool} missing: run `bash scripts/k8s-tools.sh`")
    kubelet_bin, scheduler_bin = binary(KUBE / "kubelet"), binary(KUBE / "kube-scheduler")
    suffix = f"{os.getpid() % 100000}"
    netns, host_if, node_if = f"turnrelay-{suffix}", f"trh{suffix}", f"trn{suffix}"
    x = _free_subnet()
    host, address = f"10.213.{x}.1", f"10.213.{x}.2"
    work = pathlib.Path(tempfile.mkdtemp(prefix="turnrelay-node-", dir="/var/tmp"))
    socket = f"{work}/containerd.sock"
    _netns(netns, host, address, host_if, node_if)
    processes: List[subprocess.Popen] = []
    try:
        _iptables(netns, "-A", "OUTPUT", "-d", "169.254.169.254", "-j", "DROP")
        start = time.monotonic()
        with control_plane(address=host, controllers=NODE_CONTROLLERS) as cluster:
            timings["control_plane"] = time.monotonic() - start
            start = time.monotonic()
            api_port = cluster.server.rsplit(":", 1)[1]
            # The stand-in for kube-proxy: the one Service pods call, the API server's.
            for chain in ("OUTPUT", "PREROUTING"):
                _iptables(netns, "-t", "nat", "-A", chain, "-d", KUBERNETES_SERVICE_IP, "-p", "tcp",
                          "--dport", "443", "-j", "DNAT", "--to-destination", f"{host}:{api_port}")
            ns = ["nsenter", f"--net=/run/netns/{netns}"]
            processes.append(_start([*ns, "containerd", "--config", str(_containerd_config(work))],
                                    work / "containerd.log"))
            node_ = Node(cluster, netns, address, host, work, socket, processes, timings)
            wait_for(lambda: _alive(processes[0], work / "containerd.log") or node_.ctr("version"),
                     timeout=60, what="containerd")
            for name, archive in archives.items():
                node_.ctr("images", "import", archive)
            processes.append(_start([
                scheduler_bin, "--kubeconfig", cluster.admin_kubeconfig, "--leader-elect=false",
                "--port", "0", "--secure-port", "0"], work / "kube-scheduler.log"))
            processes.append(_start([
                *ns, "env", "AWS_EC2_METADATA_DISABLED=true", kubelet_bin,
                "--kubeconfig", cluster.admin_kubeconfig, "--config", str(_kubelet_config(work, address)),
                "--container-runtime=remote", f"--container-runtime-endpoint=unix://{socket}",
                "--node-ip", address, "--hostname-override", NODE_NAME, "--root-dir", str(work / "kubelet"),
                "--pod-infra-container-image", PAUSE_IMAGE], work / "kubelet.log"))

            def ready():
                for process, log in zip(processes, ("containerd", "kube-scheduler", "kubelet")):
                    _alive(process, work / f"{log}.log")
                found = json.loads(node_.kubectl("get", "node", NODE_NAME, "-o", "json").stdout)
                # Ready, and schedulable: the node lifecycle controller has lifted its taints.
                return not found["spec"].get("taints") and any(
                    c["type"] == "Ready" and c["status"] == "True" for c in found["status"]["conditions"])
            wait_for(ready, timeout=120, what=f"node {NODE_NAME} Ready")
            timings["node_ready"] = time.monotonic() - start
            yield node_
            for process in reversed(processes[1:]):
                stop_process(process)
            for task in node_.ctr("tasks", "ls", "-q").split():
                subprocess.run(["ctr", "--address", socket, "-n", "k8s.io", "tasks", "kill", "-s", "SIGKILL",
                                task], capture_output=True)
    finally:
        for process in reversed(processes):
            stop_process(process)
        _clean(work, socket)
        subprocess.run(["ip", "netns", "delete", netns], capture_output=True)
        subprocess.run(["ip", "link", "delete", host_if], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
