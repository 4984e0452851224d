"""The pubsub service: :class:`GossipRouter` driven over libp2p streams (``/meshsub/1.1.0``).

Messages are signed (libp2p StrictSign: publisher, sequence number, Ed25519 signature) and those
received are verified before the application sees them, unless ``sign=False`` (StrictNoSign). Like
libp2p gossipsub, each peer pair has one long-lived outbound stream per direction; RPCs are
uvarint-framed protobufs of at most 1 MiB. Every peer has a bounded outbound queue (``MAX_QUEUE``
RPCs, coalesced into one write when the writer catches up): when a slow peer fills it, new RPCs to it
are dropped and counted, never buffered without bound (applications with a repair path, like the
CRDT's anti-entropy, recover them). The router's heartbeat runs every second.

    node.pubsub.subscribe("chat", lambda peer, data: print(peer, data))   # handler returns False
    node.pubsub.publish("chat", b"hello")                                 # to reject (not forwarded)
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import trio

from lattice import _proto
from lattice.errors import LatticeError, PayloadError, TransportError
from lattice.identity import PeerId
from lattice.service import ServiceContext
from lattice.transport.framing import read_delimited
from lattice.transport.host import Connection
from lattice.transport.limits import TokenBucket
from lattice.transport.peerstore import PeerInfo
from lattice.transport.stream import Stream

from . import protocol
from .protocol import RPC, Message
from .router import HEARTBEAT, GossipRouter

log = logging.getLogger(__name__)

MAX_QUEUE = 32
PEER_RATE = 2 << 20  # work units (RPC bytes + 64 per control item) one peer may cost us per second ...
PEER_BURST = 8 << 20  # ... and at once: beyond it we stop reading its stream for a while
Handler = Callable[[PeerId, bytes], bool | None]


class PubSub:
    name = "pubsub"

    def __init__(
        self, sign: bool = True, peer_rate: float = PEER_RATE, peer_burst: float = PEER_BURST
    ) -> None:
        self.sign = sign
        self.peer_rate = peer_rate
        self.peer_burst = peer_burst
        self._seqno = time.time_ns()  # as go-libp2p: unique across restarts, then incremented
        self.router: GossipRouter[PeerId] = GossipRouter()
        self._ctx: ServiceContext | None = None
        self._handlers: dict[str, Handler] = {}
        self._queues: dict[PeerId, trio.MemorySendChannel[RPC]] = {}
        self._nursery: trio.Nursery | None = None
        self.counters = {"rpcs_in": 0, "rpcs_out": 0, "dropped": 0, "bad_rpcs": 0, "bad_signatures": 0}

    @property
    def ctx(self) -> ServiceContext:
        if self._ctx is None:
            raise LatticeError("the pubsub service is not running")
        return self._ctx

    def stats(self) -> dict:
        """Messages and refusals counted since start, the router's included (JSON-able)."""
        return {**self.counters, **self.router.stats}

    async def run(self, ctx: ServiceContext, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        self._ctx = ctx
        for proto in protocol.PROTOCOLS:
            ctx.host.set_stream_handler(proto, self._handle)
        ctx.host.on_identify(self._on_identify)
        ctx.host.on_disconnect(self._on_disconnect)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._heartbeat)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None

    # -- API
    def subscribe(self, topic: str, handler: Handler) -> None:
        """Receive the topic's messages: ``handler(from_peer, data)`` runs on the node's loop; a
        False return rejects the message (it is not forwarded)."""
        if not 0 < len(topic) <= protocol.MAX_TOPIC:
            raise PayloadError("bad topic")
        self._handlers[topic] = handler
        self.router.subscribe(topic)
        self._flush()

    def unsubscribe(self, topic: str) -> None:
        self._handlers.pop(topic, None)
        self.router.unsubscribe(topic)
        self._flush()

    def publish(self, topic: str, data: bytes) -> bytes:
        """Send ``data`` to the topic's subscribers; returns the message id."""
        if len(data) + len(topic) + 64 > protocol.MAX_RPC:
            raise PayloadError(f"a pubsub message of {len(data)} bytes is over the 1 MiB limit")
        message = None
        if self.sign:
            self._seqno += 1
            message = protocol.signed(self.ctx.host.keypair, topic, bytes(data), self._seqno)
        mid = self.router.publish(topic, bytes(data), trio.current_time(), message)
        self._flush()
        return mid

    def peers(self, topic: str) -> list[PeerId]:
        """Peers known to be subscribed to ``topic``."""
        return [p for p, topics in self.router.peer_topics.items() if topic in topics]

    # -- events
    def _on_identify(self, info: PeerInfo) -> None:
        if self._nursery is None or info.peer_id in self._queues:
            return
        if any(p in info.protocols for p in protocol.PROTOCOLS):
            self._start_peer(info.peer_id)

    def _on_disconnect(self, conn: Connection) -> None:
        peer = conn.remote_peer
        if self.ctx.host.connection_to(peer) is None:
            queue = self._queues.pop(peer, None)
            if queue is not None:
                queue.close()
            self.router.remove_peer(peer)

    def _start_peer(self, peer: PeerId) -> None:
        if self._nursery is None or peer in self._queues:
            return  # (a second start would orphan the first writer's queue)
        send, receive = trio.open_memory_channel[RPC](MAX_QUEUE)
        try:
            self._nursery.start_soon(self._writer, peer, receive)
        except RuntimeError:  # shutting down
            return
        self._queues[peer] = send
        self.router.add_peer(peer)
        self._flush()

    def _flush(self) -> None:
        for peer, rpc in self.router.drain():
            queue = self._queues.get(peer)
            if queue is None:
                continue
            try:
                queue.send_nowait(rpc)
            except trio.WouldBlock:
                self.counters["dropped"] += 1
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                pass  # the peer's writer ended (its stream failed): it unregisters the queue itself

    async def _heartbeat(self) -> None:
        while True:
            await trio.sleep(HEARTBEAT)
            self.router.heartbeat(trio.current_time())
            self._flush()

    # -- I/O
    async def _writer(self, peer: PeerId, queue: trio.MemoryReceiveChannel[RPC]) -> None:
        stream: Stream | None = None
        try:
            async with queue:
                async for first in queue:
                    batch = [first]
                    while len(batch) < MAX_QUEUE:  # coalesce what queued up meanwhile
                        try:
                            batch.append(queue.receive_nowait())
                        except trio.WouldBlock:
                            break
                    merged = RPC()
                    for rpc in batch:
                        if (
                            not merged.empty()
                            and merged.size_hint() + rpc.size_hint() > protocol.MAX_RPC // 2
                        ):
                            stream = await self._write(peer, stream, merged)
                            merged = RPC()
                        merged.merge(rpc)
                    stream = await self._write(peer, stream, merged)
        except (LatticeError, trio.TooSlowError) as exc:
            log.debug("pubsub stream to %s failed: %s", peer, exc)
        finally:
            if self._queues.get(peer) is not None:
                self._queues.pop(peer).close()
                self.router.remove_peer(peer)
                if self.ctx.host.connection_to(peer) is not None and self._nursery is not None:
                    with contextlib.suppress(RuntimeError):  # unless shutting down
                        self._nursery.start_soon(self._restart, peer)
            if stream is not None:
                with trio.CancelScope(shield=True):
                    await stream.reset()

    async def _restart(self, peer: PeerId) -> None:
        """A broken stream on a live connection: start over (subscriptions, mesh) after a pause."""
        await trio.sleep(1.0)
        info = self.ctx.host.peerstore.get(peer)
        speaks = info is not None and any(p in info.protocols for p in protocol.PROTOCOLS)
        if speaks and peer not in self._queues and self.ctx.host.connection_to(peer) is not None:
            self._start_peer(peer)

    async def _write(self, peer: PeerId, stream: Stream | None, rpc: RPC) -> Stream:
        with trio.fail_after(10):
            if stream is None:
                stream = await self.ctx.host.new_stream(peer, protocol.PROTOCOLS)
            body = protocol.encode(rpc)
            await stream.write(_proto.delimited(body))
        self.counters["rpcs_out"] += 1
        return stream

    async def _handle(self, stream: Stream) -> None:
        peer = stream.remote_peer
        if peer not in self._queues and self._nursery is not None:
            self._start_peer(peer)  # it talks pubsub: talk back (identify may not have run yet)
        bucket = TokenBucket(self.peer_rate, self.peer_burst, trio.current_time())
        try:
            for _ in range(1 << 62):  # the stream lives as long as the connection
                raw = await read_delimited(stream, protocol.MAX_RPC)
                if raw is None:
                    return
                rpc = protocol.decode(raw)
                self.counters["rpcs_in"] += 1
                self.router.handle(peer, rpc, trio.current_time(), self._deliver)
                self._flush()
                await self._pace(bucket, len(raw) + 64 * rpc.items())
        except (PayloadError, TransportError) as exc:
            self.counters["bad_rpcs"] += 1
            log.debug("pubsub stream from %s: %s", peer, exc)
            await stream.reset()

    async def _pace(self, bucket: TokenBucket, cost: int) -> None:
        """Charge one RPC's work to its peer; over the peer's rate, stop reading its stream until
        the bucket refills (backpressure through the stream window, nothing dropped): one peer's
        flood of large control messages cannot take the CPU from the others."""
        now = trio.current_time()
        if bucket.take(now, cost):
            return
        self.counters["paced"] = self.counters.get("paced", 0) + 1
        await trio.sleep(min(10.0, (cost - bucket.tokens) / bucket.rate))
        bucket.take(trio.current_time(), min(cost, bucket.burst))

    def _deliver(self, peer: Any, message: Message) -> bool:
        handler = self._handlers.get(message.topic)
        if handler is None:
            return False
        if self.sign and not message.verify():
            self.counters["bad_signatures"] += 1
            return False
        try:
            return handler(peer, message.data) is not False
        except Exception:
            log.exception("pubsub handler for %s failed", message.topic)
            return False


__all__ = ["PubSub"]
