"""Modules meet through named interfaces: services and NAT traversal program against the Stream
protocol, never the muxer's class."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "lattice"
# what may know the muxer: the transport (it builds the streams)
MUXER_USERS = ("transport",)


def _imported(tree: ast.AST) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_only_the_transport_knows_the_muxer():
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        if rel.parts[0] in MUXER_USERS:
            continue
        names = _imported(ast.parse(path.read_text()))
        if any(n == "lattice.transport.yamux" or n.startswith("lattice.transport.yamux.") for n in names):
            bad.append(str(rel))
    assert bad == []
