"""Keeps a node in its own swarm: peers of another swarm stay out of the DHT routing table, and a
node whose bootstrap peers all belong to another swarm stops with a one-line error naming both.
"""

from __future__ import annotations

import logging
from typing import Any

from lattice.identity import PeerId
from lattice.swarm.profiles import SwarmProfile, swarm_of
from lattice.transport.peerstore import PeerInfo

__all__ = ["SwarmGuard"]

log = logging.getLogger(__name__)


class SwarmGuard:
    def __init__(self, node: Any, profile: SwarmProfile) -> None:
        self.node = node
        self.profile = profile
        self.foreign: dict[PeerId, str] = {}  # peers identified as members of another swarm
        self.incompatible: dict[PeerId, str] = {}  # bootstrap peers of our swarm without our DHT id
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
            self._check_compatible(info)
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
        self._check_bootstrap_left(boot)

    def _check_compatible(self, info: PeerInfo) -> None:
        """A bootstrap peer of our swarm that does not speak our DHT protocol id runs an
        incompatible version (the profile bumped its kad id): say so, with both ids."""
        dht = self.node.services.get("dht")
        if dht is None or swarm_of(info.protocol_version) is None:
            return  # another implementation: whether it serves our DHT is its business
        if dht.protocol_id in info.protocols or info.peer_id not in self._bootstrap_peers():
            return
        theirs = [p for p in info.protocols if "/kad/" in p][:3]
        self.incompatible[info.peer_id] = ", ".join(theirs) or "no DHT"
        log.error("bootstrap peer %s does not speak %s (it speaks %s)", info.peer_id, dht.protocol_id,
                  self.incompatible[info.peer_id])  # fmt: skip
        self._check_bootstrap_left(self._bootstrap_peers())

    def _check_bootstrap_left(self, boot: set[PeerId]) -> None:
        """Stop the node (one clear error) once every bootstrap peer proved unusable."""
        connmgr = self.node.connmgr
        if not boot or connmgr is None or len(boot) < len(connmgr.bootstrap) or self.node.fatal_error:
            return
        if not all(p in self.foreign or p in self.incompatible for p in boot):
            return
        ours = self.profile.swarm_id
        foreign = sorted({self.foreign[p] for p in boot if p in self.foreign})
        if foreign:
            swarms = ", ".join(foreign)
            message = (
                f"this node joins swarm {ours!r} but its bootstrap peers are in swarm {swarms!r}: "
                f"use --join {foreign[0]} or bootstrap addresses of {ours!r}"
            )
        else:
            dht = self.node.services.get("dht")
            theirs = sorted({self.incompatible[p] for p in boot})
            message = (
                f"the bootstrap peers of swarm {ours!r} speak DHT protocol {', '.join(theirs)}, this node "
                f"speaks {dht.protocol_id}: incompatible versions (upgrade, or use their profile)"
            )
        self.node.fatal_error = message
        self.node.request_shutdown()
