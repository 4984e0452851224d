"""The import graph of src/lattice: no circles, and no import from a lower layer to a higher one
(the layers of docs/architecture.md). Function-level (lazy) imports count too: a lazy import is
still a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "lattice"

# Lowest first; a module may import its own layer and the ones below. The first matching prefix wins.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("lattice._version", "lattice.errors", "lattice._proto", "lattice._files", "lattice._lazy",
              "lattice._allocator", "lattice.cpus", "lattice.identity", "lattice.multiaddr",
              "lattice.codec")),
    ("transport", ("lattice.transport",)),
    ("nat", ("lattice.nat",)),
    ("services", ("lattice.service", "lattice.rpc", "lattice.dht", "lattice.pubsub", "lattice.crdt",
                  "lattice.content")),
    ("node", ("lattice.node", "lattice.blocking", "lattice.config", "lattice.cli", "lattice.control",
              "lattice.observe", "lattice.swarm", "lattice.plugins", "lattice.testing")),
    ("apps", ("lattice.apps",)),
]  # fmt: skip
FACADE = "lattice"  # the package's __init__ re-exports the public API of every layer


def modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                full = f"{target}.{alias.name}"
                found.add(full if full in known else target)
    resolved = set()
    for target in found:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name and target.startswith("lattice"):
            resolved.add(target)
    return resolved


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def layer(name: str) -> int:
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return rank
    raise AssertionError(f"{name} belongs to no layer: add it to LAYERS and docs/architecture.md")


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_circles():
    assert cycles(graph()) == []


def test_no_import_from_a_lower_layer_to_a_higher_one():
    bad = []
    for name, targets in graph().items():
        if name == FACADE:
            continue
        for target in targets:
            if target != FACADE and layer(target) > layer(name):
                bad.append(f"{name} ({LAYERS[layer(name)][0]}) imports {target} ({LAYERS[layer(target)][0]})")
            if target == FACADE and layer(name) < len(LAYERS) - 1:  # apps use the public API
                bad.append(f"{name} imports the package facade `lattice` (import the module itself)")
    assert bad == []


def test_the_checker_sees_circles_and_upward_imports():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer("lattice.transport.host") < layer("lattice.dht.service") < layer("lattice.node")
