"""The RPC service: named methods, unary and streaming calls, tensors as payloads.

Serving::

    @node.rpc.method("math.add")
    async def add(payload, ctx):            # sync functions work too (run in a worker thread)
        return payload["a"] + payload["b"]

    @node.rpc.method("data.chunks", stream="server")
    async def chunks(payload, ctx):         # server streaming: an async generator
        for i in range(payload):
            yield np.full(4, i)

Calling::

    await node.rpc.call(peer, "math.add", {"a": x, "b": y}, timeout=10)
    async with node.rpc.call_stream(peer, "data.chunks", 3) as chunks:
        async for chunk in chunks: ...
    await node.rpc.call_client_stream(peer, "sum", async_iterable_of_tensors)
    async with node.rpc.open_stream(peer, "chat") as s: await s.send(x); y = await s.receive()

Each call is one Yamux stream; the caller's protocol negotiation, request and half-close travel in
one write. A timeout or cancellation resets that stream only (the connection stays usable) and the
handler on the other side is cancelled.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio

from lattice.codec import tensors
from lattice.errors import LatticeError, NegotiationError, PayloadError, StreamError
from lattice.identity import PeerId
from lattice.rpc import lane, wire
from lattice.rpc.errors import (
    MethodNotFound,
    OverLimit,
    Overloaded,
    RemoteCallError,
    RemoteError,
    RPCError,
    RPCTimeout,
)
from lattice.service import ServiceContext
from lattice.transport import multistream
from lattice.transport.limits import PENALTY_THROTTLED
from lattice.transport.locks import FairSemaphore
from lattice.transport.resources import Lease, ResourceLimitExceeded
from lattice.transport.stream import Stream

log = logging.getLogger(__name__)

PROTOCOL_ID = "/lattice/rpc/1.0.0"
STREAM_KINDS = ("unary", "server", "client", "bidi")


@dataclass
class RPCConfig:
    """The RPC service's limits (docs/operators.md, "RPC calls and resumable uploads"). A node's RPC built
    without an explicit config takes the ``rpc_*`` keys of its NodeConfig."""

    max_message: int = 4 << 30  # hard cap on one message, whatever the method (checked before allocating)
    max_payload: int = 16 << 20  # a method's message limit unless it registers its own (max_payload=)
    max_inflight_per_peer: int = 64  # outbound calls to one peer at once (more wait); <= peers' inbound cap
    max_inbound_calls: int = 2048  # inbound calls in progress, node-wide ...
    max_inbound_per_peer: int = 64  # ... and from one peer (more are refused: "Overloaded")
    min_inbound_per_peer: int = 4  # calls a peer may have even when the node-wide cap is reached
    message_idle_timeout: float = 30.0  # an inbound message that makes no progress this long is reset
    default_timeout: float = 60.0
    upload_max_bytes: int = 8 << 30  # resumable uploads staged here, all peers (lattice.rpc.resumable) ...
    upload_peer_bytes: int = 2 << 30  # ... by one peer
    upload_peer_count: int = 8  # uploads in progress from one peer
    upload_first_chunk_timeout: float = 30.0  # staging that gets no data is dropped after this ...
    upload_ttl: float = 300.0  # ... and after this long without a new chunk (a re-begin does not count)


@dataclass
class CallContext:
    """What a handler knows about the call."""

    peer: PeerId
    method: str


@dataclass
class _Method:
    fn: Callable[..., Any]
    kind: str
    takes_ctx: bool
    is_async: bool
    codec: str | None
    max_payload: int | None  # None: RPCConfig.max_payload


class _Inbound:
    """One inbound call on its own stream: its method once known, the memory reserved for its
    current message, and the stream's byte count when the idle reaper last saw it move."""

    __slots__ = ("entry", "lease", "mark", "method", "peer", "since", "stream")

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.peer: PeerId = stream.remote_peer
        self.entry: _Method | None = None
        self.method: str | None = None
        self.lease: Lease | None = None
        self.mark = 0
        self.since = 0.0

    def close(self) -> None:
        if self.lease is not None:
            self.lease.close()


class RPCStream:
    """A bidirectional message stream (``open_stream`` on the caller, ``stream="bidi"`` handlers)."""

    def __init__(
        self,
        stream: Stream,
        max_message: int,
        codec: str | None,
        as_torch: bool | None,
        source: Callable[[], Awaitable[wire.Message]] | None = None,
        on_error: Callable[[], Awaitable[None]] | None = None,
        prefix: bytes = b"",
        confirm: Callable[[], Awaitable[None]] | None = None,
    ):
        self._stream = stream
        self._max = max_message
        self._codec = codec
        self._as_torch = as_torch
        self._source = source  # the callee reads through its admission (limits, budget, idle reaper)
        self._on_error = on_error  # the caller: after a failed send, read why the callee refused
        self._sent_end = False
        self._got_end = False
        self._prefix = prefix  # the caller's call header rides on its first write
        self._confirm = confirm  # the caller: read the callee's protocol answer before its replies

    @property
    def opened(self) -> bool:
        """The callee's protocol answer was read (the caller's side; always True on the callee's)."""
        return self._confirm is None

    async def open(self) -> None:
        """Caller side: send the call header if nothing was sent yet, then read the callee's
        protocol answer (once; before the first receive)."""
        confirm, self._confirm = self._confirm, None
        if confirm is not None:
            if self._prefix:
                prefix, self._prefix = self._prefix, b""
                await self._stream.write(prefix)
            await confirm()

    async def send(self, value: Any, codec: str | None = None) -> None:
        if self._sent_end:
            raise RPCError("send after done_sending()")
        prefix, self._prefix = self._prefix, b""
        await wire.send(
            self._stream,
            wire.MSG,
            value,
            has_value=True,
            codec=codec or self._codec,
            prefix=prefix,
            on_error=self._on_error,
        )

    async def done_sending(self) -> None:
        if not self._sent_end:
            self._sent_end = True
            prefix, self._prefix = self._prefix, b""
            await wire.send_end(self._stream, prefix=prefix)

    async def receive(self) -> Any:
        """The next value; raises EndOfStream when the peer is done sending."""
        if self._confirm is not None:
            await self.open()
        if self._got_end:
            raise trio.EndOfChannel
        if self._source is not None:
            message = _raise_error(await self._source())
        else:
            message = await _receive(self._stream, self._max, self._as_torch)
        if message.kind == wire.END:
            self._got_end = True
            raise trio.EndOfChannel
        if message.kind != wire.MSG:
            raise PayloadError(f"unexpected {message.kind!r} message")
        self._got_end = message.last
        return message.value

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Any]:
        while True:
            try:
                yield await self.receive()
            except trio.EndOfChannel:
                return


class RPC:
    """The RPC service of a node (``node.rpc``)."""

    name = "rpc"

    def __init__(self, config: RPCConfig | None = None, protocol_id: str = PROTOCOL_ID) -> None:
        self.config = config or RPCConfig()
        self.protocol_id = protocol_id
        self._methods: dict[str, _Method] = {}
        self._ctx: ServiceContext | None = None
        self._slots: dict[PeerId, FairSemaphore] = {}
        self._inbound = 0  # inbound calls in progress (own streams and fast lanes) ...
        self._inbound_peers: dict[PeerId, int] = {}  # ... per peer
        self._receiving: dict[_Inbound, None] = {}  # inbound messages in progress (the idle reaper's)
        self._nursery: trio.Nursery | None = None
        self._lanes: dict[PeerId, lane.Lane] = {}
        self._lane_locks: dict[PeerId, trio.Lock] = {}
        self._no_lane: set[PeerId] = set()
        self._addr_peers: dict[str, PeerId] = {}  # peer text (multiaddr or id) -> id (parsed once)
        from lattice.rpc.resumable import Uploads

        self.uploads = Uploads(self)
        self.counters = {"calls_out": 0, "calls_in": 0, "errors_out": 0, "errors_in": 0, "rejected": 0,
                         "refused_size": 0, "refused_memory": 0, "malformed": 0, "idle_reset": 0}  # fmt: skip

    # -- lifecycle
    @property
    def ctx(self) -> ServiceContext:
        if self._ctx is None:
            raise RPCError("the RPC service is not running")
        return self._ctx

    async def run(self, ctx: ServiceContext, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        self._ctx = ctx
        ctx.host.set_stream_handler(self.protocol_id, self._serve)
        ctx.host.set_stream_handler(lane.PROTOCOL_ID, self._serve_lane)
        ctx.add_control_op("rpc.call", self._op_call)
        ctx.add_control_op("rpc.methods", self._op_methods)
        ctx.add_control_op("rpc.bench", self._op_bench)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery  # the lanes' reply readers
            nursery.start_soon(self._reap_idle)
            task_status.started()
            await trio.sleep_forever()

    def stats(self) -> dict:
        """Calls and refusals counted since start, and the calls in progress (JSON-able)."""
        lanes = sum(1 for fast in self._lanes.values() if not fast.closed)
        return {**self.counters, "inbound_calls": self._inbound, "lanes": lanes}

    # -- control operations (lattice.Client.rpc)
    async def _op_call(
        self,
        peer: str,
        method: str,
        payload: Any = None,
        timeout: float | None = None,
        codec: str | None = None,
    ) -> Any:
        return await self.call(peer, method, payload, timeout=timeout, codec=codec, as_torch=False)

    async def _op_methods(self) -> list[str]:
        return self.methods

    async def _op_bench(
        self, peer: str, size: int, count: int = 5, direction: str = "up", concurrency: int = 1
    ):
        from lattice.rpc import bench

        return await bench.run(self, peer, size, count, direction, concurrency)

    # -- registration
    def register(
        self,
        name: str,
        fn: Callable[..., Any],
        *,
        stream: str | None = None,
        codec: str | None = None,
        max_payload: int | None = None,
    ) -> None:
        """Serve ``fn`` as ``name``. ``stream``: None/"unary", "server", "client" or "bidi".

        ``fn(payload)`` or ``fn(payload, ctx)``; for "client" the payload is an async iterator of the
        caller's values; for "bidi" the first argument is an :class:`RPCStream`. ``codec`` compresses
        the float tensors of replies. ``max_payload``: the largest message a caller may send (tensor
        bytes, compressed ones counted decoded; default ``RPCConfig.max_payload``): larger ones are
        refused before any byte is read, and a message's bytes are reserved from the caller's and
        the node's memory budget while the call holds them.
        """
        if max_payload is not None and (not isinstance(max_payload, int) or max_payload < 0):
            raise ValueError("max_payload must be a non-negative number of bytes")
        kind = stream or "unary"
        if kind not in STREAM_KINDS:
            raise ValueError(f"stream must be one of {STREAM_KINDS}")
        if not name or len(name) > 256:
            raise ValueError("method names are 1-256 characters")
        if name in self._methods:
            raise ValueError(f"method {name!r} is already registered")
        params = [
            p
            for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        is_gen = inspect.isasyncgenfunction(fn)
        if kind == "server" and not is_gen:
            raise ValueError("a server-streaming method must be an async generator")
        is_async = inspect.iscoroutinefunction(fn) or is_gen
        if kind in ("client", "bidi") and not is_async:
            raise ValueError("client-streaming and bidirectional methods must be async")
        self._methods[name] = _Method(fn, kind, len(params) >= 2, is_async, codec, max_payload)

    def method(
        self,
        name: str,
        *,
        stream: str | None = None,
        codec: str | None = None,
        max_payload: int | None = None,
    ):
        """Decorator form of :meth:`register`."""

        def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
            self.register(name, fn, stream=stream, codec=codec, max_payload=max_payload)
            return fn

        return decorate

    def lookup(self, name: Any) -> _Method | None:
        """The registered method ``name`` (None if there is none)."""
        return self._methods.get(name) if isinstance(name, str) else None

    @property
    def methods(self) -> list[str]:
        return sorted(self._methods)

    # -- client side
    async def _resolve(self, peer: PeerId | str) -> tuple[PeerId, Any]:
        """(peer id, live connection), dialing a multiaddr or a known address if needed."""
        host = self.ctx.host
        if isinstance(peer, str) and peer.startswith("/"):
            known = self._addr_peers.get(peer)  # a live connection to its peer: no parse, no dial
            conn = host.connection_to(known) if known is not None else None
            if conn is None:
                conn = await host.connect(peer)
                self._remember(peer, conn.remote_peer)
            return conn.remote_peer, conn
        if isinstance(peer, PeerId):
            peer_id = peer
        else:
            known = self._addr_peers.get(peer)
            peer_id = known if known is not None else self._remember(peer, PeerId.from_string(peer))
        return peer_id, await host.connect_peer(peer_id)

    def _remember(self, text: str, peer_id: PeerId) -> PeerId:
        """Cache what a peer text (multiaddr or id) names, bounded."""
        if len(self._addr_peers) >= 1024:
            self._addr_peers.clear()
        self._addr_peers[text] = peer_id
        return peer_id

    async def _slot(self, peer_id: PeerId) -> FairSemaphore:
        slots = self._slots.get(peer_id)
        if slots is None:
            slots = self._slots[peer_id] = FairSemaphore(self.config.max_inflight_per_peer)
        if not slots.try_acquire():  # uncontended: no scheduler round trip
            await slots.acquire()
        return slots

    async def _open(self, peer: PeerId | str) -> tuple[Stream, FairSemaphore]:
        """A call's stream (its protocol proposed lazily: see _confirm) and the peer's call slot."""
        peer_id, conn = await self._resolve(peer)
        slots = await self._slot(peer_id)
        try:
            stream = await self.ctx.host.new_stream(conn, [self.protocol_id], lazy=True)
        except BaseException:
            slots.release()
            raise
        return stream, slots

    async def _lane_to(self, peer_id: PeerId, conn: Any) -> lane.Lane | None:
        """The peer's fast lane (opened on first use), or None if the peer has none."""
        current = self._lanes.get(peer_id)
        if current is not None and not current.closed and current.stream.session is conn.session:
            return current
        if peer_id in self._no_lane or self._nursery is None:
            return None
        lock = self._lane_locks.setdefault(peer_id, trio.Lock())
        async with lock:
            current = self._lanes.get(peer_id)
            if current is not None and not current.closed and current.stream.session is conn.session:
                return current
            try:
                stream = await self.ctx.host.new_stream(conn, [lane.PROTOCOL_ID])
            except NegotiationError:
                self._no_lane.add(peer_id)  # an older peer: per-call streams only
                return None
            current = self._lanes[peer_id] = lane.Lane(stream, self.config.max_message)
            current.direct = not conn.relayed
            self._nursery.start_soon(current.run)
            return current

    async def _confirm(self, stream: Stream) -> None:
        """The callee's answer to the call's lazy protocol proposal (it precedes the reply)."""
        try:
            await multistream.confirm(stream, self.protocol_id)
        except NegotiationError:
            raise RPCError("the peer does not serve Lattice RPC") from None

    def _call_failed(self, method: str, timeout: float, exc: BaseException) -> BaseException:
        """The error a caller sees: timeouts and lost streams named after the call."""
        self.counters["errors_out"] += 1
        if isinstance(exc, trio.TooSlowError):
            return RPCTimeout(f"{method} timed out after {timeout:g}s")
        if isinstance(exc, StreamError | NegotiationError):
            return RPCError(f"{method} failed: {exc}")
        return exc

    async def _peer_error(self, stream: Stream, negotiated: bool = False) -> None:
        """After our write failed: if the peer explained why before resetting, raise that instead."""
        try:
            with trio.move_on_after(0.5):
                if not negotiated:
                    await self._confirm(stream)
                await _receive(stream, self.config.max_message, False)
        except (RemoteError, MethodNotFound):
            raise
        except (StreamError, PayloadError, RPCError, NegotiationError):
            pass

    @asynccontextmanager
    async def _call_scope(self, method: str, timeout: float | None):
        timeout = self.config.default_timeout if timeout is None else timeout
        self.counters["calls_out"] += 1
        try:
            with trio.fail_after(timeout):
                yield
        except (trio.TooSlowError, LatticeError) as exc:
            raise self._call_failed(method, timeout, exc) from None

    async def call(
        self,
        peer: PeerId | str,
        method: str,
        payload: Any = None,
        *,
        timeout: float | None = None,
        codec: str | None = None,
        as_torch: bool | None = None,
        resumable: bool = False,
    ) -> Any:
        """Unary call: send ``payload`` (values, bytes, arrays, tensors), return the reply.

        ``resumable=True`` (payload: one large tensor) uploads in chunks that survive dropped
        connections; the handler still receives the whole tensor (see lattice.rpc.resumable).
        """
        if resumable:
            from lattice.rpc import resumable as _resumable

            return await _resumable.call(self, peer, method, payload, timeout=timeout, as_torch=as_torch)
        timeout = self.config.default_timeout if timeout is None else timeout
        if not timeout >= 0:  # what trio.fail_after would say (NaN included)
            raise ValueError("timeout must be non-negative")
        self.counters["calls_out"] += 1
        encoded = tensors.encode(payload, codec)
        small = wire.encoded_size(encoded) <= lane.SMALL_CALL
        try:
            if small:  # the hot path: a live direct lane, no cancel scope (the lane keeps deadlines)
                ready = self._ready_lane(peer)
                if ready is not None:
                    return await self._lane_call(*ready, method, encoded, as_torch, timeout)
            # a plain cancel scope (trio.fail_after is a generator context manager)
            with trio.CancelScope(deadline=trio.current_time() + timeout) as deadline:
                if small:
                    peer_id, conn = await self._resolve(peer)
                    fast = await self._lane_to(peer_id, conn)
                    if fast is not None:
                        return await self._lane_call(fast, peer_id, method, encoded, as_torch, timeout)
                stream, slots = await self._open(peer)
                try:
                    await wire.send(
                        stream,
                        wire.CALL,
                        encoded=encoded,
                        method=method,
                        end=True,
                        on_error=lambda: self._peer_error(stream),
                    )
                    await self._confirm(stream)
                    reply = await _receive(stream, self.config.max_message, as_torch)
                    if reply.kind != wire.MSG or not reply.last:
                        raise PayloadError("a unary reply must be a single final message")
                    return reply.value
                except BaseException:
                    await stream.reset()
                    raise
                finally:
                    slots.release()
            if deadline.cancelled_caught:
                raise trio.TooSlowError
            raise AssertionError("unreachable")  # every path in the scope returns or raises
        except (trio.TooSlowError, LatticeError) as exc:
            raise self._call_failed(method, timeout, exc) from None

    def _ready_lane(self, peer: PeerId | str) -> tuple[lane.Lane, PeerId] | None:
        """The peer's lane if it is open on a live direct connection (no await, no lookup)."""
        peer_id = self._addr_peers.get(peer) if isinstance(peer, str) else peer
        if peer_id is None:
            return None
        fast = self._lanes.get(peer_id)
        if fast is None or fast.closed or not fast.direct:
            return None
        session = fast.stream.session
        if session.closed or session.going_away:
            return None
        return fast, peer_id

    async def _lane_call(
        self, fast: lane.Lane, peer_id: PeerId, method: str, encoded, as_torch, timeout: float
    ) -> Any:
        slots = await self._slot(peer_id)
        try:
            reply = await fast.call(method, encoded, trio.current_time() + timeout)
        finally:
            slots.release()
        if as_torch is not None and not isinstance(reply, Exception) and reply.kind == wire.MSG:
            reply.value = tensors.retype(reply.value, as_torch)
        return lane.result_of(reply)

    @asynccontextmanager
    async def call_stream(
        self,
        peer: PeerId | str,
        method: str,
        payload: Any = None,
        *,
        timeout: float | None = None,
        codec: str | None = None,
        as_torch: bool | None = None,
        max_reply: int | None = None,
    ) -> AsyncIterator[RPCStream]:
        """Server-streaming call: ``async with rpc.call_stream(...) as items: async for x in items``.

        ``timeout`` covers the whole exchange; leaving the block early resets the stream.
        ``max_reply``: the largest reply message accepted (tensor bytes; default and cap
        ``RPCConfig.max_message``), checked before anything is allocated, so a caller that knows
        what it asked for bounds what a hostile callee can make it hold.
        """
        limit = self.config.max_message if max_reply is None else min(max_reply, self.config.max_message)
        async with self._call_scope(method, timeout):
            stream, slots = await self._open(peer)
            try:
                await wire.send(
                    stream,
                    wire.CALL,
                    payload,
                    has_value=True,
                    codec=codec,
                    method=method,
                    end=True,
                    on_error=lambda: self._peer_error(stream),
                )
                await self._confirm(stream)
                rpc_stream = RPCStream(stream, limit, codec, as_torch)
                rpc_stream._sent_end = True
                yield rpc_stream
                if not rpc_stream._got_end:
                    await stream.reset()  # the caller stopped early
            except BaseException:
                await stream.reset()
                raise
            finally:
                slots.release()

    async def call_client_stream(
        self,
        peer: PeerId | str,
        method: str,
        values: Iterable[Any] | AsyncIterator[Any],
        *,
        timeout: float | None = None,
        codec: str | None = None,
        as_torch: bool | None = None,
    ) -> Any:
        """Client-streaming call: send every value of ``values``, return the peer's single reply."""
        async with self.open_stream(peer, method, timeout=timeout, codec=codec, as_torch=as_torch) as s:
            if isinstance(values, AsyncIterable):
                async for value in values:
                    await s.send(value)
            else:
                for value in values:
                    await s.send(value)
            await s.done_sending()
            return await s.receive()

    @asynccontextmanager
    async def open_stream(
        self,
        peer: PeerId | str,
        method: str,
        *,
        timeout: float | None = None,
        codec: str | None = None,
        as_torch: bool | None = None,
    ) -> AsyncIterator[RPCStream]:
        """Bidirectional call; ``timeout`` covers the whole exchange."""
        async with self._call_scope(method, timeout):
            stream, slots = await self._open(peer)
            try:

                async def refused() -> None:  # a send failed: the callee may have said why
                    await self._peer_error(stream, negotiated=rpc_stream.opened)

                rpc_stream = RPCStream(
                    stream,
                    self.config.max_message,
                    codec,
                    as_torch,
                    on_error=refused,
                    prefix=wire.encode_header(wire.CALL, method=method),
                    confirm=lambda: self._confirm(stream),
                )
                yield rpc_stream
                await rpc_stream.done_sending()
                await rpc_stream.open()
                while not rpc_stream._got_end:  # drain: the peer must finish cleanly
                    try:
                        await rpc_stream.receive()
                    except trio.EndOfChannel:
                        break
                await stream.close()
            except BaseException:
                await stream.reset()
                raise
            finally:
                slots.release()

    # -- server side: admission
    def inbound_full(self, peer: PeerId) -> bool:
        """No room for one more inbound call from ``peer``? Its own cap, or the node's once the peer
        holds its minimum (a crowd of peers at their caps cannot lock out a light one). No side
        effects."""
        cfg = self.config
        mine = self._inbound_peers.get(peer, 0)
        if mine >= cfg.max_inbound_per_peer:
            return True
        return self._inbound >= cfg.max_inbound_calls and mine >= cfg.min_inbound_per_peer

    def inbound_refusal(self, peer: PeerId) -> str | None:
        """Why a new inbound call from ``peer`` is refused now (counted; a peer over its own cap gets a
        throttle point), or None."""
        if not self.inbound_full(peer):
            return None
        self.counters["rejected"] += 1
        cap = self.config.max_inbound_per_peer
        if self._inbound_peers.get(peer, 0) < cap:
            return f"too many calls in progress (limit {self.config.max_inbound_calls})"
        self.penalize(peer, "too many RPC calls in progress", PENALTY_THROTTLED)
        return f"too many calls in progress from this peer (limit {cap})"

    def begin_inbound(self, peer: PeerId) -> None:
        self._inbound += 1
        self._inbound_peers[peer] = self._inbound_peers.get(peer, 0) + 1

    def end_inbound(self, peer: PeerId) -> None:
        self._inbound -= 1
        left = self._inbound_peers.get(peer, 1) - 1
        if left > 0:
            self._inbound_peers[peer] = left
        else:
            self._inbound_peers.pop(peer, None)

    @property
    def inbound_calls(self) -> int:
        return self._inbound

    def payload_limit(self, entry: _Method) -> int:
        return self.config.max_payload if entry.max_payload is None else entry.max_payload

    def check_size(self, peer: PeerId, entry: _Method, method: str, size: int) -> int:
        """The method's payload limit; OverLimit (and a throttle point) if ``size`` is over it."""
        limit = self.payload_limit(entry)
        if size > limit:
            self.counters["refused_size"] += 1
            self.penalize(peer, f"RPC message over the limit of {method}", PENALTY_THROTTLED)
            what = f"message payload of {size} bytes"
            raise OverLimit(f"{what} is over the limit of {limit} bytes for {method}")
        return limit

    def reserve(self, peer: PeerId, size: int, lease: Lease | None = None) -> Lease | None:
        """Hold ``size`` bytes of ``peer``'s and the node's budgets (on the "rpc" scope) in ``lease``
        (a new one if None), in place of what it held; Overloaded names the budget that is full.
        A refusal is a throttle point when the peer's own share is what ran out."""
        if lease is None:
            if not size:
                return None
            lease = self.ctx.host.resources.lease(peer, self.name)
        if lease.held:
            lease.shrink(lease.held)
        try:
            lease.grow(size)
        except ResourceLimitExceeded as exc:
            self.counters["refused_memory"] += 1
            if exc.scope in ("peer", "prefix"):
                self.penalize(peer, f"RPC message over the {exc.scope}'s memory budget", PENALTY_THROTTLED)
            raise Overloaded(str(exc)) from None
        return lease

    def penalize(self, peer: PeerId, reason: str, points: float | None = None) -> None:
        """Feed the peer's misbehaviour score (malformed messages by default; see transport.limits)."""
        host = self._ctx.host if self._ctx is not None else None
        if host is None:
            return
        if points is None:
            self.counters["malformed"] += 1
            host.penalize(peer, reason)
        else:
            host.penalize(peer, reason, points)

    def _admit(self, call: _Inbound, method: str | None, size: int) -> None:
        """wire.receive's ``admit`` for a call on its own stream: the method must exist, the message
        fit its limit and the budgets, before any of its payload is allocated."""
        if call.entry is None:  # the call's first message names the method
            entry = self.lookup(method)
            if entry is None:
                if not method:  # malformed (penalized as such by _receive_inbound)
                    raise PayloadError("a call must start with a call message")
                raise MethodNotFound(f"no method {method!r}")
            call.entry, call.method = entry, method
        assert call.method is not None
        self.check_size(call.peer, call.entry, call.method, size)
        call.lease = self.reserve(call.peer, size, call.lease)

    async def _receive_inbound(self, call: _Inbound) -> wire.Message:
        """The call's next message, admitted and watched by the idle reaper while it arrives (from
        its first byte: a streaming call may rest between messages); a malformed one is penalized."""
        stream = call.stream
        if call.entry is not None:
            try:
                await stream.wait_data()
            except StreamError:
                pass  # receive says what is wrong
        call.mark, call.since = stream.received, time.monotonic()
        self._receiving[call] = None
        try:
            return await wire.receive(
                stream, self.config.max_message, admit=lambda method, size: self._admit(call, method, size)
            )
        except PayloadError as exc:
            if not isinstance(exc, OverLimit):
                self.penalize(call.peer, f"malformed RPC message: {exc}")
            raise
        finally:
            self._receiving.pop(call, None)

    async def _reap_idle(self) -> None:
        """Reset inbound messages that made no progress for ``message_idle_timeout`` (their memory and
        call slot come back) and expire staged uploads. One task scans them all, so receiving needs
        no timer or cancel scope per message."""
        while True:
            timeout = self.config.message_idle_timeout
            await trio.sleep(min(1.0, timeout / 4))
            now = time.monotonic()
            for call in list(self._receiving):
                received = call.stream.received
                if received != call.mark:
                    call.mark, call.since = received, now
                elif now - call.since >= timeout:
                    del self._receiving[call]
                    self.counters["idle_reset"] += 1
                    self.penalize(call.peer, "stalled RPC message", PENALTY_THROTTLED)
                    await call.stream.reset()
            self.uploads.expire()

    # -- server side: calls
    async def _serve_lane(self, stream: Stream) -> None:
        await lane.serve(self, stream)

    async def _serve(self, stream: Stream) -> None:
        peer = stream.remote_peer
        refusal = self.inbound_refusal(peer)
        if refusal is not None:
            await _reject(stream, "Overloaded", refusal)
            return
        call = _Inbound(stream)
        self.begin_inbound(peer)
        try:
            await self._serve_call(call)
        finally:
            self.end_inbound(peer)
            call.close()

    async def _serve_call(self, call: _Inbound) -> None:
        stream, peer = call.stream, call.peer
        try:
            first = await self._receive_inbound(call)
        except StreamError:
            return  # reset (by the caller, or as idle) or lost: nobody to answer
        except (PayloadError, RPCError) as exc:
            self.counters["errors_in"] += 1
            await _reject(stream, _error_type(exc), str(exc))
            return
        if first.kind != wire.CALL or not first.method:
            self.penalize(peer, "RPC stream without a call")
            await _reject(stream, "PayloadError", "a call must start with a call message")
            return
        entry = call.entry or self.lookup(first.method)
        if entry is None:
            await _reject(stream, "MethodNotFound", f"no method {first.method!r}")
            return
        call.entry, call.method = entry, first.method
        self.counters["calls_in"] += 1
        ctx = CallContext(peer, first.method)
        try:
            with trio.CancelScope() as scope:
                stream.cancel_on_reset(scope)  # the caller timed out or gave up: stop the handler
                if entry.kind in ("unary", "server"):
                    if not first.has_value or not first.last:
                        raise PayloadError("a unary or server-streaming call sends one final message")
                    if entry.kind == "unary":
                        result = await self.invoke(entry, first.value, ctx)
                        await wire.send(stream, wire.MSG, result, has_value=True, codec=entry.codec, end=True)
                    else:
                        async for item in _call(entry, first.value, ctx):
                            await wire.send(stream, wire.MSG, item, has_value=True, codec=entry.codec)
                        await wire.send_end(stream)
                else:
                    source = lambda: self._receive_inbound(call)  # noqa: E731
                    rpc_stream = RPCStream(stream, self.config.max_message, entry.codec, None, source)
                    if first.has_value:
                        raise PayloadError("streaming calls send values as messages")
                    rpc_stream._got_end = first.last
                    if entry.kind == "client":
                        result = await _call(entry, rpc_stream._iterate(), ctx)
                        await wire.send(stream, wire.MSG, result, has_value=True, codec=entry.codec, end=True)
                    else:
                        await _call(entry, rpc_stream, ctx)
                        await rpc_stream.done_sending()
            if scope.cancelled_caught:
                return
        except StreamError:
            return  # the caller went away or reset: nothing to answer
        except (PayloadError, RPCError) as exc:
            self.counters["errors_in"] += 1
            await _reject(stream, _error_type(exc), str(exc))
        except Exception as exc:
            self.counters["errors_in"] += 1
            log.info("handler %s raised %s: %s", first.method, type(exc).__name__, exc)
            await _reject(stream, type(exc).__name__, str(exc))

    def invoke(self, entry: _Method, payload: Any, ctx: CallContext) -> Awaitable[Any]:
        """Run a registered method's handler on a decoded request (sync handlers in a worker
        thread): for the fast lane and resumable uploads, which receive requests their own way.
        Returns the handler's own coroutine when it has one (no wrapper coroutine per call)."""
        args = (payload, ctx) if entry.takes_ctx else (payload,)
        if entry.is_async:
            return entry.fn(*args)
        return trio.to_thread.run_sync(lambda: entry.fn(*args), abandon_on_cancel=True)

    def invoke_for(self, entry: _Method, payload: Any, peer: PeerId, method: str) -> Awaitable[Any]:
        """:meth:`invoke`, with the CallContext built only if the handler takes one."""
        if entry.is_async and not entry.takes_ctx:  # the fast lane's common case
            return entry.fn(payload)
        return self.invoke(entry, payload, CallContext(peer, method))


def _call(entry: _Method, first: Any, ctx: CallContext) -> Any:
    return entry.fn(first, ctx) if entry.takes_ctx else entry.fn(first)


async def _receive(stream: Stream, limit: int, as_torch: bool | None) -> wire.Message:
    return _raise_error(await wire.receive(stream, limit, as_torch))


def _raise_error(message: wire.Message) -> wire.Message:
    """``message``, unless it is the peer's error: then raise that."""
    if message.kind == wire.ERR:
        if message.error_type == "MethodNotFound":
            raise MethodNotFound(message.error_message or "")
        raise RemoteCallError(message.error_type or "Error", message.error_message or "")
    return message


def _error_type(exc: Exception) -> str:
    """The error type a caller is told: PayloadError for every payload problem (OverLimit too)."""
    return "PayloadError" if isinstance(exc, PayloadError) else type(exc).__name__


async def _reject(stream: Stream, type_name: str, message: str) -> None:
    """Tell the caller why, then reset if it is still sending (so its write fails instead of stalling)."""
    try:
        await wire.send_error(stream, type_name, message)
    except StreamError:
        pass
    if not stream.remote_closed:
        await stream.reset()


Handler = Callable[..., Awaitable[Any]]
