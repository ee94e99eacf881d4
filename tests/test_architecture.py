"""The package's shape: the core imports without Flower, Ray or Avalanche, and the adapters import each other only
in the allowed directions (core <- fedcl.avalanche; core <- strategies <- fedcl.flower, where strategies may use
only fedcl.flower's message layer)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CORE_MODULES = ["synthetic", "data", "models", "augment", "distill", "train", "memory", "privacy", "audit", "screen",
                "continual_metrics", "runtime", "files", "verdict"]
BLOCKED = ("flwr", "ray", "avalanche")
#: What strategies/ may import from fedcl.flower: the message layer shared by clients and strategies.
STRATEGIES_MAY_USE = {"fedcl.flower.protocol", "fedcl.flower.records"}

_BLOCKER = """
import importlib.abc, sys
class _Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {blocked!r}:
            raise ImportError(f'{{name}} is blocked: the core must import without it')
        return None
sys.meta_path.insert(0, _Blocked())
"""


def _run_blocked(code: str) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh Python whose imports of flwr, ray and avalanche raise ImportError."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", _BLOCKER.format(blocked=BLOCKED) + code], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def _module_name(path: Path) -> str:
    """Dotted module name of a source file under ROOT (a package's __init__ is the package)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of every module `path` imports, anywhere in the file (relative imports resolved)."""
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _sources(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def _core_sources() -> list[Path]:
    files = []
    for name in CORE_MODULES:
        package = ROOT / "fedcl" / name
        files += sorted(package.rglob("*.py")) if package.is_dir() else [package.with_suffix(".py")]
    return files


def _offending(files: list[Path], forbidden) -> dict[str, list[str]]:
    """{module: [imports for which forbidden(name) is true]}, only for modules that have any."""
    found = {}
    for path in files:
        bad = sorted(name for name in _imports(path) if forbidden(name))
        if bad:
            found[_module_name(path)] = bad
    return found


def _under(name: str, *packages: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def test_every_core_module_imports_with_flower_ray_and_avalanche_blocked():
    modules = ", ".join(f"fedcl.{name}" for name in CORE_MODULES)
    done = _run_blocked(f"import sys, {modules}\n"
                        f"import fedcl.cli; fedcl.cli.build_parser()\n"
                        f"loaded = sorted(m for m in sys.modules if m.split('.')[0] in {BLOCKED!r})\n"
                        f"assert not loaded, loaded\n")
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_blocker_really_blocks():
    """Guards the test above: with the blocker on, importing an adapter fails."""
    done = _run_blocked("import flwr")
    assert done.returncode != 0 and "is blocked" in done.stderr


def test_the_core_imports_no_adapter():
    found = _offending(_core_sources(), lambda n: _under(n, "fedcl.avalanche", "fedcl.flower", "strategies", *BLOCKED))
    assert not found, found


def test_the_avalanche_adapter_imports_neither_flower_nor_strategies():
    found = _offending(_sources("fedcl/avalanche"), lambda n: _under(n, "fedcl.flower", "strategies", "flwr"))
    assert not found, found


def test_import_parsing_sees_relative_and_nested_imports(tmp_path, monkeypatch):
    """Guards the direction tests: a relative import and an import inside a function are both found."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "mod.py").write_text("from .sibling import x\ndef f():\n    import strategies.memory\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert {"pkg.sibling", "pkg.sibling.x", "strategies.memory"} <= _imports(package / "mod.py")


def test_strategies_use_only_the_message_layer_of_fedcl_flower():
    found = _offending(_sources("strategies"),
                       lambda n: _under(n, "fedcl.flower") and n not in {"fedcl.flower"} | STRATEGIES_MAY_USE
                       and not any(n.startswith(m + ".") for m in STRATEGIES_MAY_USE))
    assert not found, found


def _import_graph() -> dict[str, set[str]]:
    """{module: modules of fedcl and strategies it imports}, from every import in the file (lazy ones too)."""
    files = {_module_name(p): p for p in _sources("fedcl", "strategies")}
    graph = {}
    for name, path in files.items():
        targets = set()
        for imported in _imports(path):
            parts = imported.split(".")
            known = next((".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in files), None)
            if known and known != name:
                targets.add(known)
        graph[name] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_cycle_finder_finds_a_cycle():
    """Guards the test below."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_modules():
    cycles = _cycles(_import_graph())
    assert not cycles, cycles
