"""The routing table: 256 k-buckets, least recently seen first; sans-IO (the caller does the pinging)."""

from __future__ import annotations

import heapq
import time
from collections import OrderedDict
from collections.abc import Collection
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
        # every contact, flat: closest() runs on every lookup and FIND_NODE answer, and walking 256
        # mostly empty buckets cost more than ranking the contacts (measured: bench/cpu_per_op.py)
        self._all: dict[PeerId, Contact] = {}
        self._full: set[int] = set()  # indexes of full buckets (where add turns new peers away)

    def __len__(self) -> int:
        return len(self._all)

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
        bucket[peer] = self._all[peer] = Contact(peer, list(addrs or []), key, now)
        if len(bucket) >= self.k:
            self._full.add(bucket_index(self.local_key, key))
        return None

    def remove(self, peer: PeerId) -> None:
        index = bucket_index(self.local_key, peer_key(peer))
        self.buckets[index].pop(peer, None)
        self._all.pop(peer, None)
        self._full.discard(index)

    def complete_up_to(self, index: int) -> bool:
        """No bucket up to ``index`` is full, so none of them ever turned a peer away: the table holds
        every peer it was told of at these distances (in a small network, all of them)."""
        return min(self._full, default=len(self.buckets)) > index

    def failed(self, peer: PeerId, max_failures: int = 3) -> None:
        """Count a failed request; drop the contact after ``max_failures`` in a row."""
        bucket = self.buckets[bucket_index(self.local_key, peer_key(peer))]
        contact = bucket.get(peer)
        if contact is not None:
            contact.failures += 1
            if contact.failures >= max_failures:
                self.remove(peer)

    def get(self, peer: PeerId) -> Contact | None:
        return self._all.get(peer)

    def closest(self, target: int, count: int | None = None, exclude: set | None = None) -> list[Contact]:
        """The ``count`` (default k) contacts closest to ``target`` by XOR distance."""
        count = self.k if count is None else count
        contacts: Collection[Contact] = self._all.values()
        if exclude:
            contacts = [c for c in contacts if c.peer not in exclude]
        if len(contacts) <= count:
            return sorted(contacts, key=lambda c: c.key ^ target)
        return heapq.nsmallest(count, contacts, key=lambda c: c.key ^ target)

    def contacts(self) -> list[Contact]:
        return [c for b in self.buckets for c in b.values()]

    def spread(self, count: int) -> list[PeerId]:
        """Up to ``count`` contacts taken in turn from every non-empty bucket, the most recently seen
        of each first: the ones worth a warm connection (lookups for random keys start in any
        bucket)."""
        queues = [list(reversed(b)) for b in self.buckets if b]
        out: list[PeerId] = []
        for i in range(max(map(len, queues), default=0)):
            for queue in queues:
                if i < len(queue):
                    out.append(queue[i])
                    if len(out) >= count:
                        return out
        return out
