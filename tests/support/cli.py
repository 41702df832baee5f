"""The `turnrelay` console script, run as installed."""
import os
import subprocess
import sys

# The design's bound, in seconds, between a change reaching the account database (the script
# writes it) and every relay sharing that database acting on it.
BOUND = 5.0
TURNRELAY = os.path.join(os.path.dirname(sys.executable), "turnrelay")


def run_cli(*argv: str, status: int = 0, env_db: str = "") -> subprocess.CompletedProcess:
    """Run the script; check its exit status, and that a failure is one line, no traceback."""
    env = {name: value for name, value in os.environ.items() if name != "TURNRELAY_DB"}
    if env_db:
        env["TURNRELAY_DB"] = env_db
    done = subprocess.run([TURNRELAY, *argv], capture_output=True, text=True, env=env, timeout=60)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == status, (done.returncode, done.stdout, done.stderr)
    if status:
        assert len(done.stderr.splitlines()) == 1, done.stderr
    return done


def cli(*argv: str) -> str:
    """Run the script, which must succeed; its output."""
    return run_cli(*argv).stdout
