"""Gossip decentralized SGD: the algorithms in a simulator, over the network as `lattice-node
gossip-sgd peer`, and as a library for your own model and training loop (:class:`GossipOptimizer`).
Torch is needed (``pip install "lattice-p2p[apps]"``); importing this package does not load it until
a name below is used, so `lattice-node` lists the commands cheaply. See docs/gossip_sgd.md.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "GossipOptimizer": "optimizer", "GossipRun": "optimizer", "load_checkpoint": "optimizer",
    "save_checkpoint": "optimizer", "Hyper": "hyper", "ModuleModel": "models", "small_cnn": "models",
    "shard": "data", "shard_indices": "data", "Config": "experiment", "simulate": "experiment",
}  # fmt: skip


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(name)
    return getattr(importlib.import_module(f"lattice.apps.gossip_sgd.{module}"), name)


__all__ = sorted(_EXPORTS)
