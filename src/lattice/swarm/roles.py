"""Node roles for public infrastructure: bootstrap nodes and relays get limits that suit them.

A bootstrap node is the first contact of every joining peer: it must accept many connections and
never spend effort on relay reservations of its own (it is reachable by definition), so it is
public. A relay (``--relay``) keeps the relay limits of NodeConfig and its reachability is detected
like any node's (``auto``): one behind a NAT must not announce itself or serve as a relay (it
assumes it is reachable until detection says otherwise; ``--reachability public`` skips the check).
"""

from __future__ import annotations

from lattice.config import NodeConfig

__all__ = ["BOOTSTRAP_MAX_CONNECTIONS", "apply"]

BOOTSTRAP_MAX_CONNECTIONS = 4096


def apply(config: NodeConfig) -> NodeConfig:
    """The config with the limits of its roles applied (unchanged for an ordinary node)."""
    changes: dict = {}
    if config.bootstrap_node:
        changes["max_connections"] = max(config.max_connections, BOOTSTRAP_MAX_CONNECTIONS)
    if config.bootstrap_node and config.reachability == "auto":
        changes["reachability"] = "public"
    return config.with_overrides(**changes) if changes else config
