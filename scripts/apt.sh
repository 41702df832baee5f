# Sourced by scripts/test.sh, k8s-tools.sh and serve.sh: `apt_install PACKAGE...` installs the
# Debian packages named (none named: nothing, not even `apt-get update`), through sudo unless
# root; $SUDO is left for the caller's other privileged steps.
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"

apt_install() {
    [ "$#" -gt 0 ] || return 0
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$@"
}
