"""Lattice: peer-to-peer networking for decentralized AI.

The public API is re-exported here; submodules load on first use so that ``import lattice`` (and the
``lattice.Client`` of a training script) stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lattice._version import __version__

_EXPORTS = {
    "Node": "lattice.node",
    "BlockingNode": "lattice.blocking",
    "NodeConfig": "lattice.config",
    "Client": "lattice.control.client",
    "RemoteError": "lattice.errors",
    "KeyPair": "lattice.identity",
    "PeerId": "lattice.identity",
    "Multiaddr": "lattice.multiaddr",
    "LatticeError": "lattice.errors",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:
    from lattice.blocking import BlockingNode
    from lattice.config import NodeConfig
    from lattice.control.client import Client
    from lattice.errors import LatticeError, RemoteError
    from lattice.identity import KeyPair, PeerId
    from lattice.multiaddr import Multiaddr
    from lattice.node import Node


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lattice' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
