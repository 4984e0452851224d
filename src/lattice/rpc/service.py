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
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio

from lattice.codec import tensors
from lattice.errors import LatticeError, NegotiationError, PayloadError, StreamError
from lattice.identity import PeerId
from lattice.rpc import lane, wire
from lattice.rpc.errors import MethodNotFound, RemoteError, RPCError, RPCTimeout
from lattice.transport import multistream
from lattice.transport.yamux import YamuxStream

log = logging.getLogger(__name__)

PROTOCOL_ID = "/lattice/rpc/1.0.0"
STREAM_KINDS = ("unary", "server", "client", "bidi")


@dataclass
class RPCConfig:
    max_message: int = 4 << 30  # largest message accepted (checked before allocating)
    max_inflight_per_peer: int = 256  # calls beyond this wait for a free slot instead of failing
    max_inbound_calls: int = 2048
    default_timeout: float = 60.0


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


class RPCStream:
    """A bidirectional message stream (``open_stream`` on the caller, ``stream="bidi"`` handlers)."""

    def __init__(self, stream: YamuxStream, max_message: int, codec: str | None, as_torch: bool | None):
        self._stream = stream
        self._max = max_message
        self._codec = codec
        self._as_torch = as_torch
        self._sent_end = False
        self._got_end = False
        self._prefix = b""  # lazy protocol negotiation rides on the first write

    async def send(self, value: Any, codec: str | None = None) -> None:
        if self._sent_end:
            raise RPCError("send after done_sending()")
        prefix, self._prefix = self._prefix, b""
        await wire.send(
            self._stream, wire.MSG, value, has_value=True, codec=codec or self._codec, prefix=prefix
        )

    async def done_sending(self) -> None:
        if not self._sent_end:
            self._sent_end = True
            prefix, self._prefix = self._prefix, b""
            await wire.send_end(self._stream, prefix=prefix)

    async def receive(self) -> Any:
        """The next value; raises EndOfStream when the peer is done sending."""
        if self._got_end:
            raise trio.EndOfChannel
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
        self._node: Any = None
        self._slots: dict[PeerId, trio.Semaphore] = {}
        self._inbound = 0
        self._negotiation_bytes: bytes | None = None
        self._nursery: trio.Nursery | None = None
        self._lanes: dict[PeerId, lane.Lane] = {}
        self._lane_locks: dict[PeerId, trio.Lock] = {}
        self._no_lane: set[PeerId] = set()
        self._addr_peers: dict[str, PeerId] = {}  # peer text (multiaddr or id) -> id (parsed once)
        from lattice.rpc.resumable import Uploads

        self.uploads = Uploads(self, max_bytes=2 * self.config.max_message)
        self.stats = {"calls_out": 0, "calls_in": 0, "errors_out": 0, "errors_in": 0, "rejected": 0}

    # -- lifecycle
    async def run(self, node: Any, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        self._node = node
        node.host.set_stream_handler(self.protocol_id, self._serve)
        node.host.set_stream_handler(lane.PROTOCOL_ID, self._serve_lane)
        node.add_control_op("rpc.call", self._op_call)
        node.add_control_op("rpc.methods", self._op_methods)
        node.add_control_op("rpc.bench", self._op_bench)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery  # the lanes' reply readers
            task_status.started()
            await trio.sleep_forever()

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
        self, name: str, fn: Callable[..., Any], *, stream: str | None = None, codec: str | None = None
    ) -> None:
        """Serve ``fn`` as ``name``. ``stream``: None/"unary", "server", "client" or "bidi".

        ``fn(payload)`` or ``fn(payload, ctx)``; for "client" the payload is an async iterator of the
        caller's values; for "bidi" the first argument is an :class:`RPCStream`. ``codec`` compresses
        the float tensors of replies.
        """
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
        self._methods[name] = _Method(fn, kind, len(params) >= 2, is_async, codec)

    def method(self, name: str, *, stream: str | None = None, codec: str | None = None):
        """Decorator form of :meth:`register`."""

        def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
            self.register(name, fn, stream=stream, codec=codec)
            return fn

        return decorate

    @property
    def methods(self) -> list[str]:
        return sorted(self._methods)

    # -- client side
    async def _resolve(self, peer: PeerId | str) -> tuple[PeerId, Any]:
        """(peer id, live connection), dialing a multiaddr or a known address if needed."""
        node = self._node
        if node is None:
            raise RPCError("the RPC service is not running")
        host = node.host
        if isinstance(peer, str) and peer.startswith("/"):
            known = self._addr_peers.get(peer)  # a live connection to its peer: no parse, no dial
            conn = host.connection_to(known) if known is not None else None
            if conn is None:
                conn = await host.connect(peer)
                self._remember(peer, conn.remote_peer)
            return conn.remote_peer, conn
        peer_id = peer if isinstance(peer, PeerId) else self._addr_peers.get(peer)
        if peer_id is None:
            peer_id = self._remember(peer, PeerId.from_string(str(peer)))
        return peer_id, await host.connect_peer(peer_id)

    def _remember(self, text: str, peer_id: PeerId) -> PeerId:
        """Cache what a peer text (multiaddr or id) names, bounded."""
        if len(self._addr_peers) >= 1024:
            self._addr_peers.clear()
        self._addr_peers[text] = peer_id
        return peer_id

    async def _slot(self, peer_id: PeerId) -> trio.Semaphore:
        slots = self._slots.get(peer_id)
        if slots is None:
            slots = self._slots[peer_id] = trio.Semaphore(self.config.max_inflight_per_peer)
        try:
            slots.acquire_nowait()  # uncontended: no scheduler round trip
        except trio.WouldBlock:
            await slots.acquire()
        return slots

    async def _open(self, peer: PeerId | str) -> tuple[YamuxStream, trio.Semaphore]:
        peer_id, conn = await self._resolve(peer)
        slots = await self._slot(peer_id)
        try:
            stream = await conn.session.open_stream()
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
                stream = await self._node.host.new_stream(conn, [lane.PROTOCOL_ID])
            except NegotiationError:
                self._no_lane.add(peer_id)  # an older peer: per-call streams only
                return None
            current = self._lanes[peer_id] = lane.Lane(stream, self.config.max_message)
            current.direct = not conn.relayed
            self._nursery.start_soon(current.run)
            return current

    def _negotiation(self) -> bytes:
        if self._negotiation_bytes is None:
            self._negotiation_bytes = multistream.encode(multistream.HEADER) + multistream.encode(
                self.protocol_id
            )
        return self._negotiation_bytes

    async def _check_negotiation(self, stream: YamuxStream) -> None:
        expected = self._negotiation()
        got = await stream.read_exactly(len(expected)) if stream._buf_len >= len(expected) else None
        if got == expected:  # the usual case: compare bytes, no parsing
            return
        if got is not None:
            stream.unread(got)
        buf = bytearray()
        header = await multistream.read_message(stream, buf)
        answer = await multistream.read_message(stream, buf)
        stream.unread(bytes(buf))
        if header != multistream.HEADER or answer != self.protocol_id:
            raise RPCError("the peer does not serve Lattice RPC")

    def _call_failed(self, method: str, timeout: float, exc: BaseException) -> BaseException:
        """The error a caller sees: timeouts and lost streams named after the call."""
        self.stats["errors_out"] += 1
        if isinstance(exc, trio.TooSlowError):
            return RPCTimeout(f"{method} timed out after {timeout:g}s")
        if isinstance(exc, StreamError | NegotiationError):
            return RPCError(f"{method} failed: {exc}")
        return exc

    async def _peer_error(self, stream: YamuxStream) -> None:
        """After our write failed: if the peer explained why before resetting, raise that instead."""
        try:
            with trio.move_on_after(0.5):
                await self._check_negotiation(stream)
                await _receive(stream, self.config.max_message, False)
        except (RemoteError, MethodNotFound):
            raise
        except (StreamError, PayloadError, RPCError, NegotiationError):
            pass

    @asynccontextmanager
    async def _call_scope(self, method: str, timeout: float | None):
        timeout = self.config.default_timeout if timeout is None else timeout
        self.stats["calls_out"] += 1
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
        self.stats["calls_out"] += 1
        encoded = tensors.encode(payload, codec)
        small = len(encoded[0]) + sum([b.nbytes for b in encoded[1]]) <= lane.SMALL_CALL
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
                        prefix=self._negotiation(),
                        method=method,
                        end=True,
                        on_error=lambda: self._peer_error(stream),
                    )
                    await self._check_negotiation(stream)
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
        fast = self._lanes.get(peer_id) if peer_id is not None else None
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
                    prefix=self._negotiation(),
                    method=method,
                    end=True,
                    on_error=lambda: self._peer_error(stream),
                )
                await self._check_negotiation(stream)
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
            if hasattr(values, "__aiter__"):
                async for value in values:  # type: ignore[union-attr]
                    await s.send(value)
            else:
                for value in values:  # type: ignore[union-attr]
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
                call_header = self._negotiation() + wire.encode_header(wire.CALL, method=method)
                rpc_stream = RPCStream(stream, self.config.max_message, codec, as_torch)
                rpc_stream._prefix = call_header
                checked = False

                async def ensure_negotiated() -> None:
                    nonlocal checked
                    if not checked:
                        checked = True
                        if rpc_stream._prefix:  # nothing sent yet: open the call now
                            prefix, rpc_stream._prefix = rpc_stream._prefix, b""
                            await stream.write(prefix)
                        await self._check_negotiation(stream)

                original_receive = rpc_stream.receive

                async def receive() -> Any:
                    await ensure_negotiated()
                    return await original_receive()

                rpc_stream.receive = receive  # type: ignore[method-assign]
                yield rpc_stream
                await rpc_stream.done_sending()
                await ensure_negotiated()
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

    # -- server side
    async def _serve_lane(self, stream: YamuxStream) -> None:
        await lane.serve(self, stream)

    async def _serve(self, stream: YamuxStream) -> None:
        if self._inbound >= self.config.max_inbound_calls:
            self.stats["rejected"] += 1
            await wire.send_error(stream, "Overloaded", "too many calls in progress")
            return
        self._inbound += 1
        try:
            await self._serve_call(stream)
        finally:
            self._inbound -= 1

    async def _serve_call(self, stream: YamuxStream) -> None:
        limit = self.config.max_message
        peer = stream.remote_peer
        try:
            first = await wire.receive(stream, limit)
        except PayloadError as exc:
            self.stats["errors_in"] += 1
            await _reject(stream, "PayloadError", str(exc))
            return
        if first.kind != wire.CALL or not first.method:
            await _reject(stream, "PayloadError", "a call must start with a call message")
            return
        entry = self._methods.get(first.method)
        if entry is None:
            await _reject(stream, "MethodNotFound", f"no method {first.method!r}")
            return
        self.stats["calls_in"] += 1
        ctx = CallContext(peer, first.method)
        try:
            with trio.CancelScope() as scope:
                stream.cancel_on_reset(scope)  # the caller timed out or gave up: stop the handler
                if entry.kind in ("unary", "server"):
                    if not first.has_value or not first.last:
                        raise PayloadError("a unary or server-streaming call sends one final message")
                    if entry.kind == "unary":
                        result = await self._invoke(entry, first.value, ctx)
                        await wire.send(stream, wire.MSG, result, has_value=True, codec=entry.codec, end=True)
                    else:
                        async for item in _call(entry, first.value, ctx):
                            await wire.send(stream, wire.MSG, item, has_value=True, codec=entry.codec)
                        await wire.send_end(stream)
                else:
                    rpc_stream = RPCStream(stream, limit, entry.codec, None)
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
        except PayloadError as exc:
            self.stats["errors_in"] += 1
            await _reject(stream, "PayloadError", str(exc))
        except RPCError as exc:
            self.stats["errors_in"] += 1
            await _reject(stream, type(exc).__name__, str(exc))
        except Exception as exc:
            self.stats["errors_in"] += 1
            log.info("handler %s raised %s: %s", first.method, type(exc).__name__, exc)
            await _reject(stream, type(exc).__name__, str(exc))

    context = CallContext  # for lattice.rpc.lane (which cannot import this module: import cycle)

    async def _invoke(self, entry: _Method, payload: Any, ctx: CallContext) -> Any:
        args = (payload, ctx) if entry.takes_ctx else (payload,)
        if entry.is_async:
            return await entry.fn(*args)
        return await trio.to_thread.run_sync(lambda: entry.fn(*args), abandon_on_cancel=True)


def _call(entry: _Method, first: Any, ctx: CallContext) -> Any:
    return entry.fn(first, ctx) if entry.takes_ctx else entry.fn(first)


async def _receive(stream: YamuxStream, limit: int, as_torch: bool | None) -> wire.Message:
    message = await wire.receive(stream, limit, as_torch)
    if message.kind == wire.ERR:
        if message.error_type == "MethodNotFound":
            raise MethodNotFound(message.error_message or "")
        raise RemoteError(message.error_type or "Error", message.error_message or "")
    return message


async def _reject(stream: YamuxStream, type_name: str, message: str) -> None:
    """Tell the caller why, then reset if it is still sending (so its write fails instead of stalling)."""
    try:
        await wire.send_error(stream, type_name, message)
    except StreamError:
        pass
    if not stream.remote_closed:
        await stream.reset()


Handler = Callable[..., Awaitable[Any]]
