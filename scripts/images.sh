#!/usr/bin/env bash
# Build the images the real-node tests run, from Debian's packages and PyPI alone (no container
# registry is reachable here), with buildah:
#   base      mmdebstrap of Debian 12 with python3 and its venv module, the machine's extra CA
#             certificates inside (pip goes through them), tagged as the Dockerfiles' default
#             BASE_IMAGE so a plain `buildah bud` of them works offline too
#   pause     the pod sandbox (containerd's sandbox_image): docker/pause.c, static, alone
#   relay     docker/relay.Dockerfile     } `buildah bud --build-arg BASE_IMAGE=<base>`
#   operator  docker/operator.Dockerfile  }
# Each is cached outside the checkout (TURNRELAY_K8S_CACHE, default /var/cache/turnrelay-k8s) as
# a docker-archive named by the hash of what went into it, so a run rebuilds only what changed.
# Prints `NAME=ARCHIVE` lines for the images a node imports (tests/support/k8s_node.py reads them).
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/apt.sh
packages=()
command -v buildah >/dev/null || packages+=(buildah)
command -v mmdebstrap >/dev/null || packages+=(mmdebstrap)
command -v cc >/dev/null || packages+=(gcc)
[ -e /usr/lib/x86_64-linux-gnu/libc.a ] || ls /usr/lib/*/libc.a >/dev/null 2>&1 || packages+=(libc6-dev)
apt_install "${packages[@]}"

CACHE="${TURNRELAY_K8S_CACHE:-/var/cache/turnrelay-k8s}"
IMAGES="$CACHE/images"
$SUDO mkdir -p "$IMAGES"
$SUDO chown "$(id -u):$(id -g)" "$CACHE" "$IMAGES"
# A private image store: the machine's own (if any) is untouched.
BUILDAH=(buildah --root "$CACHE/buildah/storage" --runroot "$CACHE/buildah/run" --storage-driver overlay)
VERSION="$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' helm/turnrelay/Chart.yaml)"
DEFAULT_BASE="$(sed -n 's/^ARG BASE_IMAGE=//p' docker/relay.Dockerfile)"
# One build at a time per cache (two checkouts may share it).
exec 9>"$IMAGES/.lock"
flock 9

# The hash of the named files' paths and contents (and of any extra words), 16 hex digits.
content_hash() {
    { printf '%s\n' "$EXTRA"
      # Native modules built in the checkout are left out (.dockerignore): their sources count.
      find "$@" -type f ! -path '*/__pycache__/*' ! -name '*.pyc' ! -name '_dataplane.*' ! -name '_keyed_hmac.*' | LC_ALL=C sort | while read -r f; do
          printf '%s %s\n' "$f" "$(sha256sum <"$f" | cut -c1-64)"
      done
    } | sha256sum | cut -c1-16
}

seconds() { echo $(( $(date +%s) - $1 )); }

SOURCES=(/etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list /etc/apt/sources.list)
existing_sources() { local f; for f in "${SOURCES[@]}"; do [ -e "$f" ] && echo "$f"; done; return 0; }
CAS=(/usr/local/share/ca-certificates)
BASE_PACKAGES=python3,python3-venv,python-is-python3,ca-certificates
EXTRA="mmdebstrap bookworm minbase $BASE_PACKAGES"
mapfile -t mirrors < <(existing_sources)
[ -d "${CAS[0]}" ] || CAS=()
BASE_KEY="$(content_hash "${mirrors[@]}" "${CAS[@]}")"
BASE="localhost/turnrelay-base:$BASE_KEY"

build_base() {
    local work start ctr
    start=$(date +%s)
    work="$(mktemp -d "$IMAGES/base.XXXXXX")"
    trap 'rm -rf "$work"; trap - RETURN' RETURN
    # The machine's apt sources (its mirror, whatever it is), docs and locales left out.
    local hooks=()
    if [ "${#CAS[@]}" -gt 0 ]; then
        hooks+=(--customize-hook='mkdir -p "$1/usr/local/share/ca-certificates"'
                --customize-hook="sync-in ${CAS[0]} /usr/local/share/ca-certificates"
                --customize-hook='chroot "$1" update-ca-certificates >/dev/null')
    fi
    nice -n 19 mmdebstrap --quiet --variant=minbase --include="$BASE_PACKAGES" \
        --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
        "${hooks[@]}" bookworm "$work/rootfs.tar" "${mirrors[@]}"
    ctr="$("${BUILDAH[@]}" from scratch)"
    "${BUILDAH[@]}" add --quiet "$ctr" "$work/rootfs.tar" / >/dev/null
    "${BUILDAH[@]}" config --env LANG=C.UTF-8 --env PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
        --cmd python3 "$ctr"
    "${BUILDAH[@]}" commit --quiet --rm "$ctr" "$BASE" >/dev/null
    echo "images: base $BASE built in $(seconds "$start") s" >&2
}

"${BUILDAH[@]}" inspect --type image "$BASE" >/dev/null 2>&1 || build_base
"${BUILDAH[@]}" tag "$BASE" "$DEFAULT_BASE"

# archive NAME TAG KEY BUILD-FUNCTION: the cached docker-archive of image TAG, built if missing.
archive() {
    local name=$1 tag=$2 key=$3 build=$4 out start
    out="$IMAGES/$name-$key.tar"
    if [ ! -s "$out" ]; then
        start=$(date +%s)
        "$build" "$tag"
        rm -f "$out.tmp"
        "${BUILDAH[@]}" push --quiet "$tag" "docker-archive:$out.tmp:$tag"
        # The previous archive of this image, and the layers only it used, go.
        find "$IMAGES" -maxdepth 1 -name "$name-*.tar" ! -name "$name-$key.tar" -delete
        "${BUILDAH[@]}" rmi --prune >/dev/null 2>&1 || true
        mv "$out.tmp" "$out"
        echo "images: $name $tag built in $(seconds "$start") s, $(stat -c %s "$out") bytes as a docker-archive" >&2
    fi
    echo "$name=$out"
}

build_pause() {
    local work ctr
    work="$(mktemp -d "$IMAGES/pause.XXXXXX")"
    trap 'rm -rf "$work"; trap - RETURN' RETURN
    cc -Os -static -o "$work/pause" docker/pause.c
    ctr="$("${BUILDAH[@]}" from scratch)"
    "${BUILDAH[@]}" copy --quiet "$ctr" "$work/pause" /pause >/dev/null
    "${BUILDAH[@]}" config --entrypoint '["/pause"]' "$ctr"
    "${BUILDAH[@]}" commit --quiet --rm "$ctr" "$1" >/dev/null
}

build_dockerfile() {
    local dockerfile=$1 tag=$2
    nice -n 19 "${BUILDAH[@]}" bud --quiet --isolation chroot --pull=never --format docker \
        --build-arg "BASE_IMAGE=$BASE" -f "$dockerfile" -t "$tag" . >/dev/null
}
build_relay() { build_dockerfile docker/relay.Dockerfile "$1"; }
build_operator() { build_dockerfile docker/operator.Dockerfile "$1"; }

EXTRA=""
archive pause turnrelay-pause:1 "$(content_hash docker/pause.c)" build_pause
EXTRA="$BASE_KEY"
archive relay "turnrelay:$VERSION" \
    "$(content_hash .dockerignore docker/relay.Dockerfile pyproject.toml setup.cfg setup.py README.md relay twisted/plugins)" build_relay
archive operator "turnrelay-operator:$VERSION" \
    "$(content_hash .dockerignore docker/operator.Dockerfile setup.cfg operator/turnregion_operator.py operator/turnregion_manifests.py)" \
    build_operator
