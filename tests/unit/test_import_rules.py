"""Imports run one way (docs/architecture.md): the rules in one place, checked by parsing every
module's imports (top-level and inside functions alike).

KNOWN_CROSSINGS lists imports that break a rule and are tolerated for now (none today). The
test fails on any crossing not listed, and on a listed one that is gone (the list only shrinks).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# package -> the project's packages it may import (besides itself)
ALLOWED: dict[str, frozenset[str]] = {
    "proto": frozenset(),
    "contracts": frozenset(),
    "telemetry": frozenset({"contracts"}),
    "prefix_cache": frozenset({"contracts"}),
    "engine": frozenset({"contracts"}),
    "kvtransfer": frozenset({"contracts", "engine"}),
    "worker": frozenset({"contracts", "telemetry", "prefix_cache", "engine", "kvtransfer"}),
    "decode_worker": frozenset(
        {"contracts", "telemetry", "prefix_cache", "engine", "kvtransfer", "worker"}
    ),
    "prefill_worker": frozenset(
        {"contracts", "telemetry", "prefix_cache", "engine", "kvtransfer", "worker"}
    ),
    "router": frozenset({"proto", "contracts", "telemetry", "prefix_cache"}),
    "cluster": frozenset(
        {
            "proto",
            "contracts",
            "telemetry",
            "prefix_cache",
            "engine",
            "kvtransfer",
            "router",
            "decode_worker",
            "prefill_worker",
            "bench",
            "planner",
        }
    ),
    "bench": frozenset(
        {
            "proto",
            "contracts",
            "telemetry",
            "prefix_cache",
            "engine",
            "kvtransfer",
            "cluster",
            "router",
        }
    ),
}

# the planner drives the engine's scheduler and the router's placement in simulation, measures
# the engine, its real loop (worker.engine_loop) and a kvtransfer channel, and judges by the
# benchmark's own metrics
ALLOWED["planner"] = frozenset({"contracts", "engine", "kvtransfer", "router", "bench", "worker"})

# (module file, imported module) pairs that break a rule today
KNOWN_CROSSINGS: frozenset[tuple[str, str]] = frozenset()


def imports_of(path: Path) -> set[str]:
    """Absolute module names `path` imports anywhere in its body."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def crossings() -> set[tuple[str, str]]:
    found = set()
    for package, allowed in ALLOWED.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                continue
            for module in imports_of(path):
                top = module.split(".")[0]
                if top in ALLOWED and top != package and top not in allowed:
                    found.add((path.relative_to(ROOT).as_posix(), module))
    return found


def test_every_package_has_a_rule() -> None:
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    assert packages == set(ALLOWED), "add the new package's import rule to ALLOWED"


def test_no_import_crosses_a_rule() -> None:
    new = crossings() - KNOWN_CROSSINGS
    assert not new, f"imports against the rules in docs/architecture.md: {sorted(new)}"


def test_known_crossings_only_shrink() -> None:
    gone = KNOWN_CROSSINGS - crossings()
    assert not gone, f"no longer crossing, take them off KNOWN_CROSSINGS: {sorted(gone)}"


def test_tandem_bench_speaks_only_the_api() -> None:
    """`tandem bench` (bench/serving, and bench/common.py it shares) is a gRPC client: it
    imports the API and the vocabulary, never the engine, the workers or the router."""
    allowed = ("proto", "contracts", "bench.serving", "bench.common")
    paths = [*sorted((ROOT / "bench" / "serving").rglob("*.py")), ROOT / "bench" / "common.py"]
    found = {
        (path.relative_to(ROOT).as_posix(), module)
        for path in paths
        for module in imports_of(path)
        if module.split(".")[0] in ALLOWED
        and not any(module == a or module.startswith(a + ".") for a in allowed)
    }
    assert not found, f"tandem bench imports beyond the API: {sorted(found)}"


def _third_party(package: str) -> set[tuple[str, str]]:
    """(module file, imported top-level module) for every import of `package` that is
    neither the standard library nor a project package."""
    import sys

    found = set()
    for path in sorted((ROOT / package).rglob("*.py")):
        for module in imports_of(path):
            top = module.split(".")[0]
            if top not in ALLOWED and top not in sys.stdlib_module_names and top != "__future__":
                found.add((path.relative_to(ROOT).as_posix(), top))
    return found


def test_the_vocabulary_depends_on_nothing() -> None:
    assert not _third_party("contracts"), "contracts/ imports only the standard library"


def test_the_router_imports_neither_torch_nor_ray() -> None:
    heavy = {(f, m) for f, m in _third_party("router") if m in {"torch", "triton", "ray"}}
    assert not heavy, f"the router knows workers only as WorkerClients: {sorted(heavy)}"
