"""The house's layout (README "Layout", DESIGN.md): flowgen's import graph has no circles, no import runs
back up the layers, nothing below ``flowgen.cli`` imports it, the tool packages (benchmark, playground) are
imported only by their commands, and no dataset name is tested outside the dataset registry."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "flowgen"

# low to high: a module may import its own package and the packages of lower layers, never a higher one
LAYERS = [
    ["flowgen.errors", "flowgen.checks"],
    ["flowgen.likelihood", "flowgen.transforms", "flowgen.data", "flowgen.checkpoints"],
    ["flowgen.flows"],
    ["flowgen.dequantization"],
    ["flowgen.models"],
    ["flowgen.evaluation", "flowgen.sampling", "flowgen.latents", "flowgen.attributes", "flowgen.ood",
     "flowgen.sample_quality", "flowgen.performance"],
    ["flowgen.training"],
    ["flowgen.config"],
    ["flowgen.build"],
    ["flowgen.benchmark", "flowgen.playground"],
    ["flowgen.cli"],
]
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}
TOOLS = ("flowgen.benchmark", "flowgen.playground")


def module_name(path: Path) -> str:
    parts = ["flowgen", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit(module: str) -> str:
    """The layer unit of a module: its package under flowgen (flowgen.data.registry -> flowgen.data)."""
    return ".".join(module.split(".")[:2])


def imports() -> dict[str, set[str]]:
    """Every flowgen module -> the flowgen modules it imports, at the top or inside a function."""
    graph = {}
    for path in sorted(ROOT.rglob("*.py")):
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("flowgen"):
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("flowgen"))
        graph[module_name(path)] = found
    return graph


GRAPH = imports()


def test_every_package_has_a_layer():
    assert {unit(m) for m in GRAPH} - {"flowgen"} <= set(RANK), "a new package needs its place in LAYERS"


def test_no_import_runs_back_up_the_layers():
    upward = sorted(f"{m} imports {t}" for m, targets in GRAPH.items() for t in targets
                    if unit(m) in RANK and unit(t) in RANK and unit(t) != unit(m) and RANK[unit(t)] > RANK[unit(m)])
    assert not upward, upward


def test_nothing_below_cli_imports_cli_and_only_commands_import_the_tools():
    assert not [m for m, t in GRAPH.items() if unit(m) != "flowgen.cli" and any(unit(x) == "flowgen.cli" for x in t)]
    for tool in TOOLS:
        users = sorted(m for m, t in GRAPH.items() if unit(m) not in (tool, "flowgen.cli")
                       and any(unit(x) == tool for x in t))
        assert not users, f"{tool} is imported by {users}"


def test_the_package_graph_has_no_circles():
    edges = {u: set() for u in map(unit, GRAPH)}
    for m, targets in GRAPH.items():
        edges[unit(m)].update(unit(t) for t in targets if unit(t) != unit(m) and unit(t) in edges)

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(n == goal or (n not in seen and not seen.add(n) and reaches(n, goal, seen)) for n in edges[start])

    circles = sorted(u for u in edges if reaches(u, u, set()))
    assert not circles, circles


@pytest.mark.parametrize("name", ["digits", "cifar10", "mnist", "fashion_mnist", "svhn", "celeba", "folder",
                                  "imagenet32", "imagenet64"])
def test_no_dataset_name_is_tested_outside_the_registry(name):
    """A dataset's facts are its record in flowgen/data/registry.py: no `== "digits"` or `in ("cifar10", ...)`
    or `.startswith("imagenet")` anywhere else in the package."""
    tests = []
    for path in ROOT.rglob("*.py"):
        if path == ROOT / "data" / "registry.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
                strings = [c.value for o in operands for c in ast.walk(o) if isinstance(c, ast.Constant)]
                if name in strings:
                    tests.append(f"{path.relative_to(ROOT)}:{node.lineno}")
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") in ("startswith", "removeprefix"):
                if any(isinstance(a, ast.Constant) and isinstance(a.value, str) and name.startswith(a.value)
                       and len(a.value) >= 4 for a in node.args):
                    tests.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not tests, tests


def test_every_module_is_findable_from_its_tests():
    """grep for a module's dotted name or its path in tests/ finds its tests: a test imports it by name, or a
    test file's docstring says "Tests of: flowgen/<path>.py"."""
    texts = [p.read_text() for p in ROOT.parent.joinpath("tests").rglob("*.py")]
    lost = []
    for path in sorted(ROOT.rglob("*.py")):
        if path.name == "__init__.py":
            continue
        name, where = module_name(path), str(path.relative_to(ROOT.parent))
        named = re.compile(rf"(from|import) {re.escape(name)}\b")
        if not any(named.search(text) or where in text for text in texts):
            lost.append(where)
    assert not lost, f"no test names these modules (import them, or add them to a test's 'Tests of:' line): {lost}"
