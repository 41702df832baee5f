"""The package's layers: imports flow down only, no module imports itself back, and the
sans-IO protocol and core load no Twisted (see each subpackage's docstring)."""
import ast
import pathlib
import subprocess
import sys

import pytest

RELAY = pathlib.Path(__file__).resolve().parents[2] / "relay"
# Lower layers never import higher ones; packages of the same rank never import each other.
RANKS = {"util": 0, "proto": 1, "core": 2, "storage": 3, "auth": 4, "ledger": 4, "net": 5,
         "web": 6, "service": 7, "cli": 8}
# Kept at their documented paths for third-party plugins: they re-export from their layer.
COMPATIBILITY = {"relay.usage", "relay.credentials"}


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(RELAY.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict:
    """Each relay module and the relay modules it imports, TYPE_CHECKING blocks and function
    bodies included: a layer may not lean on a higher one even lazily."""
    found = {}
    modules = {module_name(p) for p in RELAY.rglob("*.py")}
    for path in RELAY.rglob("*.py"):
        name, targets = module_name(path), set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets.update(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules
                               else node.module for a in node.names)
        found[name] = {t for t in targets if t in modules and t != name}
    return found


def layer(module: str):
    parts = module.split(".")
    return RANKS.get(parts[1]) if len(parts) > 1 else None


def test_every_subpackage_has_a_rank_and_a_docstring():
    packages = {p.parent.name for p in RELAY.glob("*/__init__.py")}
    assert packages == set(RANKS)
    for package in packages:
        assert ast.get_docstring(ast.parse((RELAY / package / "__init__.py").read_text()))


def test_imports_flow_down_only():
    wrong = []
    for module, targets in imports().items():
        if module in COMPATIBILITY:
            continue
        for target in targets:
            mine, theirs = layer(module), layer(target)
            if theirs is None or mine is None:
                continue
            same_package = module.split(".")[1] == target.split(".")[1]
            if theirs > mine or (theirs == mine and not same_package):
                wrong.append(f"{module} -> {target}")
    assert wrong == []


def test_no_import_cycles():
    graph = imports()
    cycles = []

    def visit(module, path):
        for target in sorted(graph.get(module, ())):
            if target in path:
                cycles.append(path[path.index(target):] + [target])
            elif target not in done:
                visit(target, path + [target])
        done.add(module)

    done: set = set()
    for module in sorted(graph):
        if module not in done:
            visit(module, [module])
    assert cycles == []


@pytest.mark.parametrize("package", ["relay.proto", "relay.core"])
def test_sans_io_layers_load_no_twisted(package):
    modules = sorted(m for m in imports() if m == package or m.startswith(package + "."))
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules) +
            "print(sorted({n.split('.')[0] for n in sys.modules} & {'twisted', 'zope', 'OpenSSL'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
