"""The import graph of `fedcl.flower` and `strategies`, read from the source with `ast` (nothing is imported):
no module cycle, and the strategies import only downward (the protocol, the records and the core)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fedcl/flower", "strategies")
#: What a module of `strategies/` may import from fedcl.flower: the message protocol and the record codecs.
STRATEGY_MAY_IMPORT = {"fedcl.flower.protocol", "fedcl.flower.records"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, known: set[str]) -> set[str]:
    """The modules among `known` that `path` imports, at any depth of its code (imports inside functions count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        found |= {name for name in names if name in known}
    return found


def import_graph() -> dict[str, set[str]]:
    """{module: modules of fedcl.flower and strategies it imports}."""
    files = {_module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    return {name: _imports(path, set(files)) - {name} for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as a path that returns to its start, or None when there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_there_is_no_module_cycle_among_the_flower_adapter_and_the_strategies():
    graph = import_graph()
    assert {"fedcl.flower.server_app", "fedcl.flower.continual_server", "strategies.fed_distill"} <= set(graph)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_strategies_import_only_the_protocol_and_the_records_of_the_flower_adapter():
    for name, imported in import_graph().items():
        if name.startswith("strategies"):
            upward = {m for m in imported if m.startswith("fedcl.flower")} - STRATEGY_MAY_IMPORT
            assert not upward, f"{name} imports {sorted(upward)}"


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
