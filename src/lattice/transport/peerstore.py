"""What a host knows about other peers: their addresses, protocols and agent (from identify and the
DHT)."""

from __future__ import annotations

from dataclasses import dataclass, field

from lattice.identity import PeerId, PublicKey
from lattice.multiaddr import Multiaddr

__all__ = ["PeerInfo"]


@dataclass
class PeerInfo:
    """What we know about a peer: addresses it listens on, protocols, agent."""

    peer_id: PeerId
    addrs: list[Multiaddr] = field(default_factory=list)
    protocols: list[str] = field(default_factory=list)
    agent_version: str = ""
    protocol_version: str = ""
    public_key: PublicKey | None = None
    last_seen: float = 0.0
