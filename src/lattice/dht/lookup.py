"""Iterative Kademlia lookup as a sans-IO state machine (the same code runs in the simulator and on
the network). At most ``alpha`` queries in flight; it ends when the ``beta`` closest live peers seen
so far have all answered and nothing closer is pending (go-libp2p's "resiliency" rule; beta = k is
classic Kademlia). ``closest_known`` then gives the k closest live peers seen, queried or not: the
targets for storing a record.

Hops: a seed is at hop 1; a peer first learned from a hop-h peer is at hop h+1. ``hops`` is the hop of
the closest peer found, i.e. how many sequential round trips reaching it took.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Generic, TypeVar

WAITING, QUERYING, DONE, FAILED = range(4)
P = TypeVar("P", bound=Hashable)  # a peer id on the network, anything hashable in the simulator


class Lookup(Generic[P]):
    def __init__(
        self,
        target: int,
        seeds: Iterable[tuple[P, int]],
        k: int = 20,
        alpha: int = 3,
        beta: int | None = None,
    ) -> None:
        self.target = target
        self.k = k
        self.alpha = alpha
        self.beta = k if beta is None else beta
        self.state: dict[P, int] = {}
        self.keys: dict[P, int] = {}
        self.hop: dict[P, int] = {}
        self.queries = 0
        for peer, key in seeds:
            self._learn(peer, key, 1)

    def _learn(self, peer: P, key: int, hop: int) -> None:
        if peer not in self.state:
            self.state[peer] = WAITING
            self.keys[peer] = key
            self.hop[peer] = hop

    def _ranked(self) -> list[P]:
        return sorted(
            (p for p, s in self.state.items() if s != FAILED), key=lambda p: self.keys[p] ^ self.target
        )

    def next_queries(self) -> list[P]:
        """Peers to query now (marks them in flight)."""
        in_flight = sum(1 for s in self.state.values() if s == QUERYING)
        out: list[P] = []
        for peer in self._ranked()[: self.beta]:
            if in_flight + len(out) >= self.alpha:
                break
            if self.state[peer] == WAITING:
                out.append(peer)
        for peer in out:
            self.state[peer] = QUERYING
        self.queries += len(out)
        return out

    def on_response(self, peer: P, closer: Iterable[tuple[P, int]]) -> None:
        if self.state.get(peer) != QUERYING:
            return
        self.state[peer] = DONE
        hop = self.hop[peer] + 1
        for other, key in closer:
            self._learn(other, key, hop)

    def on_failure(self, peer: P) -> None:
        if self.state.get(peer) == QUERYING:
            self.state[peer] = FAILED

    @property
    def done(self) -> bool:
        closest = self._ranked()[: self.beta]
        return all(self.state[p] == DONE for p in closest) or not closest

    def closest_known(self, count: int | None = None) -> list[P]:
        """The closest peers seen that have not failed (answered, pending or never asked)."""
        return self._ranked()[: count or self.k]

    @property
    def in_flight(self) -> int:
        return sum(1 for s in self.state.values() if s == QUERYING)

    def closest(self, count: int | None = None) -> list[P]:
        """The closest peers that answered."""
        return [p for p in self._ranked() if self.state[p] == DONE][: count or self.k]

    @property
    def hops(self) -> int:
        best = self.closest(1)
        return self.hop[best[0]] if best else 0
