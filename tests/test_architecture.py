"""The package's shape, checked: small modules, subpackages without import circles, one way to run a program.

Anyone can run it (no root, no network): it reads kiosk/ with ast, lazy imports inside functions included,
because a circle through a lazy import is still a circle in the design.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "kiosk"
MAX_LINES = 650
# The one module that may start processes itself (kiosk.core.run wraps subprocess for everyone else).
SUBPROCESS_CALLS = {"run", "Popen", "check_output", "check_call", "call"}


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imported(name: str, path: Path) -> set[str]:
    """Every kiosk module `name` imports, wherever the import statement is."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names if alias.name.startswith("kiosk")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.startswith("kiosk"):
                out.add(base)
                out |= {f"{base}.{alias.name}" for alias in node.names}
    return out


def subpackage(module: str) -> str | None:
    """kiosk.image.rootfs -> image; top-level modules (kiosk.cli) belong to no subpackage."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (PACKAGE / parts[1]).is_dir()) else None


def subpackage_graph() -> dict[str, dict[str, set[str]]]:
    """subpackage -> the subpackages it imports -> the modules whose imports say so."""
    known = modules()
    graph: dict[str, dict[str, set[str]]] = {}
    for name, path in known.items():
        here = subpackage(name)
        if here is None:
            continue
        graph.setdefault(here, {})
        for target in imported(name, path):
            there = subpackage(target)
            if there and there != here and (target in known or target.rpartition(".")[0] in known):
                graph[here].setdefault(there, set()).add(name)
    return graph


def find_cycle(graph: dict[str, dict[str, set[str]]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if state.get(nxt) is None and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if state.get(node) is None and (found := visit(node)):
            return found
    return None


def test_no_module_is_too_long():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by job): {long}"


def test_subpackages_import_each_other_without_a_circle():
    graph = subpackage_graph()
    assert {"core", "spec", "config", "image", "device", "builders"} <= set(graph)
    cycle = find_cycle(graph)
    if cycle:
        steps = [f"{a} -> {b} (in {', '.join(sorted(graph[a][b]))})" for a, b in zip(cycle, cycle[1:])]
        raise AssertionError("import circle between subpackages: " + "; ".join(steps))


# The layers, low to high (README's layout): a subpackage imports only from lower layers.
LAYERS = {"core": 0, "spec": 1, "config": 2, "builders": 3, "device": 4, "image": 5,
          "buildhost": 6, "net": 6, "flash": 6, "qemu": 6, "update": 7, "fleet": 8}


def test_subpackages_import_only_lower_layers():
    graph = subpackage_graph()
    assert set(graph) <= set(LAYERS), f"a new subpackage needs its place in LAYERS: {set(graph) - set(LAYERS)}"
    upward = [f"{a} -> {b} (in {', '.join(sorted(where))})" for a, targets in graph.items()
              for b, where in targets.items() if LAYERS[b] >= LAYERS[a]]
    assert not upward, "imports that go up or sideways: " + "; ".join(upward)


def test_core_imports_no_stage():
    graph = subpackage_graph()
    assert not graph["core"], f"kiosk.core must stand alone, it imports {graph['core']}"


def test_only_core_run_starts_processes():
    offenders = []
    for name, path in modules().items():
        if name == "kiosk.core.run":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in SUBPROCESS_CALLS and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "subprocess"):
                offenders.append(f"{name}:{node.lineno}")
    assert not offenders, f"use kiosk.core.run instead of subprocess: {offenders}"


def test_the_checker_sees_a_circle():
    """The cycle finder itself: a circle through three subpackages is found, a chain is not."""
    assert find_cycle({"a": {"b": {"m"}}, "b": {"c": {"n"}}, "c": {"a": {"o"}}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": {"m"}}, "b": {"c": {"n"}}, "c": {}}) is None
