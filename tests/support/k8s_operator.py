"""The operator as the tests run it: `kopf run operator/turnregion_operator.py` as the chart's
ServiceAccount (so every call is checked against the chart's RBAC), watching one namespace."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys
from typing import Dict, List, Optional

from support.servers import stop_process

OPERATOR = pathlib.Path(__file__).resolve().parents[2] / "operator" / "turnregion_operator.py"
KOPF = os.path.join(os.path.dirname(sys.executable), "kopf")
# As the operator's image runs: a uid with no passwd entry and no USER or LOGNAME in its
# environment (CAP_DAC_READ_SEARCH only lets it read this checkout and the test's Python, which
# sit under root-only directories).
NO_PASSWD_UID = 10001
AS_UID_WITHOUT_PASSWD = ["setpriv", f"--reuid={NO_PASSWD_UID}", f"--regid={NO_PASSWD_UID}",
                         "--clear-groups", "--inh-caps=+dac_read_search",
                         "--ambient-caps=+dac_read_search", "--",
                         "env", "-u", "USER", "-u", "LOGNAME", "-u", "LNAME", "-u", "USERNAME"]


class Operator:
    """`kopf run` watching `namespace`, repairing drift every `drift_seconds`; `prefix` runs it
    under another identity, `env` adds to its environment, `args` to kopf's."""

    def __init__(self, cluster, namespace: str, drift_seconds: float = 1, log_name: str = "operator.log"):
        self.cluster, self.namespace, self.drift_seconds = cluster, namespace, drift_seconds
        self.process: Optional[subprocess.Popen] = None
        self.log = cluster.workdir / log_name

    def start(self, prefix: List[str] = (), env: Optional[Dict[str, str]] = None,
              args: List[str] = ()) -> None:
        environment = {**os.environ, "KUBECONFIG": self.cluster.operator_kubeconfig,
                       "TURNRELAY_DRIFT_SECONDS": str(self.drift_seconds), **(env or {})}
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [*prefix, KOPF, "run", "--standalone", f"--namespace={self.namespace}", *args, str(OPERATOR)],
                stdout=out, stderr=subprocess.STDOUT, env=environment, cwd=self.cluster.workdir)

    def stop(self) -> None:
        if self.process:
            stop_process(self.process, timeout=30)

    def check(self) -> None:
        text = self.log.read_text()
        assert self.process is not None and self.process.poll() is None, f"operator exited:\n{text[-4000:]}"
        assert "Forbidden" not in text, f"the chart's RBAC denied the operator something:\n{text[-4000:]}"
