"""Mesh inference: serve a model too big for one peer by splitting its blocks into stages.

Stage servers hold a contiguous range of blocks and announce it in the DHT; a client session finds
a chain of stages covering every block, streams hidden states through the tensor RPC, keeps KV
caches on the servers and replays its inputs to a replacement when a stage dies. Torch is needed
here (``pip install "lattice-p2p[mesh]"``) and only here. See docs/mesh-inference.md.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> module: loaded on first use, so `lattice-node` (whose CLI registers this app's commands)
# does not import torch unless a mesh command runs
_EXPORTS = {
    "InferenceSession": "client", "MeshClient": "client",
    "CacheFull": "errors", "MeshError": "errors", "NoChainError": "errors", "ServerBusy": "errors",
    "RequestTooLarge": "errors", "SessionError": "errors",
    "KVCache": "model", "LlamaConfig": "config", "Stage": "model", "greedy_generate": "model",
    "tiny_config": "config",
    "ServerInfo": "routing", "choose_blocks": "routing", "find_chain": "routing", "plan_split": "routing",
    "ServerLimits": "server", "StageServer": "server",
    "ModelSource": "weights", "open_model": "weights",
}  # fmt: skip


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(name)
    return getattr(importlib.import_module(f"lattice.apps.mesh_inference.{module}"), name)


__all__ = [
    "CacheFull",
    "InferenceSession",
    "KVCache",
    "LlamaConfig",
    "MeshClient",
    "MeshError",
    "ModelSource",
    "NoChainError",
    "RequestTooLarge",
    "ServerBusy",
    "ServerInfo",
    "ServerLimits",
    "SessionError",
    "Stage",
    "StageServer",
    "choose_blocks",
    "find_chain",
    "greedy_generate",
    "open_model",
    "plan_split",
    "tiny_config",
]
