# Sourced by scripts/test.sh, k8s-tools.sh and serve.sh: `apt_install PACKAGE...` installs the
# Debian packages named (none named: nothing, not even `apt-get update`), through sudo unless
# root; $SUDO is left for the caller's other privileged steps.
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
# The Python that .venv is made with: Debian's python3, which a fresh Debian 12 has and the
# container runs (built with profile-guided and link-time optimisation: 1.2x the Allocate
# cycles of a plain build), also where another python3 comes first in PATH (a pyenv build).
PYTHON3=/usr/bin/python3
[ -x "$PYTHON3" ] || PYTHON3=python3

apt_install() {
    [ "$#" -gt 0 ] || return 0
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$@"
}
