"""The fast lane: small unary calls to a peer share one long-lived stream, each tagged with a call id.

A call on its own stream pays for a Yamux stream, protocol negotiation and a server task every time;
on a 0.3 ms round-trip budget that is half the cost. Requests whose encoded size is at most
``SMALL_CALL`` go over the peer's lane instead; larger requests and streaming calls keep their own
stream (their own flow control, no head-of-line blocking of small calls behind a big upload).

Wire: the same messages as lattice.rpc.wire, with ``"i"`` (call id) in every header. A caller that
times out sends ``cancel`` for its id and the callee cancels just that handler. If the lane's stream
fails, its pending calls fail with RPCError and the next call opens a new lane.
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

    async def read_replies(self) -> None:
        error: Exception = RPCError("fast lane closed")
        try:
            while True:
                message = await wire.receive(self.stream, self.max_message)
                slot = self.pending.pop(message.call_id, None) if message.call_id is not None else None
                if slot is None:
                    continue  # a reply to a call that already timed out
                slot[1] = message
                slot[0].set()
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
    async with trio.open_nursery() as nursery:
        try:
            while True:
                message = await wire.receive(stream, rpc.config.max_message)
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
    from lattice.rpc.service import CallContext

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
                result = await rpc._invoke(entry, message.value, CallContext(peer, message.method))
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
