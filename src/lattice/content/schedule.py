"""Which chunks to ask which provider for (pure state: no I/O, times passed in; tested alone).

- Pull: each provider's workers ask for their next batch when the last one is done, so a faster
  provider comes back sooner and gets more chunks. The batch size follows the provider's measured
  rate (about ``target_seconds`` of its transfer, at most ``max_batch`` chunks), so a slow provider
  holds few chunks and cannot stall the end.
- Lowest index first (content is often read front to back).
- Endgame (BitTorrent's): once every missing chunk is asked for, an idle provider races chunks that
  are in flight at others, those due last, ``endgame_batch`` at a time (at most ``endgame_copies``
  copies of one chunk); the first verified copy wins and requests left with nothing to deliver are
  cancelled.
- A provider that says it lacks a chunk is not asked for it again; one that fails
  ``max_failures`` times in a row, or sends a bad chunk, is dropped.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field

__all__ = ["Provider", "Scheduler"]

UNEXPECTED, NEEDED, DUPLICATE = "unexpected", "needed", "duplicate"


@dataclass
class Provider:
    peer: Hashable
    rate: float = 0.0  # bytes/s, EWMA of its deliveries (0: not measured yet)
    bytes: int = 0
    chunks: int = 0
    failures: int = 0  # in a row
    dropped: str | None = None  # why it is no longer asked
    lacks: set[int] = field(default_factory=set)
    last: float = 0.0  # time of its last delivery


@dataclass
class _Request:
    peer: Hashable
    asked: list[int]
    outstanding: set[int]  # asked, not delivered, not done by another copy
    started: float
    received: set[int] = field(default_factory=set)


class Scheduler:
    def __init__(
        self,
        wanted: Iterable[int],
        chunk_len: Callable[[int], int],
        chunk_size: int,
        *,
        max_batch: int = 8,
        first_batch: int = 2,
        target_seconds: float = 0.25,
        endgame_copies: int = 2,
        endgame_batch: int = 2,
        max_failures: int = 3,
    ) -> None:
        self.chunk_len = chunk_len
        self.chunk_size = chunk_size
        self.max_batch = max_batch
        self.first_batch = first_batch
        self.target_seconds = target_seconds
        self.endgame_copies = endgame_copies
        self.endgame_batch = endgame_batch
        self.max_failures = max_failures
        self._pending = sorted(set(wanted))  # a heap (sorted lists are heaps)
        self._pending_set = set(self._pending)
        self.remaining = len(self._pending)
        self.done: set[int] = set()
        self.holders: dict[int, set[int]] = {}  # chunk in flight -> request ids carrying it
        self.providers: dict[Hashable, Provider] = {}
        self.requests: dict[int, _Request] = {}
        self._next_rid = 0
        self.duplicates = 0  # chunks that arrived after another copy (endgame waste)

    @property
    def complete(self) -> bool:
        return self.remaining == 0

    # -- providers
    def add(self, peer: Hashable) -> Provider:
        prov = self.providers.get(peer)
        if prov is None:
            prov = self.providers[peer] = Provider(peer)
        return prov

    def active(self) -> list[Provider]:
        return [p for p in self.providers.values() if p.dropped is None]

    def drop(self, peer: Hashable, reason: str) -> None:
        """Ask ``peer`` for nothing more (its requests in flight end with :meth:`finish`)."""
        prov = self.providers.get(peer)
        if prov is not None and prov.dropped is None:
            prov.dropped = reason

    def failed(self, peer: Hashable) -> bool:
        """A request to ``peer`` failed (timeout, lost stream, refusal); True if it is dropped now."""
        prov = self.providers[peer]
        prov.failures += 1
        if prov.failures >= self.max_failures:
            self.drop(peer, f"{prov.failures} failed requests in a row")
        return prov.dropped is not None

    # -- requests
    def batch_size(self, prov: Provider) -> int:
        if prov.rate <= 0:
            return min(self.first_batch, self.max_batch)
        return max(1, min(self.max_batch, int(prov.rate * self.target_seconds / self.chunk_size)))

    def request(self, peer: Hashable, now: float) -> tuple[int, list[int]] | None:
        """The next request for ``peer`` (request id, chunk indices), or None: nothing to ask it now."""
        prov = self.add(peer)
        if prov.dropped is not None or self.complete:
            return None
        n = self.batch_size(prov)
        chosen = self._take_pending(prov, n)
        if not chosen:
            chosen = self._endgame(prov, n, now)
        if not chosen:
            return None
        self._next_rid += 1
        rid = self._next_rid
        self.requests[rid] = _Request(peer, chosen, set(chosen), now)
        for i in chosen:
            self.holders.setdefault(i, set()).add(rid)
        return rid, chosen

    def _take_pending(self, prov: Provider, n: int) -> list[int]:
        chosen: list[int] = []
        skipped: list[int] = []
        heap = self._pending
        while heap and len(chosen) < n:
            i = heapq.heappop(heap)
            if i not in self._pending_set:
                continue  # stale entry (re-queued twice)
            if i in prov.lacks:
                skipped.append(i)
                continue
            self._pending_set.discard(i)
            chosen.append(i)
        for i in skipped:
            heapq.heappush(heap, i)
        return chosen

    def _endgame(self, prov: Provider, n: int, now: float) -> list[int]:
        """Chunks in flight at others to race: the ones they will deliver last (a request's chunks
        arrive in order, so the highest indices), a few at a time (``endgame_batch``): with large
        batches everything is in flight long before the end, and racing whole requests from their
        head doubled the bytes moved (46 duplicates in 128 chunks from 5 providers). Once both rates
        are measured, only a chunk this provider would bring sooner than its holders is raced: a
        copy that loses wastes the fetcher's downlink, which one fast provider may fill alone. A
        holder silent for twice its time per chunk counts as unknown (it may have stalled)."""
        mine = {i for r in self.requests.values() if r.peer == prov.peer for i in r.outstanding}
        due: dict[int, int] = {}  # chunk -> how many chunks its holder sends before it
        eta: dict[int, float] = {}  # chunk -> seconds until a holder delivers it (inf: rate unknown)
        for r in self.requests.values():
            holder = self.providers[r.peer]
            rate = holder.rate
            if rate > 0 and now - max(holder.last, r.started) > 2 * self.chunk_size / rate:
                rate = 0.0  # late: stalled, or slower than measured
            for place, i in enumerate(j for j in r.asked if j in r.outstanding):
                due[i] = min(due.get(i, place), place)
                eta[i] = min(
                    eta.get(i, math.inf), (place + 1) * self.chunk_len(i) / rate if rate > 0 else math.inf
                )
        racing = [
            (len(rids), -eta.get(i, math.inf), -due.get(i, 0), -i)
            for i, rids in self.holders.items()
            if rids
            and i not in mine
            and i not in prov.lacks
            and len(rids) < self.endgame_copies
            and (prov.rate <= 0 or self.chunk_len(i) / prov.rate < eta.get(i, math.inf))
        ]
        racing.sort()
        return [-i for *_, i in racing[: min(n, self.endgame_batch)]]

    def arrived(self, rid: int, index: int) -> str:
        """A chunk arrived on request ``rid``: UNEXPECTED (not asked, or twice: a protocol violation),
        NEEDED (verify and write it, then :meth:`completed`) or DUPLICATE (another copy won).
        (``asked`` is a short list: a request holds at most ``max_batch`` chunks.)"""
        req = self.requests.get(rid)
        if req is None or index in req.received or index not in req.asked:
            return UNEXPECTED
        req.received.add(index)
        req.outstanding.discard(index)
        rids = self.holders.get(index)
        if rids is not None:
            rids.discard(rid)
            if not rids:
                del self.holders[index]
        if index in self.done:
            self.duplicates += 1
            return DUPLICATE
        return NEEDED

    def completed(self, rid: int, index: int, now: float) -> list[int]:
        """Chunk ``index`` of request ``rid``, which arrived at ``now``, was verified and written.
        Returns the requests that now have nothing left to deliver (cancel them). (Chunks are
        written in batches, so arrival times reach here a little out of order: one that arrived
        before the provider's last delivery counted is not a rate sample.)"""
        req = self.requests[rid]
        prov = self.providers[req.peer]
        nbytes = self.chunk_len(index)
        since = max(prov.last, req.started)
        if now > since:
            sample = nbytes / max(now - since, 1e-4)
            prov.rate = sample if prov.rate <= 0 else 0.75 * prov.rate + 0.25 * sample
            prov.last = now
        prov.bytes += nbytes
        prov.chunks += 1
        prov.failures = 0
        if index not in self.done:
            self.done.add(index)
            self.remaining -= 1
        cancel = []
        for other in self.holders.pop(index, set()):
            other_req = self.requests.get(other)
            if other_req is not None:
                other_req.outstanding.discard(index)
                if not other_req.outstanding:
                    cancel.append(other)
        return cancel

    def lacks(self, rid: int, index: int) -> None:
        """The provider of ``rid`` does not have ``index`` (after :meth:`arrived` said NEEDED/DUPLICATE)."""
        req = self.requests[rid]
        self.providers[req.peer].lacks.add(index)
        self._requeue(index)

    def rejected(self, rid: int, index: int) -> None:
        """A copy of ``index`` from ``rid`` failed verification: the chunk is needed again."""
        self._requeue(index)

    def finish(self, rid: int) -> list[int]:
        """Request ``rid`` ended (whatever way); what it did not deliver goes back to the pool."""
        req = self.requests.pop(rid, None)
        if req is None:
            return []
        left = [i for i in req.asked if i in req.outstanding]
        for i in left:
            rids = self.holders.get(i)
            if rids is not None:
                rids.discard(rid)
                if not rids:
                    del self.holders[i]
            self._requeue(i)
        return left

    def _requeue(self, index: int) -> None:
        if index in self.done or index in self._pending_set or self.holders.get(index):
            return
        self._pending_set.add(index)
        heapq.heappush(self._pending, index)

    # -- progress
    def stuck(self) -> list[int]:
        """Missing chunks no active provider can be asked for (all lack them, or none is left), when
        nothing is in flight; empty while progress is possible."""
        if self.complete or self.requests:
            return []
        missing = sorted(self._pending_set)
        able = [p for p in self.active() if any(i not in p.lacks for i in missing)]
        return [] if able else missing

    def inflight(self, peer: Hashable) -> int:
        return sum(1 for r in self.requests.values() if r.peer == peer)
