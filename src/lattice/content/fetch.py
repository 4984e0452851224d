"""One fetch: chunks of one object from many providers at once, into a partial object on disk.

The decisions are the scheduler's (lattice.content.schedule); this module does the I/O: a few
workers per provider, each running one ``content.chunks`` request (a server-streaming RPC) at a
time and asking for its next one while the last ``request_ahead`` chunks of the current one are on
their way (the link does not idle between batches). Every chunk is checked against the hash its
manifest names before it is written; a provider that sends a wrong chunk, a chunk it was not asked
for or a malformed reply is dropped at once and reported (``on_bad``). Writing (and, on machines
with more than ``hash_on_loop_cpus`` CPUs, hashing) runs in worker threads while the next chunks
arrive, a few chunks per thread hop (``write_batch``).
Receiver memory is bounded: each request's replies are limited to one chunk (``max_reply``,
checked before anything is allocated), at most twice ``requests_per_provider`` requests per
provider and ``max_requests`` in all are in flight, and at most ``write_queue`` chunks wait to be
written.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from lattice.content import protocol
from lattice.content.config import FetchLimits
from lattice.content.errors import ContentNotFound, PayloadError
from lattice.content.schedule import DUPLICATE, UNEXPECTED, Scheduler
from lattice.content.store import Partial
from lattice.cpus import usable_cpus
from lattice.errors import LatticeError
from lattice.rpc.errors import RemoteError

__all__ = ["Fetch", "FetchLimits", "WriteBatch"]

log = logging.getLogger(__name__)

Discover = Callable[[], Awaitable[list[tuple[str, str]]]]


Item = tuple[int, Any, float]  # a chunk received: (index, bytes, when it arrived)


class WriteBatch:
    """Chunks of one request received and waiting to be verified and written, handed to a worker
    thread together: when ``size`` are waiting, when the request ends, when :meth:`flush` is called
    (the write queue is full) or ``linger`` seconds after the first arrived (a slow provider). Each
    keeps its arrival time: a provider's rate is measured by arrivals, not by when a batch is written."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.items: list[Item] = []
        self.closed = False
        self._urgent = False
        self._changed = trio.Event()

    def add(self, index: int, data: Any) -> None:
        self.items.append((index, data, trio.current_time()))
        if len(self.items) == 1 or len(self.items) >= self.size:  # the writer cares about no other
            self._changed.set()

    def flush(self) -> None:
        self._urgent = True
        self._changed.set()

    def close(self) -> None:
        self.closed = True
        self._changed.set()

    def _due(self) -> bool:
        return self.closed or self._urgent or len(self.items) >= self.size

    async def _next_change(self) -> None:
        await self._changed.wait()
        self._changed = trio.Event()

    async def take(self, linger: float) -> list[Item]:
        """The next batch; empty once closed and drained."""
        while not self.items and not self.closed:
            await self._next_change()
        with trio.move_on_after(linger):
            while not self._due():
                await self._next_change()
        return self.drain()

    def drain(self) -> list[Item]:
        items, self.items, self._urgent = self.items, [], False
        return items


class _Running:
    """One request of a worker: ``near`` is set once only ``left`` replies are still to come (the
    worker then asks for its next batch) or when it ended; ``ended`` when it is over. ``ahead``: it
    was asked while another request of the worker ran."""

    def __init__(self, left: int, ahead: bool = False) -> None:
        self.left = left  # replies still to come before the worker may ask again
        self.ahead = ahead
        self.ok = self.busy = False  # answered in full; refused as busy
        self.near = trio.Event()
        self.ended = trio.Event()
        if left <= 0:
            self.near.set()

    def replied(self) -> None:
        self.left -= 1
        if self.left <= 0:
            self.near.set()


class Fetch:
    def __init__(
        self,
        rpc: Any,
        partial: Partial,
        limits: FetchLimits,
        *,
        wanted: list[int] | None = None,
        on_bad: Callable[[str, str], None] = lambda peer, reason: None,
        on_progress: Callable[[dict], None] | None = None,
        skip: Callable[[str], bool] = lambda peer: False,
    ) -> None:
        self.rpc = rpc
        self.partial = partial
        self.limits = limits
        m = partial.manifest
        self.wanted = list(range(m.count)) if wanted is None else sorted(set(wanted))
        missing = partial.missing(self.wanted)
        self.had = len(self.wanted) - len(missing)
        self.sched = Scheduler(
            missing,
            m.chunk_len,
            m.chunk_size,
            max_batch=limits.max_batch,
            endgame_copies=limits.endgame_copies,
            endgame_batch=limits.endgame_batch,
            max_failures=limits.max_failures,
        )
        self.on_bad = on_bad
        self.on_progress = on_progress
        self.skip = skip  # providers not to use (known bad)
        self.targets: dict[str, str] = {}  # peer id -> what to dial (a multiaddr or the peer id)
        self.fetched = 0
        self.fetched_bytes = 0
        self.write_calls = 0  # worker-thread calls that verified and wrote chunks (a batch each)
        self.started = 0.0
        self._inflight = 0
        self._changed = trio.Event()
        self._scopes: dict[int, trio.CancelScope] = {}
        self._nursery: trio.Nursery | None = None
        self._last_progress = 0.0
        self._disk = trio.CapacityLimiter(2)  # worker threads hashing and writing chunks
        self.hash_on_loop = usable_cpus() <= limits.hash_on_loop_cpus  # else hashed by the workers
        # chunks received, not yet written: at most write_queue of them and write_queue MiB (32 chunks
        # of 4 MiB would hold 128 MiB)
        self.write_slots = max(1, min(limits.write_queue, (limits.write_queue << 20) // m.chunk_size))
        self._write_queue = trio.Semaphore(self.write_slots)
        self._batches: set[WriteBatch] = set()  # of the requests in flight
        self._reported: set[str] = set()  # providers found bad

    # -- driving
    async def run(
        self, providers: list[tuple[str, str]], discover: Discover | None = None, discover_now: bool = False
    ) -> None:
        """Fetch every wanted chunk; ContentNotFound if the providers cannot supply them.
        ``discover`` finds more providers every ``discover_interval`` (first at once with
        ``discover_now``); None: only ``providers``."""
        self.started = trio.current_time()
        if self.sched.complete:
            self._progress(final=True)
            return
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for peer, target in providers:
                self.add_provider(peer, target)
            if discover is not None:
                nursery.start_soon(self._discover_loop, discover, discover_now)
            stuck_since: float | None = None
            while not self.sched.complete:
                stuck = self.sched.stuck()
                now = trio.current_time()
                if stuck:
                    stuck_since = stuck_since if stuck_since is not None else now
                    if now - stuck_since >= self.limits.stall_timeout or discover is None:
                        raise ContentNotFound(self._stuck_message(stuck))
                else:
                    stuck_since = None
                with trio.move_on_after(1.0 if stuck else 5.0):
                    await self._wait()
            nursery.cancel_scope.cancel()
        self._progress(final=True)

    def _stuck_message(self, stuck: list[int]) -> str:
        tried = [f"{str(p.peer)[-8:]}: {p.dropped or 'lacks them'}" for p in self.sched.providers.values()]
        who = "; ".join(tried[:6]) if tried else "no provider found"
        return f"{len(stuck)} chunks of {self.partial.cid} could not be fetched ({who})"

    def add_provider(self, peer: str, target: str) -> bool:
        """Use one more provider (ignored if known, to be skipped, or too many)."""
        if peer in self.targets or self.skip(peer) or self._nursery is None:
            return False
        if len(self.sched.active()) >= self.limits.max_providers:
            return False
        self.targets[peer] = target
        self.sched.add(peer)
        for _ in range(self.limits.requests_per_provider):
            self._nursery.start_soon(self._worker, peer, target)
        self._notify()
        return True

    async def _discover_loop(self, discover: Discover, now: bool = False) -> None:
        while True:
            if not now:
                await trio.sleep(self.limits.discover_interval)
            now = False
            if len(self.sched.active()) >= self.limits.max_providers:
                continue
            try:
                found = await discover()
            except (LatticeError, trio.TooSlowError) as exc:
                log.debug("provider discovery failed: %s", exc)
                continue
            for peer, target in found:
                self.add_provider(peer, target)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _wait(self) -> None:
        await self._changed.wait()

    # -- one provider
    async def _worker(self, peer: str, target: str) -> None:
        """Ask one provider for batch after batch. The next request goes out while the last
        ``request_ahead`` chunks of the current one are still to come (their replies and the
        writes of the batch overlap the next request's round trip and first read), so the link does
        not idle between batches; at most two requests of one worker run at once."""
        sched = self.sched
        backoff = 0.1
        ahead = self.limits.request_ahead  # 0 once the provider refused a request asked ahead
        running: list[_Running] = []  # this worker's requests not yet ended, oldest first
        while not sched.complete:
            prov = sched.providers[peer]
            if prov.dropped is not None:
                self._notify()
                return
            while running and running[0].ended.is_set():
                done = running.pop(0)
                if done.ok:
                    backoff = 0.1
                elif done.busy and done.ahead:  # over its per-peer limit: one request at a time now
                    ahead = 0
                elif prov.dropped is None:  # failed or refused: pause before asking again
                    await trio.sleep(backoff)
                    backoff = min(2.0, backoff * 2)
            if len(running) >= 2:
                await running[0].ended.wait()
                continue
            job = (
                sched.request(peer, trio.current_time())
                if self._inflight < self.limits.max_requests
                else None
            )
            if job is None:
                await self._wait()  # something changed (a request of ours ending notifies too)
                continue
            rid, indices = job
            run = _Running(len(indices) - ahead if ahead else len(indices) + 1, ahead=bool(running))
            running.append(run)
            self._inflight += 1
            assert self._nursery is not None  # set by run() before any worker starts
            self._nursery.start_soon(self._run_request, peer, target, rid, indices, run)
            await run.near.wait()  # the request ended, or only request_ahead of its chunks are left

    async def _run_request(self, peer: str, target: str, rid: int, indices: list[int], run: _Running) -> None:
        """One request to completion (a task of the fetch's nursery): its failures are counted here."""
        sched = self.sched
        busy = answered = False
        try:
            try:
                with trio.CancelScope() as scope:
                    self._scopes[rid] = scope
                    run.ok = await self._request(peer, target, rid, indices, run)
                if scope.cancelled_caught:
                    run.ok = True  # cancelled because others delivered its chunks: not the provider's fault
            except RemoteError as exc:  # refused: busy (retried after a pause), or it has no such content
                log.debug("content request to %s refused: %s", peer, exc)
                if exc.type == "ContentNotFound":
                    sched.drop(peer, "does not have it")
                busy = exc.type == "ContentBusy"
            except PayloadError as exc:  # over the reply limit, or malformed
                self._bad(peer, f"malformed reply: {exc}")
            except (LatticeError, trio.TooSlowError) as exc:  # timeout, lost connection
                log.debug("content request to %s failed: %s", peer, exc)
            answered = True  # not cancelled from outside (the fetch ended)
        finally:
            self._inflight -= 1
            self._scopes.pop(rid, None)
            sched.finish(rid)
            if answered and not run.ok and not busy and sched.providers[peer].dropped is None:
                sched.failed(peer)  # a provider at its limits is not failing: it is asked again later
            run.busy = busy
            run.ended.set()
            run.near.set()
            self._notify()

    async def _request(self, peer: str, target: str, rid: int, indices: list[int], run: _Running) -> bool:
        """Run one request; True if the provider answered every chunk it was asked for. Its chunks
        are verified and written by worker threads, a batch per hop (:meth:`_writer`), while the
        next ones arrive."""
        failure: Exception | None = None
        batch = WriteBatch(self.limits.write_batch)
        self._batches.add(batch)
        try:
            async with trio.open_nursery() as writes:
                writes.start_soon(self._writer, peer, rid, batch)
                try:
                    ok = await self._receive(peer, target, rid, indices, batch, run)
                except Exception as exc:  # raised as itself once the writes are done, not in a group
                    failure = exc
                finally:
                    batch.close()
        finally:  # chunks received after a cancelled writer stopped (a write slot came just then)
            self._batches.discard(batch)
            if left := batch.drain():
                await self._write(peer, rid, left)
        if failure is not None:
            raise failure
        return ok and not self.sched.requests[rid].outstanding

    async def _receive(
        self, peer: str, target: str, rid: int, indices: list[int], batch: WriteBatch, run: _Running
    ) -> bool:
        sched, partial = self.sched, self.partial
        m = partial.manifest
        payload = {"cid": str(partial.cid), "chunks": indices}
        async with self.rpc.call_stream(
            target,
            protocol.CHUNKS,
            payload,
            timeout=self.limits.request_timeout,
            as_torch=False,
            max_reply=m.chunk_size + protocol.REPLY_SLACK,
        ) as items:
            async for item in items:
                reply = protocol.parse_chunk_reply(item)
                run.replied()
                status = sched.arrived(rid, reply.index)
                if status == UNEXPECTED:
                    self._bad(peer, f"sent chunk {reply.index}, which it was not asked for")
                    return False
                if reply.data is None:
                    sched.lacks(rid, reply.index)
                    self._notify()
                    continue
                if status == DUPLICATE:
                    continue
                if self._write_queue.value == 0:  # what the requests hold goes to disk now
                    for waiting in self._batches:
                        waiting.flush()
                try:
                    await self._write_queue.acquire()  # back-pressure: the disk is behind
                except BaseException:  # cancelled (endgame, a dropped provider): needed again
                    sched.rejected(rid, reply.index)
                    raise
                batch.add(reply.index, reply.data)
        return True

    async def _writer(self, peer: str, rid: int, batch: WriteBatch) -> None:
        """Hand one request's chunks to a worker thread, up to ``write_batch`` per hop (a hop costs
        ~0.15-0.2 ms of CPU, as much as hashing a quarter MiB). Chunks received are always written,
        also when the request is cancelled (endgame, a dropped provider): by :meth:`_request`."""
        while items := await batch.take(self.limits.write_linger):
            await self._write(peer, rid, items)

    async def _write(self, peer: str, rid: int, items: list[Item]) -> None:
        """Verify and write chunks (one worker-thread call; verified before it on the event loop
        with ``hash_on_loop``), then count them. Shielded: a chunk on disk is always counted, even
        if its request was cancelled meanwhile."""
        sched = self.sched
        self.write_calls += 1
        try:
            if self.hash_on_loop:  # a few chunks (write_batch) at a time: ~0.25 ms of the loop each
                stored, good = self._verify(items)
                if good:  # (all bad: the provider is dropped below, nothing to write)
                    with trio.CancelScope(shield=True):
                        await trio.to_thread.run_sync(self.partial.write_verified, good, limiter=self._disk)
            else:
                with trio.CancelScope(shield=True):
                    stored = await trio.to_thread.run_sync(self._store, items, limiter=self._disk)
        finally:
            for _ in items:
                self._write_queue.release()
        for (index, data, arrived), ok in zip(items, stored, strict=True):
            if not ok:
                sched.rejected(rid, index)
                self._bad(peer, f"chunk {index} does not match its hash")
            elif index in sched.done:  # another copy was written meanwhile (endgame)
                sched.duplicates += 1
            else:
                self.fetched += 1
                self.fetched_bytes += data.nbytes
                for other in sched.completed(rid, index, arrived):
                    scope = self._scopes.get(other)
                    if scope is not None:
                        scope.cancel()
        self._notify()
        self._progress()

    def _store(self, items: list[Item]) -> list[bool]:
        """Verify and write chunks (in a worker thread: hashing and disk writes overlap the
        network); False for each that is not the chunk it claims to be."""
        out, good = self._verify(items)
        self.partial.write_verified(good)
        return out

    def _verify(self, items: list[Item]) -> tuple[list[bool], list[tuple[int, Any]]]:
        """Whether each chunk is the one it claims to be, and the (index, bytes) of those that are."""
        oks = [self.partial.verify(index, data) for index, data, _ in items]
        return oks, [(index, data) for (index, data, _), ok in zip(items, oks, strict=True) if ok]

    def _bad(self, peer: str, reason: str) -> None:
        """Drop a provider that sent what it should not have; reported once (more of its chunks may
        be waiting to be verified)."""
        if peer not in self._reported:
            self._reported.add(peer)
            log.warning("content provider %s dropped: %s", peer, reason)
            self.sched.drop(peer, reason)
            self.on_bad(peer, reason)
        for rid, req in list(self.sched.requests.items()):
            if req.peer == peer and rid in self._scopes:
                self._scopes[rid].cancel()

    # -- progress
    def progress(self) -> dict:
        m = self.partial.manifest
        elapsed = max(trio.current_time() - self.started, 1e-6)
        rate = self.fetched_bytes / elapsed
        left = self.sched.remaining * m.chunk_size
        return {
            "cid": str(self.partial.cid),
            "chunks": len(self.wanted),
            "had": self.had,
            "fetched": self.fetched,
            "remaining": self.sched.remaining,
            "bytes": self.fetched_bytes,
            "size": m.size,
            "rate": rate,
            "eta_s": left / rate if rate > 0 else math.inf,
            "elapsed_s": elapsed,
            "providers": len(self.sched.active()),
            "duplicates": self.sched.duplicates,
            "dropped": {str(p.peer): p.dropped for p in self.sched.providers.values() if p.dropped},
            "per_provider": {
                str(p.peer): {"chunks": p.chunks, "bytes": p.bytes, "rate": p.rate}
                for p in self.sched.providers.values()
            },
        }

    def _progress(self, final: bool = False) -> None:
        if self.on_progress is None:
            return
        now = trio.current_time()
        if final or now - self._last_progress >= 0.2:
            self._last_progress = now
            self.on_progress(self.progress())
