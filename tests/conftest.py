"""The suite's shared fixtures, from the support package, and its markers, from the folders.

tests/unit/ drives the sans-IO core, the codec, the configuration and the stores in-process;
tests/e2e/ starts real parts (`twistd turnrelay`, coturn's tools, aioice, Chromium,
PostgreSQL); tests/k8s/ checks the operator's manifests and runs it against a real control
plane.  Every test under e2e/ is marked `e2e`, every one under k8s/ `k8s`, and a unit test that
runs on a real PostgreSQL (`store_dsn`'s second run, `postgres_dsn`) is marked `e2e` too, so

    pytest -m "not e2e and not k8s"

runs the fast tests alone.  Helpers are imported from `support.*`, never from a test module.
"""
import pathlib

import pytest

pytest_plugins = ["support.servers", "support.db", "support.relay_clients"]

HERE = pathlib.Path(__file__).parent
FOLDER_MARKERS = {"e2e": pytest.mark.e2e, "k8s": pytest.mark.k8s}


def _uses_postgres(item: pytest.Item) -> bool:
    callspec = getattr(item, "callspec", None)
    return ("postgres_dsn" in getattr(item, "fixturenames", ())
            or (callspec is not None and callspec.params.get("store_dsn") == "postgresql"))


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        folder = pathlib.Path(item.fspath).relative_to(HERE).parts[0]
        if folder in FOLDER_MARKERS:
            item.add_marker(FOLDER_MARKERS[folder])
        elif _uses_postgres(item):
            item.add_marker(pytest.mark.e2e)
