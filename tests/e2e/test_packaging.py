"""The wheel carries the twistd plugin, and a real `pip install` makes `twistd turnrelay` work."""
import subprocess
import sys
import zipfile

import pytest

from support.servers import ROOT


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), ROOT],
                   check=True, timeout=300)
    (path,) = out.glob("turnrelay-*.whl")
    return path


def test_wheel_carries_the_plugin_and_nothing_else_under_twisted(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert [n for n in names if n.startswith("twisted/")] == ["twisted/plugins/turnrelay.py"]
    # Every subpackage (find_namespace: must not miss one), and the compatibility modules.
    for module in ("relay/service/tap.py", "relay/proto/stun.py", "relay/core/server.py",
                   "relay/net/listeners.py", "relay/auth/cred.py", "relay/storage/sqldb.py",
                   "relay/ledger/writer.py", "relay/web/http.py", "relay/cli/main.py",
                   "relay/util/timefmt.py", "relay/usage.py", "relay/credentials.py"):
        assert module in names
    assert not any("__pycache__" in n for n in names)
    assert "relay/web/test_page.html" in names  # package data: the API port's /test page
    assert "relay/web/ice.js" in names  # package data: the API port's /v1/ice.js
    # The native data plane, compiled by the build (cffi), its source beside it.
    assert any(n.startswith("relay/net/_dataplane.") and n.endswith(".so") for n in names)
    assert "relay/net/dataplane.c" in names and "relay/net/dataplane.h" in names
    assert not any(n.endswith("__init__.py") and n.startswith("twisted") for n in names)


def test_fresh_venv_install_lists_and_documents_the_plugin(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "-q", str(wheel)], check=True, timeout=600)
    twistd = str(venv / "bin" / "twistd")
    # Run from an empty directory: the source tree must not be what makes the plugin visible.
    listing = subprocess.run([twistd, "--help"], capture_output=True, text=True, cwd=tmp_path,
                             timeout=120, check=True).stdout
    assert "turnrelay" in listing
    usage = subprocess.run([twistd, "-n", "turnrelay", "--help"], capture_output=True, text=True,
                           cwd=tmp_path, timeout=120, check=True).stdout
    for option in ("--listening-ip", "--listening-port", "--tls-listening-port", "--relay-ip",
                   "--external-ip", "--min-port", "--max-port", "--realm", "--user", "--cert",
                   "--pkey", "--allow-loopback-peers", "--allowed-peer-ip", "--denied-peer-ip",
                   "--max-allocate-lifetime", "--user-quota", "--total-quota", "--config",
                   "--nonce-secret-file", "--tls-min-version", "--tls-max-version"):
        assert option in usage, option
    # The console script works from the wheel alone: no PostgreSQL driver needed for --help.
    tool = subprocess.run([str(venv / "bin" / "turnrelay"), "--help"], capture_output=True,
                          text=True, cwd=tmp_path, timeout=120, check=True).stdout
    assert "account" in tool and "token" in tool and "revoke" in tool and "probe" in tool
    # The native data plane came compiled with it.
    subprocess.run([python, "-c", "from relay.net import dataplane; assert dataplane.available()"],
                   cwd=tmp_path, timeout=120, check=True)
