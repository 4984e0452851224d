"""What a host knows about other peers: their addresses, protocols and agent (from identify and the
DHT).

Bounded, because strangers feed it: every DHT reply names up to 80 peers we may never talk to. The
store keeps ``max_peers`` peers, least recently used first out, and ``max_addrs`` addresses per
peer, newest first. Peers a keeper vouches for (the host keeps connected peers, the DHT the peers
of its routing table) are never dropped while they are kept.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from lattice.identity import PeerId, PublicKey
from lattice.multiaddr import Multiaddr

__all__ = ["PeerInfo", "PeerStore"]


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


def merge_addrs(new: Iterable[Multiaddr], old: Iterable[Multiaddr], limit: int) -> list[Multiaddr]:
    """``new`` first (newest kept), then the ``old`` ones not in it, at most ``limit``."""
    return list(dict.fromkeys([*new, *old]))[:limit]


class PeerStore:
    """Peer id -> :class:`PeerInfo`, bounded (see the module docstring). Reading an entry with
    :meth:`get` or :meth:`add` counts as a use."""

    def __init__(self, max_peers: int = 10_000, max_addrs: int = 16) -> None:
        self.max_peers = max_peers
        self.max_addrs = max_addrs
        self.evicted = 0
        self._peers: OrderedDict[PeerId, PeerInfo] = OrderedDict()
        self._keepers: list[Callable[[PeerId], bool]] = []
        self._removed: list[Callable[[PeerId], None]] = []

    def keep(self, keeper: Callable[[PeerId], bool]) -> None:
        """Never evict a peer while ``keeper(peer)`` is true (connected, in a routing table)."""
        self._keepers.append(keeper)

    def on_remove(self, callback: Callable[[PeerId], None]) -> None:
        """Call ``callback(peer)`` when a peer leaves the store (evicted or removed)."""
        self._removed.append(callback)

    def get(self, peer: PeerId | None) -> PeerInfo | None:
        if peer is None:
            return None
        info = self._peers.get(peer)
        if info is not None:
            self._peers.move_to_end(peer)
        return info

    def add(self, peer: PeerId) -> PeerInfo:
        """The entry of ``peer``, created if it is new (which may evict the least recently used)."""
        info = self.get(peer)
        if info is None:
            info = self._peers[peer] = PeerInfo(peer)
            self._evict()
        return info

    def add_addrs(self, peer: PeerId, addrs: Iterable[Multiaddr], replace: bool = False) -> PeerInfo:
        """Learn addresses of ``peer``: they go first and the oldest beyond ``max_addrs`` are dropped;
        ``replace``: they are all we know (the peer's own identify)."""
        info = self.add(peer)
        info.addrs = merge_addrs(addrs, () if replace else info.addrs, self.max_addrs)
        return info

    def remove(self, peer: PeerId) -> None:
        if self._peers.pop(peer, None) is not None:
            for callback in self._removed:
                callback(peer)

    def __contains__(self, peer: object) -> bool:
        return peer in self._peers

    def __len__(self) -> int:
        return len(self._peers)

    def items(self) -> Iterator[tuple[PeerId, PeerInfo]]:
        return iter(list(self._peers.items()))

    def _kept(self, peer: PeerId) -> bool:
        return any(keeper(peer) for keeper in self._keepers)

    def _evict(self) -> None:
        """Drop least recently used peers beyond ``max_peers``; kept ones move to the recent end
        (they are in use), so each is passed over once per round, not once per insertion."""
        budget = len(self._peers)
        while len(self._peers) > self.max_peers and budget > 0:
            budget -= 1
            peer = next(iter(self._peers))
            if self._kept(peer):
                self._peers.move_to_end(peer)
                continue
            self.evicted += 1
            self.remove(peer)

    def status(self) -> dict:
        return {"peers": len(self._peers), "max_peers": self.max_peers, "evicted": self.evicted}
