"""The house's one-way dependencies, read from the source with `ast` (every import counts,
also those inside functions or under ``if TYPE_CHECKING``):

- `data` and `models` never import `rl`;
- the core `jaxsql` imports `rl` only inside `jaxsql/cli`;
- the modules of `rl` import each other without cycles.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _imports(path: Path) -> set[str]:
    """Absolute module names `path` imports (``from rl import algo`` gives rl and rl.algo)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports_rl(path: Path) -> list[str]:
    return sorted(n for n in _imports(path) if n == "rl" or n.startswith("rl."))


def test_data_and_models_never_import_rl():
    bad = {str(p.relative_to(ROOT)): _imports_rl(p) for pkg in ("data", "models") for p in _sources(pkg)}
    assert {k: v for k, v in bad.items() if v} == {}


def test_core_imports_rl_only_from_the_cli():
    bad = {str(p.relative_to(ROOT)): _imports_rl(p) for p in _sources("jaxsql")
           if "cli" not in p.relative_to(ROOT / "jaxsql").parts}
    assert {k: v for k, v in bad.items() if v} == {}
    # the check itself sees the CLI's imports of rl (it can fail)
    assert any(_imports_rl(p) for p in _sources("jaxsql/cli"))


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary cycle's node list, found by depth-first search (small graphs)."""
    found: list[list[str]] = []
    for start in sorted(graph):
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in sorted(graph.get(node, ())):
                if nxt == start:
                    found.append(path)
                elif nxt not in path and nxt > start:  # each cycle once, from its smallest module
                    stack.append((nxt, path + [nxt]))
    return found


def test_rl_has_no_import_cycles():
    modules = {_module(p): p for p in _sources("rl")}
    graph = {}
    for name, path in modules.items():
        deps = {n for n in _imports(path) if n in modules and n != name and n != "rl"}
        graph[name] = deps
    assert "rl.bench_trl" in graph and "rl.demo_report" in graph
    assert _cycles(graph) == []
    # the cycle finder finds a cycle when there is one
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c"]]
