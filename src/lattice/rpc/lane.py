"""The fast lane: small unary calls to a peer share one long-lived stream, each tagged with a call id.

A call on its own stream pays for a Yamux stream, protocol negotiation and a server task every time;
on a 0.3 ms round-trip budget that is half the cost. Requests whose encoded size is at most
``SMALL_CALL`` go over the peer's lane instead; larger requests and streaming calls keep their own
stream (their own flow control, no head-of-line blocking of small calls behind a big upload).

Wire: the same messages as lattice.rpc.wire, with ``"i"`` (call id) in every header. A caller that
times out sends ``cancel`` for its id and the callee cancels just that handler. If the lane's stream
fails, its pending calls fail with RPCError and the next call opens a new lane.

Both sides parse complete small messages in the connection's reader (``YamuxStream.on_data``, while
their own reader task waits at a message boundary): a reply wakes its caller directly and a call's
handler task is spawned at once, two task switches less per round trip. Anything incomplete or
unusual is left in the buffer for the reader task, which reads it the ordinary way.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from lattice.errors import PayloadError, StreamError
from lattice.identity import PeerId
from lattice.rpc import wire
from lattice.rpc.errors import MethodNotFound, RemoteError, RPCError
from lattice.transport.yamux import YamuxStream

log = logging.getLogger(__name__)

PROTOCOL_ID = "/lattice/rpc-lane/1.0.0"
SMALL_CALL = 64 << 10
MAX_LANE_CALLS = 1024  # calls in progress on one lane, callee side


class Lane:
    """Caller side of one peer's lane."""

    def __init__(self, stream: YamuxStream, max_message: int) -> None:
        self.stream = stream
        self.max_message = max_message
        self.pending: dict[int, list[Any]] = {}  # id -> [event, message or exception]
        self._next = 0
        self.closed = False

    def new_call(self) -> tuple[int, list[Any]]:
        self._next += 1
        slot = [trio.Event(), None]
        self.pending[self._next] = slot
        return self._next, slot

    def _dispatch(self, message: Any) -> None:
        slot = self.pending.pop(message.call_id, None) if message.call_id is not None else None
        if slot is None:
            return  # a reply to a call that already timed out
        slot[1] = message
        slot[0].set()

    def _take_buffered(self) -> bool:
        """Dispatch every complete reply already buffered; True if nothing is left over."""
        stream = self.stream
        try:
            for _ in range(MAX_LANE_CALLS):
                parsed = wire.parse_buffered(stream, self.max_message)
                if parsed is None:
                    break
                stream.skip_first(parsed[1])
                self._dispatch(parsed[0])
        except Exception:  # left to the reader task, which reports it
            return False
        return stream.first_chunk() is None

    async def read_replies(self) -> None:
        error: Exception = RPCError("fast lane closed")
        stream = self.stream
        try:
            while True:
                stream.on_data = self._take_buffered
                try:
                    self._take_buffered()
                    await stream.wait_data()
                finally:
                    stream.on_data = None
                self._dispatch(await wire.receive(stream, self.max_message))
        except (StreamError, PayloadError) as exc:
            error = RPCError(f"fast lane lost: {exc}")
        finally:
            self.closed = True
            for slot in self.pending.values():
                slot[1] = error
                slot[0].set()
            self.pending.clear()

    async def cancel(self, call_id: int) -> None:
        self.pending.pop(call_id, None)
        try:
            await self.stream.write(wire.encode_header(wire.CANCEL, call_id=call_id))
        except StreamError:
            pass


def result_of(message: Any) -> Any:
    """The value of a reply message, or raise what it reports."""
    if isinstance(message, Exception):
        raise message
    if message.kind == wire.ERR:
        if message.error_type == "MethodNotFound":
            raise MethodNotFound(message.error_message or "")
        raise RemoteError(message.error_type or "Error", message.error_message or "")
    if message.kind != wire.MSG:
        raise PayloadError(f"unexpected {message.kind!r} reply on the fast lane")
    return message.value


async def serve(rpc: Any, stream: YamuxStream) -> None:
    """Callee side: run each call in its own task; replies go back tagged with the call's id."""
    scopes: dict[int, trio.CancelScope] = {}
    peer: PeerId = stream.remote_peer
    limit = rpc.config.max_message
    async with trio.open_nursery() as nursery:

        def take_buffered() -> bool:
            """Start every complete, well-formed call already buffered (and apply cancels); True if
            nothing is left over. Anything else stays buffered for the loop below."""
            try:
                for _ in range(MAX_LANE_CALLS):
                    parsed = wire.parse_buffered(stream, limit)
                    if parsed is None:
                        break
                    message, size = parsed
                    cid = message.call_id
                    if cid is None:
                        break
                    if message.kind == wire.CANCEL:
                        stream.skip_first(size)
                        scope = scopes.get(cid)
                        if scope is not None:
                            scope.cancel()
                    elif message.kind == wire.CALL and message.method and message.has_value:
                        if len(scopes) >= MAX_LANE_CALLS:
                            break  # the loop below answers "Overloaded"
                        stream.skip_first(size)
                        scopes[cid] = trio.CancelScope()
                        nursery.start_soon(_one_call, rpc, stream, peer, message, scopes)
                    else:
                        break
            except Exception:
                return False
            return stream.first_chunk() is None

        try:
            while True:
                stream.on_data = take_buffered
                try:
                    take_buffered()
                    await stream.wait_data()
                finally:
                    stream.on_data = None
                message = await wire.receive(stream, limit)
                cid = message.call_id
                if cid is None:
                    raise PayloadError("fast-lane message without a call id")
                if message.kind == wire.CANCEL:
                    scope = scopes.get(cid)
                    if scope is not None:
                        scope.cancel()
                    continue
                if message.kind != wire.CALL or not message.method or not message.has_value:
                    raise PayloadError("the fast lane carries unary calls only")
                if len(scopes) >= MAX_LANE_CALLS:
                    await wire.send_error(stream, "Overloaded", "too many calls in progress", cid, fin=False)
                    continue
                scopes[cid] = trio.CancelScope()
                nursery.start_soon(_one_call, rpc, stream, peer, message, scopes)
        except PayloadError as exc:  # a broken lane: say why, then drop it (the caller reopens one)
            log.info("fast lane from %s broken: %s", peer, exc)
            try:
                await wire.send_error(stream, "PayloadError", str(exc))
            except StreamError:
                pass
            await stream.reset()
        except StreamError:
            pass
        finally:
            nursery.cancel_scope.cancel()


async def _one_call(rpc: Any, stream: YamuxStream, peer: PeerId, message: Any, scopes: dict) -> None:
    cid = message.call_id
    entry = rpc._methods.get(message.method)
    try:
        with scopes[cid]:
            if entry is None:
                await wire.send_error(
                    stream, "MethodNotFound", f"no method {message.method!r}", cid, fin=False
                )
                return
            if entry.kind != "unary":
                await wire.send_error(stream, "PayloadError", "not a unary method", cid, fin=False)
                return
            rpc.stats["calls_in"] += 1
            try:
                result = await rpc._invoke(entry, message.value, rpc.context(peer, message.method))
            except StreamError:
                raise
            except Exception as exc:
                rpc.stats["errors_in"] += 1
                await wire.send_error(stream, type(exc).__name__, str(exc), cid, fin=False)
                return
            await wire.send(stream, wire.MSG, result, has_value=True, codec=entry.codec, end=True, fin=False,
                            call_id=cid)  # fmt: skip
    except StreamError:
        pass
    finally:
        scopes.pop(cid, None)
