"""The DHT service (``node.dht``): Kademlia over libp2p streams, signed records, providers.

    n = await node.dht.put(b"model/llama/shard-3", b"...", ttl=3600)      # replicas that stored it
    entries = await node.dht.get(b"model/llama/shard-3")                   # one Entry per subkey
    await node.dht.provide(b"tensor:abc123");  await node.dht.find_providers(b"tensor:abc123")

Wire: libp2p Kademlia messages (varint-delimited protobuf) under the swarm profile's protocol id
(``/lattice/kad/1.0.0`` by default; ``/ipfs/kad/1.0.0`` in the ``libp2p`` profile, which go/rust/py
libp2p peers query). Only DHT servers enter the routing table: peers whose identify lists that id
(a peer in client mode is served, never queried). Streams to a peer are pooled and reused across
requests, so a lookup pays no protocol negotiation per hop. Every record is verified on every hop (signature,
expiry, size, ownership, the peer-id subkey rule); rejections are counted in ``counters``. What a
stranger may store here is bounded by byte quotas (store, publisher, sender IP prefix: ``StoreLimits``);
a refused PUT_VALUE (over a quota, or not a valid Lattice record: e.g. a go peer's ``/pk/`` or
``/ipns/`` record, a Lattica peer's pickled value) resets the stream as go-libp2p-kad-dht's server
does, is counted (``quota_refused*``, ``rejected_records``), and a peer that keeps writing after its
refusals earns misbehaviour points.
"""

from __future__ import annotations

import logging
import os
import random
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import msgpack
import trio

from lattice import _proto
from lattice.dht import protocol, records
from lattice.dht.keys import bucket_index, bucket_probe_keys, key_id, peer_key
from lattice.dht.lookup import Lookup
from lattice.dht.records import Record, RecordError
from lattice.dht.routing import RoutingTable
from lattice.dht.store import WRITE_BEHIND, QuotaExceeded, Store, StoreLimits
from lattice.errors import LatticeError, PayloadError, TransportError
from lattice.identity import PeerId
from lattice.multiaddr import Multiaddr, dialable, is_public
from lattice.service import ServiceContext
from lattice.transport import multistream
from lattice.transport.framing import read_delimited
from lattice.transport.limits import PENALTY_THROTTLED, TokenBucket
from lattice.transport.peerstore import PeerInfo
from lattice.transport.resources import ResourceLimitExceeded
from lattice.transport.stream import Stream

log = logging.getLogger(__name__)

PROTOCOL_ID = "/lattice/kad/1.0.0"
MAX_REQUESTS_PER_STREAM = 10_000
IDLE_STREAM_TIMEOUT = 60.0
MAX_IDLE_STREAMS = 4
_OP_NAMES = {protocol.FIND_NODE: "find_node", protocol.GET_VALUE: "get_value",
             protocol.GET_PROVIDERS: "get_providers"}  # fmt: skip
EARLY_SELF_LOOKUPS = (1.0, 4.0, 15.0)  # seconds between the first self-lookups after bootstrap
MAX_REPLY_RECORDS = 64 * 1024 * 3  # bytes of records in one GET_VALUE reply
REFUSED = protocol.Message(protocol.PUT_VALUE)  # _answer's "reset the stream" (identity-compared)


@dataclass
class DHTConfig:
    protocol_id: str | None = None  # None: the swarm profile's (ServiceContext.protocol_ids["kad"])
    k: int = 20
    alpha: int = 3
    beta: int = 3  # a store/provide lookup ends when the 3 closest live peers answered
    request_timeout: float = 5.0
    refresh_interval: float = 600.0
    republish_interval: float = 3600.0
    persist: bool = True
    optimistic_store: bool = True  # PUT_VALUE to the table's k closest while the lookup runs
    # a put returns once this many of the k closest acknowledged (0: all of them); the others
    # complete in the background (on a wide-area link one first contact costs ~6 RTT, one lost
    # packet an RTO of >= 200 ms: waiting for the slowest of 20 replicas made a store 8 RTT)
    store_quorum: int = 10
    # replication requests still running in the background above which a put waits for all of its
    # own again (backpressure for a caller that puts in a tight loop)
    max_background_stores: int = 1024
    # routing-table contacts (spread over the buckets) this node keeps a connection to, dialled in
    # the background every ``warm_interval`` s: a request to a contact then costs one round trip,
    # not a first contact's TCP + Noise + multistream handshakes (~6 RTT). 0: none
    warm_connections: int = 64
    warm_interval: float = 10.0
    # after joining, look up a random key in each of this many farthest buckets (Kademlia's bucket
    # refresh): the table then knows peers all over the key space, not mostly its own neighbours
    refresh_buckets: int = 8
    store_limits: StoreLimits = field(
        default_factory=StoreLimits
    )  # byte quotas (the node sets them from NodeConfig)
    # refusals over a quota forgiven per peer (a burst, refilled per second); each one beyond costs
    # the peer a misbehaviour point: an honest peer is refused rarely, an abuser keeps sending
    quota_grace: float = 16.0
    quota_grace_per_s: float = 0.2


@dataclass
class Entry:
    """One value found under a key: its subkey, publisher and lifetime."""

    key: bytes
    subkey: bytes
    value: bytes
    publisher: str
    published_at: float
    expires_at: float

    def as_dict(self) -> dict:
        return self.__dict__.copy()


@dataclass
class _Answer:
    """A reply requested ahead of a lookup (see ``DHT._lookup``): set when its request ended."""

    done: trio.Event = field(default_factory=trio.Event)
    reply: protocol.Message | None = None


def _entry(record: Record) -> Entry:
    return Entry(record.key, record.subkey, record.value, str(record.publisher_id), record.published_at,
                 record.expires_at)  # fmt: skip


def _as_key(key: bytes | str) -> bytes:
    return key.encode() if isinstance(key, str) else bytes(key)


class DHT:
    name = "dht"

    def __init__(self, config: DHTConfig | None = None) -> None:
        self.config = config or DHTConfig()
        self._ctx: ServiceContext | None = None
        self.protocol_id = self.config.protocol_id or PROTOCOL_ID  # the swarm's, once running
        self.table: RoutingTable | None = None
        self.store: Store | None = None
        self._pools: dict[PeerId, list[Stream]] = {}
        self._published: dict[tuple[bytes, bytes], Record] = {}
        self._table_changed = trio.Event()
        self._dirty = trio.Event()  # the store has records to commit (the write-behind task's cue)
        self.counters: dict[str, float] = {
            "requests_in": 0, "requests_out": 0, "rejected_records": 0, "malformed": 0,
            "failed_requests": 0, "quota_refused": 0,
        }  # fmt: skip
        self._refusals: dict[PeerId, TokenBucket] = {}  # quota refusals forgiven per peer
        self._background: trio.Nursery | None = None  # replication a put no longer waits for
        self._replicating = 0  # its requests in flight
        # operation -> [count, total seconds] (Prometheus summaries: lattice_dht_op_seconds)
        self.latency: dict[str, list[float]] = {}

    # -- lifecycle
    @property
    def ctx(self) -> ServiceContext:
        if self._ctx is None:
            raise LatticeError("the DHT service is not running")
        return self._ctx

    def _store(self) -> Store:
        """The record store (opened by run)."""
        if self.store is None:
            raise LatticeError("the DHT is not running")
        return self.store

    async def run(self, ctx: ServiceContext, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        self._ctx = ctx
        self.protocol_id = self.config.protocol_id or ctx.protocol_ids.get("kad", PROTOCOL_ID)
        host = ctx.host
        self.table = RoutingTable(host.peer_id, self.config.k)
        host.peerstore.keep(self.table.__contains__)  # routing-table peers stay in the peer store
        path = ctx.data_dir / "dht.sqlite" if self.config.persist else None
        self.store = await trio.to_thread.run_sync(Store, path, self.config.store_limits)
        for peer, raw_addrs in self.store.load_routing():
            addrs = _parse_addrs(raw_addrs)
            self._remember(peer, addrs)
            self.table.add(peer, addrs)
        host.set_stream_handler(self.protocol_id, self._handle)
        host.on_identify(self._on_identified)
        host.peer_router = self._route_peer
        ops: dict[str, Callable[..., Any]] = {
            "dht.put": self._op_put, "dht.get": self._op_get, "dht.provide": self._op_provide,
            "dht.providers": self._op_providers, "dht.status": self._op_status,
        }  # fmt: skip
        for name, op in ops.items():
            ctx.add_control_op(name, op)
        try:
            async with trio.open_nursery() as nursery:
                self._background = nursery
                nursery.start_soon(self._maintain)
                nursery.start_soon(self._write_behind)
                nursery.start_soon(self._keep_warm)
                task_status.started()
                await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                self.store.save_routing(
                    [(c.peer, [a.to_bytes() for a in c.addrs]) for c in self.table.contacts()]
                )
                self.store.close()

    async def _write_behind(self) -> None:
        """Commit the records replicas acknowledged, one transaction per ``WRITE_BEHIND`` seconds."""
        assert self.store is not None
        while True:
            await self._dirty.wait()
            await trio.sleep(WRITE_BEHIND)  # gather the batch
            self._dirty = trio.Event()
            try:
                self.store.flush()
            except sqlite3.Error as exc:  # kept pending: retried on the next cycle
                log.warning("DHT store commit failed (%d records pending): %s", self.store.pending, exc)
                self.counters["write_errors"] = self.store.write_errors
                self._dirty.set()

    async def _keep_warm(self) -> None:
        """Dial the contacts of ``warm_contacts()`` that have no connection, one at a time (a swarm
        that starts at once must not turn into a storm of handshakes). Of two peers, the one with the
        lower key dials; the other dials only a contact still cold one pass later. A contact that
        cannot be reached counts a failure against it (three in a row drop it); a full connection
        budget of ours (node, IP prefix) ends the pass."""
        assert self.table is not None
        me = self.table.local_key
        cold_before: set[PeerId] = set()
        delay = 2.0 + random.uniform(0.0, 2.0)  # the first passes soon after bootstrap
        while self.config.warm_connections > 0:
            await trio.sleep(delay)
            delay = min(2 * delay, self.config.warm_interval)
            host = self.ctx.host
            cold = [p for p in self.warm_contacts() if host.connection_to(p) is None]
            for peer in cold:
                if (me > peer_key(peer) and peer not in cold_before) or host.connection_to(peer) is not None:
                    continue
                try:
                    await host.connect_peer(peer, timeout=self.config.request_timeout, route=False)
                except ResourceLimitExceeded as exc:  # our budget, not the contact's fault: next pass
                    log.debug("warm connections paused: %s", exc)
                    break
                except (LatticeError, trio.TooSlowError, OSError) as exc:
                    log.debug("warm connection to %s failed: %s", peer, exc)
                    self.table.failed(peer)
            cold_before = set(cold)

    def warm_contacts(self) -> list[PeerId]:
        """The routing-table contacts this node keeps connected (``warm_connections`` of them)."""
        return self.table.spread(self.config.warm_connections) if self.table is not None else []

    def connected_contacts(self) -> int:
        """How many of ``warm_contacts()`` have a connection now (``dht status``)."""
        host = self._ctx.host if self._ctx is not None else None
        return sum(host.connection_to(p) is not None for p in self.warm_contacts()) if host else 0

    def _on_identified(self, info: PeerInfo) -> None:
        """A DHT server (identify lists our protocol) enters the table; a peer in client mode never
        does (Kademlia spec: a lookup must not waste queries on it), nor one that stopped serving."""
        if self.table is None:
            return
        if self.serves_dht(info):
            self._add_contact(info.peer_id, dialable(info.addrs))
        elif self.table.get(info.peer_id) is not None:
            self.table.remove(info.peer_id)

    def serves_dht(self, info: PeerInfo | None) -> bool:
        """Does this peer's identify list our Kademlia protocol (a DHT server, not a client)?"""
        return info is not None and self.protocol_id in info.protocols

    def _admitted(self, peer: PeerId) -> bool:
        limits = self.ctx.host.limits
        if limits is not None and limits.is_banned(peer):
            return False
        info = self.ctx.host.peerstore.get(peer)
        return info is None or self.ctx.admit(info)

    def _add_contact(self, peer: PeerId, addrs: list[Multiaddr]) -> None:
        assert self.table is not None
        if not self._admitted(peer):
            return
        candidate = self.table.add(peer, addrs)
        if candidate is not None and candidate.failures:  # prefer live old peers; replace a failing one
            self.table.remove(candidate.peer)
            self.table.add(peer, addrs)
        self._table_changed.set()

    def _remember(self, peer: PeerId, addrs: list[Multiaddr]) -> None:
        if addrs and peer != self.ctx.host.peer_id:
            info = self.ctx.host.peerstore.get(peer)
            if info is None or not info.addrs:
                self.ctx.host.peerstore.add_addrs(peer, addrs[:8])

    async def _maintain(self) -> None:
        """Bootstrap (self-lookup once we know a peer), then refresh and republish periodically."""
        while self.table is not None and len(self.table) == 0:
            await self._table_changed.wait()
            self._table_changed = trio.Event()
        await self._safe_lookup(self.ctx.host.peer_id.multihash)
        assert self.table is not None
        for key in bucket_probe_keys(self.table.local_key, self.config.refresh_buckets):
            await self._safe_lookup(key)
        for delay in EARLY_SELF_LOOKUPS:  # peers that joined at the same time find each other
            await trio.sleep(delay)
            await self._safe_lookup(self.ctx.host.peer_id.multihash)
        last_refresh = last_republish = trio.current_time()
        while True:
            await trio.sleep(min(self.config.refresh_interval, self.config.republish_interval, 60.0))
            now = trio.current_time()
            if now - last_refresh >= self.config.refresh_interval:
                last_refresh = now
                await self._safe_lookup(os.urandom(32))
            if now - last_republish >= self.config.republish_interval:
                last_republish = now
                await self._republish()
            self._store().expire()
            self._dirty.set()  # expired records leave the disk with the next commit

    async def _safe_lookup(self, key: bytes) -> None:
        try:
            await self._lookup(key, protocol.FIND_NODE)
        except LatticeError as exc:
            log.debug("DHT maintenance lookup failed: %s", exc)

    async def _republish(self) -> None:
        now = time.time()
        for slot, record in list(self._published.items()):
            if record.expires_at <= now:
                del self._published[slot]
                continue
            await self._replicate(record)

    # -- requests to other peers
    async def _request(
        self, peer: PeerId, message: protocol.Message, body: bytes | None = None, echo: bytes | None = None
    ) -> protocol.Message:
        """One request and its reply; ``body`` is ``message`` already encoded and length-prefixed (a
        fan-out encodes once). ``echo``: ``message`` encoded; a reply of exactly these bytes is
        ``message`` itself (a replica echoing a stored PUT_VALUE), so it is not decoded again."""
        t0 = trio.current_time()
        try:
            return await self._request_inner(peer, message, body, echo)
        finally:
            self._observe("request", trio.current_time() - t0)

    async def _request_inner(
        self, peer: PeerId, message: protocol.Message, body: bytes | None, echo: bytes | None
    ) -> protocol.Message:
        host = self.ctx.host
        self.counters["requests_out"] += 1
        # a plain deadline scope: trio.fail_after is a generator context manager (hot: ~20 per put)
        with trio.CancelScope(deadline=trio.current_time() + self.config.request_timeout) as scope:
            pool = self._pools.setdefault(peer, [])
            stream = pool.pop() if pool else None
            fresh = stream is None or stream.failed or stream.remote_closed
            if fresh:  # the protocol proposal goes out with the request: no round trip of its own
                conn = await host.connect_peer(peer, timeout=self.config.request_timeout, route=False)
                stream = await host.new_stream(conn, [self.protocol_id], lazy=True)
            assert stream is not None
            try:
                if body is None:
                    body = _proto.delimited(protocol.encode(message))
                await stream.write(body)
                if fresh:
                    await multistream.confirm(stream, self.protocol_id)
                raw = await read_delimited(stream, protocol.MAX_MESSAGE)
                if raw is None:
                    raise TransportError("peer closed the DHT stream")
                reply = message if raw == echo else protocol.decode(raw)
            except BaseException:
                await stream.reset()
                raise
        if scope.cancelled_caught:
            raise trio.TooSlowError
        assert stream is not None  # the scope's body ran to its end
        if len(pool) < MAX_IDLE_STREAMS:
            pool.append(stream)
        else:
            await stream.close()
        return reply

    def _observe(self, op: str, seconds: float) -> None:
        slot = self.latency.setdefault(op, [0, 0.0])
        slot[0] += 1
        slot[1] += seconds

    async def _lookup(
        self,
        key: bytes,
        mtype: int,
        on_reply: Any = None,
        beta: int | None = None,
        answers: dict[PeerId, _Answer] | None = None,
        look: Lookup | None = None,
    ) -> Lookup:
        """Iterative lookup; ``on_reply(peer, reply)`` may return True to stop early. ``answers``: replies
        already requested from some peers (a store's PUT_VALUE asking for closer peers) that stand in
        for the query to them; one without peers (e.g. from a go/rust peer) falls back to a query.
        ``look``: the state to drive (from ``_new_lookup``; a store watches it while it runs)."""
        t0 = trio.current_time()
        look = look or self._new_lookup(key, beta)
        try:
            return await self._lookup_inner(key, mtype, on_reply, look, answers or {})
        finally:
            self._observe(_OP_NAMES.get(mtype, "lookup"), trio.current_time() - t0)

    def _new_lookup(self, key: bytes, beta: int | None = None) -> Lookup:
        """A lookup of ``key`` seeded with the routing table's closest contacts."""
        assert self.table is not None
        target = key_id(key)
        seeds = [(c.peer, c.key) for c in self.table.closest(target)]
        return Lookup(target, seeds, self.config.k, self.config.alpha, beta)

    async def _lookup_inner(
        self, key: bytes, mtype: int, on_reply: Any, look: Lookup, answers: dict[PeerId, _Answer]
    ) -> Lookup:
        assert self.table is not None
        me = self.ctx.host.peer_id
        send, receive = trio.open_memory_channel[tuple[PeerId, protocol.Message | None]](1024)

        async def query(peer: PeerId) -> None:
            reply: protocol.Message | None = None
            try:
                answer = answers.get(peer)
                if answer is not None:
                    await answer.done.wait()  # bounded: its request has the request timeout
                    reply = answer.reply
                    if reply is None:
                        raise TransportError("the PUT_VALUE to this peer failed")
                if reply is None or not reply.closer:
                    reply = await self._request(peer, protocol.Message(mtype, key))
            except (LatticeError, trio.TooSlowError, OSError) as exc:
                log.debug("DHT request to %s failed: %s", peer, exc)
                reply = None
            await send.send((peer, reply))

        async with trio.open_nursery() as nursery:
            for _ in range(10_000):  # bounded: each round answers one query
                for peer in look.next_queries():
                    nursery.start_soon(query, peer)
                if not look.in_flight:
                    break
                peer, reply = await receive.receive()
                if reply is None:
                    self.counters["failed_requests"] += 1
                    look.on_failure(peer)
                    self.table.failed(peer)
                    continue
                known = self.table.get(peer)
                self._add_contact(peer, known.addrs if known is not None else [])
                closer = []
                for entry in reply.closer:
                    if entry.peer != me:
                        self._remember(entry.peer, entry.addrs)
                        closer.append((entry.peer, peer_key(entry.peer)))
                look.on_response(peer, closer)
                if on_reply is not None and on_reply(peer, reply):
                    break
                if look.done:
                    break
            nursery.cancel_scope.cancel()
        return look

    # -- the public API
    async def put(
        self,
        key: bytes | str,
        value: bytes | str,
        ttl: float | None = 3600.0,
        *,
        expires_at: float | None = None,
        subkey: bytes | str | None = None,
    ) -> int:
        """Store a signed record on the k closest peers; returns how many stored it (incl. this node).

        Raises RecordError at once for a value over 64 KiB, a key or subkey this node may not write,
        or a record over this publisher's quota (QuotaExceeded: every node has the same default).
        """
        key = _as_key(key)
        value = _as_key(value)
        expires = expires_at if expires_at is not None else time.time() + (ttl or 3600.0)
        sub = _as_key(subkey) if subkey is not None else None
        record = records.create(self.ctx.host.keypair, key, value, expires, sub)
        self._store().check(record)
        self._published[(record.key, record.subkey)] = record
        return await self._replicate(record)

    async def _replicate(self, record: Record) -> int:
        """Store ``record`` on the k closest peers; returns how many of them (and this node) took it.

        Optimistic store: if the routing table holds every peer it was told of near the key (no
        bucket that could hold a closer peer is full: a small network), PUT_VALUE goes to the
        table's k closest at once, while the lookup runs; else to the k closest known once the
        lookup's first alpha replies came (at most 2k requests so); then the peers of the k closest
        found not yet sent to get it.

        Quorum: the put returns once ``store_quorum`` of the k closest known acknowledged (or, after
        the lookup, all of them answered); the lookup and the other requests go on in the background,
        so one slow first contact (~6 RTT on a wide-area link) or one lost packet (an RTO of
        >= 200 ms) does not hold up the caller. The count is honest: peers that acknowledged by then
        and are among the k closest known, and this node if it is one of them.
        """
        assert self.table is not None and self._background is not None
        background = self._background
        k = self.config.k
        target = key_id(record.key)
        message = protocol.Message(protocol.PUT_VALUE, record.key, record.key, record.encode())
        early = self._optimistic_targets(target) if self.config.optimistic_store else []
        # the lookup's first queries go to the table's alpha closest: their PUT_VALUE replies carry
        # the closer peers (WANT_CLOSER) and answer those queries
        answers = {peer: _Answer() for peer in early[: self.config.alpha]}
        asking = replace(message, want_closer=True)
        encoded = protocol.encode(message)  # once for every replica
        body = _proto.delimited(encoded)
        asking_body = _proto.delimited(protocol.encode(asking)) if answers else b""
        look = self._new_lookup(record.key, self.config.beta)
        acked: set[PeerId] = set()
        sent: set[PeerId] = set()
        ended: set[PeerId] = set()
        progress = [trio.Event()]  # set (and replaced) whenever a request or the lookup ends
        lookup_ended = trio.Event()

        def wake() -> None:
            progress[0].set()
            progress[0] = trio.Event()

        async def put_one(peer: PeerId) -> None:
            answer = answers.get(peer)
            self._replicating += 1
            try:
                if answer is None:
                    reply = await self._request(peer, message, body, encoded)
                else:
                    reply = await self._request(peer, asking, asking_body, encoded)
                if reply.record_value == message.record_value:
                    acked.add(peer)
                if answer is not None:
                    answer.reply = reply
            except (LatticeError, trio.TooSlowError, OSError):
                self.counters["failed_requests"] += 1
            except Exception:  # a task nobody awaits any more: a bug here must not end the service
                log.exception("DHT store request to %s failed", peer)
                self.counters["failed_requests"] += 1
            finally:
                self._replicating -= 1
                ended.add(peer)
                wake()
                if answer is not None:
                    answer.done.set()

        def send(peers: list[PeerId]) -> int:
            new = [p for p in peers if p not in sent]
            for peer in new:
                sent.add(peer)
                background.start_soon(put_one, peer)
            return len(new)

        replies, during = [0], [0]

        def on_reply(_peer: PeerId, _reply: protocol.Message) -> bool:
            """Store during the lookup: once the first alpha peers answered (near the key they know
            more than our table), the k closest known get the record at once; in a small network they
            are the final ones. At most 2k requests go out this way."""
            replies[0] += 1
            if self.config.optimistic_store and replies[0] >= self.config.alpha and len(sent) < 2 * k:
                during[0] += send(look.closest_known(k)[: 2 * k - len(sent)])
            return False

        async def find_and_send() -> None:
            t0 = trio.current_time()
            try:
                await self._lookup(record.key, protocol.FIND_NODE, on_reply, answers=answers, look=look)
            except LatticeError as exc:  # the peers it found so far still get the record
                log.debug("store lookup failed: %s", exc)
            except Exception:  # as in put_one: the service outlives a bug in a background task
                log.exception("DHT store lookup failed")
            finally:
                late = send(look.closest_known(k))
                lookup_ended.set()
                wake()
            self._timing("put_lookup_ms", (trio.current_time() - t0) * 1000)
            self._timing("put_lookup_queries", look.queries)
            self._timing("put_sent_during_lookup", during[0])
            self._timing("put_sent_late", late)

        t0 = trio.current_time()
        send(early)
        background.start_soon(find_and_send)
        quorum = self.config.store_quorum
        wait_all = quorum <= 0 or self._replicating > self.config.max_background_stores
        while True:
            closest = set(look.closest_known(k))
            got = len(acked & closest)
            if not wait_all and got >= quorum:
                break
            if lookup_ended.is_set() and closest <= ended:  # fewer than a quorum: all of them answered
                break
            await progress[0].wait()
        stored = got
        far = max((peer_key(p) ^ target for p in closest), default=0)
        if len(closest) < k or peer_key(self.ctx.host.peer_id) ^ target <= far:  # we are one of them
            try:
                stored += self._store().put(record, defer=True)
                self._dirty.set()
            except QuotaExceeded as exc:  # full of others' records: the replicas may take it
                log.info("this node did not keep its own record: %s", exc)
        self._timing("put_ms", (trio.current_time() - t0) * 1000)
        self._timing("put_sent_early", len(early))
        self._timing("put_early_unneeded", len(set(early) - closest))
        self._timing("put_pending_at_return", len(sent - ended))
        self._timing(
            "put_queries_answered_by_put", sum(bool(a.reply and a.reply.closer) for a in answers.values())
        )
        return stored

    def _optimistic_targets(self, target: int) -> list[PeerId]:
        """The table's k closest to ``target`` if the table cannot be missing a closer peer, else []."""
        assert self.table is not None
        candidates = self.table.closest(target, self.config.k)
        if not candidates:
            return []
        me = self.table.local_key
        reach = max(bucket_index(me, target), *(bucket_index(me, c.key) for c in candidates))
        return [c.peer for c in candidates] if self.table.complete_up_to(reach) else []

    def _timing(self, name: str, value: float) -> None:
        """Exponentially weighted average of a phase's duration (shown by `lattice-node dht status`)."""
        old = self.counters.get(name)
        self.counters[name] = round(value if old is None else 0.9 * old + 0.1 * value, 3)

    async def get(self, key: bytes | str, latest: bool = True, local: bool = False) -> list[Entry]:
        """Values under ``key``, one Entry per subkey (newest version), newest first.

        ``latest=False`` returns as soon as one peer answered with records (fastest);
        ``latest=True`` collects from up to 3 of the closest peers that hold the key;
        ``local=True`` asks nobody: what this node itself holds (is it a replica?).
        """
        key = _as_key(key)
        found: dict[bytes, Record] = {}
        holders: set[PeerId] = set()
        now = time.time()

        def merge(record: Record) -> None:
            old = found.get(record.subkey)
            if old is None or record.published_at > old.published_at:
                found[record.subkey] = record

        for record in self._store().get(key, now):
            merge(record)

        def on_reply(peer: PeerId, reply: protocol.Message) -> bool:
            got = self._records_from(reply, key, now)
            for record in got:
                merge(record)
            if got:
                holders.add(peer)
            return len(holders) >= (3 if latest else 1)

        if not local and (not found or latest):
            await self._lookup(key, protocol.GET_VALUE, on_reply)
        return sorted((_entry(r) for r in found.values()), key=lambda e: -e.published_at)

    def _records_from(self, reply: protocol.Message, key: bytes, now: float) -> list[Record]:
        if not reply.record_value:
            return []
        try:
            blobs = msgpack.unpackb(reply.record_value, raw=True, max_array_len=1024)
            if not isinstance(blobs, list):
                raise PayloadError("records must be a list")
        except Exception:
            self.counters["malformed"] += 1
            return []
        out = []
        for blob in blobs:
            try:
                record = Record.decode(blob) if isinstance(blob, bytes) else None
                if record is None or record.key != key:
                    raise RecordError("record for another key")
                records.validate(record, now)
            except RecordError:
                self.counters["rejected_records"] += 1
                continue
            out.append(record)
        return out

    async def provide(self, key: bytes | str) -> int:
        """Announce that this node holds ``key`` (content, a capability) to the k closest peers."""
        key = _as_key(key)
        host = self.ctx.host
        me = protocol.PeerEntry(host.peer_id, dialable(host.advertised_addrs()))
        try:
            self._store().add_provider(key, host.peer_id, [a.to_bytes() for a in me.addrs])
        except QuotaExceeded as exc:  # announced to the others all the same
            log.info("this node did not list itself as a provider: %s", exc)
        look = await self._lookup(key, protocol.FIND_NODE, beta=self.config.beta)
        message = protocol.Message(protocol.ADD_PROVIDER, key, providers=[me])
        sent = 0

        async def announce(peer: PeerId) -> None:
            nonlocal sent
            try:  # ADD_PROVIDER has no reply in libp2p: write and move on
                await self._send_only(peer, message)
                sent += 1
            except (LatticeError, trio.TooSlowError, OSError):
                self.counters["failed_requests"] += 1

        async with trio.open_nursery() as nursery:
            for peer in look.closest_known(self.config.k):
                nursery.start_soon(announce, peer)
        return sent

    def unprovide(self, key: bytes | str) -> bool:
        """Stop listing this node as a provider of ``key`` in our own store (Kademlia has no withdraw:
        the entries other peers hold expire after their TTL unless provide() is called again)."""
        return self._store().remove_provider(_as_key(key), self.ctx.host.peer_id)

    async def _send_only(self, peer: PeerId, message: protocol.Message) -> None:
        host = self.ctx.host
        with trio.fail_after(self.config.request_timeout):
            conn = await host.connect_peer(peer, timeout=self.config.request_timeout, route=False)
            stream = await host.new_stream(conn, [self.protocol_id])
            body = protocol.encode(message)
            await stream.write(_proto.delimited(body), fin=True)

    async def find_providers(self, key: bytes | str, count: int = 20) -> list[tuple[str, list[str]]]:
        """Peers that announced ``key``: [(peer id, [multiaddrs])]."""
        key = _as_key(key)
        found: dict[PeerId, list[Multiaddr]] = {}
        for peer, raw in self._store().get_providers(key):
            found[peer] = _parse_addrs(raw)

        def on_reply(peer: PeerId, reply: protocol.Message) -> bool:
            for entry in reply.providers:
                found.setdefault(entry.peer, entry.addrs)
                self._remember(entry.peer, entry.addrs)
            return len(found) >= count

        if len(found) < count:
            await self._lookup(key, protocol.GET_PROVIDERS, on_reply)
        return [(str(p), [str(a) for a in addrs]) for p, addrs in list(found.items())[:count]]

    async def find_peer(self, peer: PeerId | str) -> list[Multiaddr]:
        """The addresses the network knows for ``peer`` (FIND_NODE of its id), fresh from the peers
        closest to it; they replace what our peerstore had (a NATed peer's relays change)."""
        target = PeerId.from_string(peer) if isinstance(peer, str) else peer
        found: list[Multiaddr] = []

        def on_reply(_from: PeerId, reply: protocol.Message) -> bool:
            for entry in reply.closer:
                if entry.peer == target and entry.addrs:
                    found.extend(a for a in entry.addrs if a not in found)
            # enough once an address reachable from anywhere shows up (a relayed or public one);
            # private addresses alone may be stale news from a peer that missed an update
            return any(a.is_relayed or (a.tcp_target() is not None and is_public(a)) for a in found)

        await self._lookup(target.multihash, protocol.FIND_NODE, on_reply)
        if found:
            store = self.ctx.host.peerstore
            known = store.get(target)
            store.add_addrs(target, dialable(found + (known.addrs if known else [])), replace=True)
        return found

    async def _route_peer(self, peer: PeerId) -> list[Multiaddr]:
        # No recursion: the lookup's own requests dial with route=False (_request_inner).
        try:
            return await self.find_peer(peer)
        except (LatticeError, trio.TooSlowError) as exc:
            log.debug("peer lookup of %s failed: %s", peer, exc)
            return []

    # -- serving
    async def _handle(self, stream: Stream) -> None:
        peer = stream.remote_peer
        host = self.ctx.host
        conn = host.connection_to(peer)
        info = host.peerstore.get(peer)
        if self.serves_dht(info):  # a client's requests are served, it is not a contact (spec)
            self._add_contact(
                peer,
                dialable(info.addrs if info else [])
                or ([conn.remote_addr] if conn is not None and conn.direction == "outbound" else []),
            )
        # one scope for the stream (cheaper than a scope per request); its deadline is moved only when
        # less than half of it is left, so an idle stream is closed after 30-60 s
        with trio.CancelScope() as idle:
            for _ in range(MAX_REQUESTS_PER_STREAM):
                now = trio.current_time()
                if idle.deadline - now < IDLE_STREAM_TIMEOUT / 2:
                    idle.deadline = now + IDLE_STREAM_TIMEOUT
                raw = await read_delimited(stream, protocol.MAX_MESSAGE)
                if raw is None:
                    return
                self.counters["requests_in"] += 1
                if not host.allow_request(peer, self.protocol_id):  # over its rate: drop the stream
                    self.counters["throttled"] = self.counters.get("throttled", 0) + 1
                    await stream.reset()
                    return
                try:
                    request = protocol.decode(raw)
                except PayloadError:
                    self.counters["malformed"] += 1
                    host.penalize(peer, "malformed DHT message")
                    await stream.reset()
                    return
                reply = self._answer(request, peer)
                if reply is REFUSED:  # as go-libp2p-kad-dht's server does (its putter expects it)
                    await stream.reset()
                    return
                if reply is None:
                    continue
                if reply is request:  # a stored PUT_VALUE: echo the request's bytes (as go-libp2p does)
                    await stream.write(_proto.delimited(raw))
                    continue
                body = protocol.encode(reply)
                await stream.write(_proto.delimited(body))

    def _closer(self, key: bytes, requester: PeerId) -> list[protocol.PeerEntry]:
        assert self.table is not None
        return [protocol.PeerEntry(c.peer, c.addrs[:4]) for c in
                self.table.closest(key_id(key), self.config.k, exclude={requester})]  # fmt: skip

    def _find_node(self, key: bytes, requester: PeerId) -> list[protocol.PeerEntry]:
        """Closest contacts; the peer named by ``key`` leads if we know it (ourselves included).

        go-libp2p-kad-dht adds a new DHT server to its table only if FIND_NODE(server's own id) lists
        somebody: a lone node (a bootstrap node) must list itself (found by tests/test_interop_go.py).
        """
        closer = self._closer(key, requester)
        host = self.ctx.host
        named: protocol.PeerEntry | None = None
        if key == host.peer_id.multihash:
            named = protocol.PeerEntry(host.peer_id, dialable(host.advertised_addrs(), 6))
        else:
            try:
                peer = PeerId(key)
            except LatticeError:
                peer = None
            info = host.peerstore.get(peer) if peer is not None and peer != requester else None
            if peer is not None and info is not None and info.addrs:
                named = protocol.PeerEntry(peer, dialable(info.addrs, 6))
        if named is not None:
            closer = [named, *(e for e in closer if e.peer != named.peer)][: self.config.k]
        return closer

    def _answer(self, req: protocol.Message, requester: PeerId) -> protocol.Message | None:
        """The reply to ``req``: a message, None (no reply: ADD_PROVIDER) or REFUSED (reset)."""
        key = req.key
        if req.type == protocol.PING:
            return protocol.Message(protocol.PING)
        if req.type == protocol.FIND_NODE:
            return protocol.Message(protocol.FIND_NODE, key, closer=self._find_node(key, requester))
        if req.type == protocol.GET_VALUE:
            blobs, size = [], 0
            for record in self._store().get(key):
                blob = record.encode()
                if size + len(blob) > MAX_REPLY_RECORDS:
                    break
                blobs.append(blob)
                size += len(blob)
            value = msgpack.packb(blobs) if blobs else None
            return protocol.Message(protocol.GET_VALUE, key, key if blobs else None, value,
                                    closer=self._closer(key, requester))  # fmt: skip
        if req.type == protocol.PUT_VALUE:
            try:
                record = Record.decode(req.record_value or b"")
                if record.key != key:
                    raise RecordError("record key does not match the request key")
                prefix = self._prefix_of(requester)
                stored = self._store().put(record, defer=True, prefix=prefix)  # committed behind
                self._dirty.set()
            except QuotaExceeded as exc:
                self._refused(requester, exc)
                stored = False
            except RecordError as exc:
                self.counters["rejected_records"] += 1
                log.debug("rejected record from %s: %s", requester, exc)
                stored = False
            closer = self._find_node(key, requester) if req.want_closer else []
            if not stored:
                # go/rust putters expect the record echoed or the stream reset (an empty reply made
                # p2pd panic); a Lattice putter asking for closer peers gets them without the record
                return protocol.Message(protocol.PUT_VALUE, key, closer=closer) if closer else REFUSED
            if not closer:
                return req  # the reply to a stored record is the request itself (libp2p)
            return protocol.Message(protocol.PUT_VALUE, key, key, req.record_value, closer=closer)
        if req.type == protocol.ADD_PROVIDER:
            for entry in req.providers:
                if entry.peer == requester:  # a peer may only announce itself
                    try:
                        addrs = [a.to_bytes() for a in entry.addrs]
                        self._store().add_provider(key, entry.peer, addrs, prefix=self._prefix_of(requester))
                    except QuotaExceeded as exc:
                        self._refused(requester, exc)
                        continue
                    self._remember(entry.peer, entry.addrs)
            return None
        if req.type == protocol.GET_PROVIDERS:
            providers = [protocol.PeerEntry(p, _parse_addrs(a)) for p, a in self._store().get_providers(key)]
            return protocol.Message(protocol.GET_PROVIDERS, key, providers=providers[: protocol.MAX_PEERS],
                                    closer=self._closer(key, requester))  # fmt: skip
        return None

    def _prefix_of(self, peer: PeerId) -> str | None:
        """The IP prefix budgets charge ``peer`` to (None: exempt address, e.g. loopback, or unknown)."""
        host = self.ctx.host
        conn = host.connection_to(peer)
        limits = getattr(host, "limits", None)
        if conn is None or limits is None:
            return None
        return limits.prefix_of(conn.remote_addr.ip)

    def _refused(self, peer: PeerId, exc: QuotaExceeded) -> None:
        """Count a refusal over a quota; a peer that keeps sending after its grace is misbehaving."""
        self.counters["quota_refused"] += 1
        name = f"quota_refused_{exc.scope}"
        self.counters[name] = self.counters.get(name, 0) + 1
        log.debug("refused a DHT write of %s: %s", peer, exc)
        now = time.monotonic()
        bucket = self._refusals.get(peer)
        if bucket is None:
            if len(self._refusals) >= 4096:
                self._refusals.pop(next(iter(self._refusals)))
            grace = TokenBucket(self.config.quota_grace_per_s, self.config.quota_grace, now)
            bucket = self._refusals[peer] = grace
        if not bucket.take(now):
            reason = f"keeps writing over its DHT quota ({exc.scope})"
            self.ctx.host.penalize(peer, reason, PENALTY_THROTTLED)

    # -- control operations
    async def _op_put(
        self, key: str, value: bytes | str, ttl: float = 3600.0, subkey: str | None = None
    ) -> int:
        return await self.put(key, value, ttl, subkey=subkey)

    async def _op_get(self, key: str, latest: bool = True, local: bool = False) -> list[dict]:
        return [e.as_dict() for e in await self.get(key, latest, local)]

    async def _op_provide(self, key: str) -> int:
        return await self.provide(key)

    async def _op_providers(self, key: str, count: int = 20) -> list:
        return [list(p) for p in await self.find_providers(key, count)]

    async def _op_status(self) -> dict:
        return self.stats()

    def stats(self) -> dict:
        """Routing table and store sizes, requests and refusals counted since start, phase timings
        and operation latencies (JSON-able: ``dht status``, /metrics)."""
        return {
            "protocol": self.protocol_id,
            "routing_table": len(self.table) if self.table is not None else 0,
            "warm_contacts": self.connected_contacts(),
            "warm_target": len(self.warm_contacts()),
            **self.store_status(),
            **{k: v for k, v in self.counters.items() if isinstance(v, int | float)},
            "latency": {op: {"count": c, "sum_s": round(s, 6)} for op, (c, s) in self.latency.items()},
        }

    def store_status(self) -> dict:
        """What the store holds against its quotas (``dht status``, /metrics)."""
        store = self.store
        if store is None:
            return {"records": 0, "stored_bytes": 0, "providers": 0}
        return {"records": store.record_count, "stored_bytes": store.stored_bytes,
                "max_bytes": store.limits.max_bytes, "providers": store.provider_count,
                "evicted": store.evicted}  # fmt: skip


def _parse_addrs(raw: list) -> list[Multiaddr]:
    out = []
    for a in raw[:8]:
        try:
            out.append(Multiaddr.from_bytes(a))
        except LatticeError:
            continue
    return out
