"""The routing table: 256 k-buckets, least recently seen first; sans-IO (the caller does the pinging)."""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

from lattice.dht.keys import ID_BITS, bucket_index, peer_key
from lattice.identity import PeerId


@dataclass
class Contact:
    peer: PeerId
    addrs: list = field(default_factory=list)
    key: int = 0
    last_seen: float = 0.0
    failures: int = 0


class RoutingTable:
    """k-buckets of contacts. ``add`` never evicts a live contact on its own: when a bucket is full it
    returns the least recently seen contact so the caller can ping it and ``remove`` it if dead
    (Kademlia's preference for long-lived peers, which resists flooding by fresh identities)."""

    def __init__(self, local: PeerId, k: int = 20) -> None:
        self.local = local
        self.local_key = peer_key(local)
        self.k = k
        self.buckets: list[OrderedDict[PeerId, Contact]] = [OrderedDict() for _ in range(ID_BITS)]

    def __len__(self) -> int:
        return sum(len(b) for b in self.buckets)

    def __contains__(self, peer: PeerId) -> bool:
        key = peer_key(peer)
        return peer in self.buckets[bucket_index(self.local_key, key)] if peer != self.local else False

    def add(self, peer: PeerId, addrs: list | None = None, now: float | None = None) -> Contact | None:
        """Insert or refresh ``peer``; if its bucket is full, return the eviction candidate."""
        if peer == self.local:
            return None
        key = peer_key(peer)
        bucket = self.buckets[bucket_index(self.local_key, key)]
        now = time.monotonic() if now is None else now
        contact = bucket.get(peer)
        if contact is not None:
            bucket.move_to_end(peer)
            contact.last_seen = now
            contact.failures = 0
            if addrs:
                contact.addrs = list(addrs)
            return None
        if len(bucket) >= self.k:
            return next(iter(bucket.values()))
        bucket[peer] = Contact(peer, list(addrs or []), key, now)
        return None

    def remove(self, peer: PeerId) -> None:
        self.buckets[bucket_index(self.local_key, peer_key(peer))].pop(peer, None)

    def failed(self, peer: PeerId, max_failures: int = 3) -> None:
        """Count a failed request; drop the contact after ``max_failures`` in a row."""
        bucket = self.buckets[bucket_index(self.local_key, peer_key(peer))]
        contact = bucket.get(peer)
        if contact is not None:
            contact.failures += 1
            if contact.failures >= max_failures:
                del bucket[peer]

    def get(self, peer: PeerId) -> Contact | None:
        return self.buckets[bucket_index(self.local_key, peer_key(peer))].get(peer)

    def closest(self, target: int, count: int | None = None, exclude: set | None = None) -> list[Contact]:
        """The ``count`` (default k) contacts closest to ``target`` by XOR distance."""
        count = self.k if count is None else count
        contacts = [c for b in self.buckets for c in b.values() if not exclude or c.peer not in exclude]
        contacts.sort(key=lambda c: c.key ^ target)
        return contacts[:count]

    def contacts(self) -> list[Contact]:
        return [c for b in self.buckets for c in b.values()]
