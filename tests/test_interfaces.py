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


# Private names one class reads of another class of the same module (one state machine split in two
# classes); None: any.
SAME_MODULE: dict[str, set[str] | None] = {
    "transport/yamux.py": None,  # YamuxSession and its YamuxStreams
    "transport/noise.py": {"_buf"},  # the handshake hands its read-ahead to the SecureStream it built
    "rpc/service.py": {"_sent_end", "_got_end", "_iterate"},  # RPC and its RPCStreams
    "blocking.py": None,  # the facades of one node share its loop runner
}


def private_accesses(path: Path) -> list[str]:
    """``x._name`` where ``x`` is not ``self``/``cls``: a reach into another object's internals."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Attribute) or not node.attr.startswith("_") or node.attr.startswith("__"):
            continue
        if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
            continue
        found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_reach_into_other_objects_private_names():
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        rel = str(path.relative_to(SRC))
        allowed = SAME_MODULE.get(rel, set())
        for access in private_accesses(path):
            if allowed is None or access.rpartition("._")[2] in {n.lstrip("_") for n in allowed}:
                continue
            bad.append(f"{rel}:{access}")
    assert bad == []
