"""The import graph of ``flicbridge`` has no cycle, counting every import: top-level,
inside functions and under ``if TYPE_CHECKING`` (a lazy import must never be what holds a
cycle apart). The wiring (``app``, ``server.wiring``, ``cli``) sits on top; the server's
route modules and the features see the core only through ``core.Core``."""

from __future__ import annotations

import ast
from pathlib import Path

import flicbridge

ROOT = Path(flicbridge.__file__).parent


def modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(("flicbridge", *parts)).removesuffix(".__init__")
        out[name] = path
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    edges: dict[str, set[str]] = {name: set() for name in mods}
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            edges[name] |= {t for t in targets if t in mods and t != name}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_cycle() -> None:
    edges = graph()
    assert len(edges) > 40  # every module was read
    assert cycles(edges) == []


def test_nothing_below_the_wiring_imports_it() -> None:
    edges = graph()
    wiring = {"flicbridge.app", "flicbridge.server.wiring", "flicbridge.cli", "flicbridge.demo"}
    below = [m for m in edges if m.startswith("flicbridge.server.") or m in {
        "flicbridge.subscriptions", "flicbridge.core", "flicbridge.store", "flicbridge.dispatcher",
        "flicbridge.intake", "flicbridge.telemetry", "flicbridge.tokens", "flicbridge.acks",
    }]  # fmt: skip
    offenders = {
        m: sorted(edges[m] & wiring) for m in below if m not in wiring and edges[m] & wiring
    }
    assert offenders == {}


def test_the_check_can_fail() -> None:
    """The cycle finder finds a planted cycle (so an empty answer means something)."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
