"""The import contract (docs/decisions.md "Layout"), read from the code's own imports.

registry imports no local package; fleet imports only registry; hub never imports agent and agent
never imports hub; the pure core imports no adapter; adapters never import the daemon or the command
line, the daemon never the command line; and no two modules import each other, directly or through
others (imports under ``if TYPE_CHECKING:`` are types only and do not count; lazy imports inside
functions do).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("agent", "registry", "fleet", "hub")
PURE = ("agent.access", "fleet.selection", "fleet.memory", "agent.errors", "fleet.hardware")
ADAPTERS = ("agent.engine", "agent.server", "agent.audit", "agent.sync", "agent.hardware.probe")


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.AST, modules: set[str]) -> set[str]:
    """Local modules imported by ``tree``; ``from pkg import mod`` counts as ``pkg.mod`` only."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} & modules
            found.update(submodules)
            if len(submodules) < len(node.names):  # names defined in the module (or its __init__)
                found.add(node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    modules = {_module(p): p for p in files}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = {t for t in _imports(ast.parse(path.read_text()), set(modules)) if t in modules}
        graph[name] = targets - {name}
    return graph


GRAPH = _graph()


def _under(module: str, prefixes: tuple[str, ...] | str) -> bool:
    prefixes = (prefixes,) if isinstance(prefixes, str) else prefixes
    return any(module == p or module.startswith(p + ".") for p in prefixes)


RULES = [
    pytest.param("registry", ("agent", "fleet", "hub"), id="registry-imports-no-local-package"),
    pytest.param("fleet", ("agent", "hub"), id="fleet-imports-only-registry"),
    pytest.param("hub", ("agent",), id="hub-never-imports-agent"),
    pytest.param("agent", ("hub",), id="agent-never-imports-hub"),
    pytest.param(
        PURE, (*ADAPTERS, "agent.daemon", "agent.cli", "agent.config", "agent.policy"), id="pure-core"
    ),
    pytest.param(ADAPTERS, ("agent.daemon", "agent.cli"), id="adapters-below-the-daemon"),
    pytest.param("agent.daemon", ("agent.cli",), id="daemon-below-the-command-line"),
]


@pytest.mark.parametrize(("importer", "forbidden"), RULES)
def test_dependency_direction(importer: str | tuple[str, ...], forbidden: tuple[str, ...]) -> None:
    bad = sorted(
        f"{m} -> {t}"
        for m, targets in GRAPH.items()
        if _under(m, importer)
        for t in targets
        if _under(t, forbidden)
    )
    assert bad == []


def test_no_import_cycle() -> None:
    """Tarjan's strongly connected components over the module graph: every one is a single module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(GRAPH.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            connect(v)
    assert cycles == []


def test_the_graph_is_read() -> None:
    assert "fleet.messages" in GRAPH["agent.sync.service"]
    assert len(GRAPH) > 80
