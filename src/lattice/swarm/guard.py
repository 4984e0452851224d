"""Keeps a node in its own swarm: peers of another swarm stay out of the DHT routing table, and a
node whose bootstrap peers all belong to another swarm stops with a one-line error naming both.
"""

from __future__ import annotations

import logging
from typing import Any

from lattice.identity import PeerId
from lattice.swarm.profiles import SwarmProfile, swarm_of
from lattice.transport.host import PeerInfo

__all__ = ["SwarmGuard"]

log = logging.getLogger(__name__)


class SwarmGuard:
    def __init__(self, node: Any, profile: SwarmProfile) -> None:
        self.node = node
        self.profile = profile
        self.foreign: dict[PeerId, str] = {}  # peers identified as members of another swarm
        self.rejected = 0

    def admit(self, info: PeerInfo) -> bool:
        """May this peer enter our routing table? Not if its identify version names another swarm
        (peers of other implementations name none: the DHT protocol id decides for them)."""
        other = swarm_of(info.protocol_version)
        return other is None or other == self.profile.swarm_id

    def install(self) -> None:
        self.node.host.on_identify(self._on_identified)

    def _bootstrap_peers(self) -> set[PeerId]:
        connmgr = self.node.connmgr
        peers = {p for p in connmgr.bootstrap_peers.values() if p is not None} if connmgr else set()
        return peers

    def _on_identified(self, info: PeerInfo) -> None:
        if self.admit(info):
            return
        other = swarm_of(info.protocol_version) or "?"
        self.foreign[info.peer_id] = other
        self.rejected += 1
        dht = self.node.services.get("dht")
        if dht is not None and dht.table is not None and dht.table.get(info.peer_id) is not None:
            dht.table.remove(info.peer_id)
        boot = self._bootstrap_peers()
        if info.peer_id not in boot:
            log.info("peer %s is in swarm %r, not ours (%r): kept out of the DHT", info.peer_id, other,
                     self.profile.swarm_id)  # fmt: skip
            return
        log.error("bootstrap peer %s is in swarm %r, not %r", info.peer_id, other, self.profile.swarm_id)
        connmgr = self.node.connmgr
        if len(boot) == len(connmgr.bootstrap) and all(p in self.foreign for p in boot):
            swarms = ", ".join(sorted({self.foreign[p] for p in boot}))
            self.node.fatal_error = (
                f"this node joins swarm {self.profile.swarm_id!r} but its bootstrap peers are in swarm "
                f"{swarms!r}: use --join {swarms.split(', ')[0]} or bootstrap addresses of "
                f"{self.profile.swarm_id!r}"
            )
            self.node.request_shutdown()
