"""The fast lane: small unary calls to a peer share one long-lived stream, each tagged with a call id.

A call on its own stream pays for a Yamux stream, protocol negotiation and a server task every time;
on a 0.3 ms round-trip budget that is half the cost. Requests whose encoded size is at most
``SMALL_CALL`` go over the peer's lane instead; larger requests and streaming calls keep their own
stream (their own flow control, no head-of-line blocking of small calls behind a big upload).

Wire: the same messages as lattice.rpc.wire, with ``"i"`` (call id) in every header. A caller that
times out sends ``cancel`` for its id and the callee cancels just that handler. If the lane's stream
fails, its pending calls fail with RPCError and the next call opens a new lane.

Both sides parse complete small messages in the connection's reader (``Stream.on_data``, while
their own reader task waits at a message boundary): a reply wakes its parked caller directly and a
call goes straight to a parked worker, two task switches less per round trip. Anything incomplete
or unusual is left in the buffer for the reader task, which reads it the ordinary way.

Per call, neither side enters a cancel scope or spawns a task (each costs about as much as the
rest of the call's Python work): the caller parks on its own task and one timer per lane keeps
the deadlines; the callee's workers are reused, with one cancel scope per worker.
"""

from __future__ import annotations

import heapq
import logging
import math
from typing import Any, Literal

import outcome
import trio

from lattice.codec import tensors
from lattice.errors import PayloadError, StreamError
from lattice.identity import PeerId
from lattice.rpc import wire
from lattice.rpc.errors import MethodNotFound, OverLimit, Overloaded, RemoteCallError, RPCError
from lattice.transport.stream import Stream

log = logging.getLogger(__name__)

PROTOCOL_ID = "/lattice/rpc-lane/1.0.0"
SMALL_CALL = 64 << 10
MAX_CALL_HEADER = SMALL_CALL + 1024  # a call's header on the callee's lane: its value document and names
MAX_LANE_CALLS = 1024  # calls in progress on one lane, callee side
MAX_IDLE_WORKERS = 16  # parked callee workers kept per lane (more exit after their call)


class TimedOut(trio.TooSlowError):
    """A lane call's deadline passed (the caller turns it into RPCTimeout)."""


class _Call:
    """One call in flight: its result, or the task parked waiting for it."""

    __slots__ = ("deadline", "result", "task")

    def __init__(self, deadline: float) -> None:
        self.task: Any = None
        self.result: Any = None
        self.deadline = deadline


class Lane:
    """Caller side of one peer's lane.

    A caller parks on its own task (no Event) and is woken by the connection's reader with the
    reply. Deadlines are kept by one timer task per lane instead of a cancel scope per call: a
    deadline scope costs ~12 us to enter and leave, a third of the fast path's own work.
    """

    def __init__(self, stream: Stream, max_message: int) -> None:
        self.stream = stream
        self.max_message = max_message
        self.pending: dict[int, _Call] = {}
        self._next = 0
        self.closed = False
        self._error: Exception = RPCError("fast lane closed")
        self._deadlines: list[tuple[float, int]] = []  # heap; entries of finished calls go stale
        self._timer: trio.CancelScope | None = None
        self.direct = True  # on a direct connection (a relayed lane is re-checked on every call)

    async def run(self) -> None:
        """Read replies and expire calls until the lane's stream fails."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._expire_calls)
            try:
                await self._read_replies()
            finally:
                nursery.cancel_scope.cancel()

    async def call(self, method: str, encoded: tuple[bytes, list], deadline: float) -> Any:
        """Send one call (``encoded`` by tensors.encode) and wait for its reply message; raises
        TimedOut at ``deadline``, RPCError if the lane fails first."""
        self._next += 1
        cid = self._next
        message = wire.small_message(wire.CALL, encoded, method=method, last=True, call_id=cid)
        call = _Call(deadline)
        self.pending[cid] = call
        heap = self._deadlines
        heapq.heappush(heap, (deadline, cid))
        if len(heap) > 4 * len(self.pending) + 256:  # drop finished calls' entries (amortised O(1))
            heap[:] = [(c.deadline, i) for i, c in self.pending.items()]
            heapq.heapify(heap)
        if self._timer is not None and deadline < self._timer.deadline:
            self._timer.deadline = deadline
        try:
            if self.stream.can_write_now(len(message)):
                await self.stream.write(message, fin=False)  # starts at once: nothing to bound
            else:  # may wait for window or the connection's writer: bounded by the deadline
                with trio.CancelScope(deadline=deadline):
                    await self.stream.write(message, fin=False)
                if call.result is None and trio.current_time() >= deadline:
                    call.result = TimedOut()
        except BaseException:
            self.pending.pop(cid, None)
            raise
        try:
            result = call.result
            if result is None:
                call.task = trio.lowlevel.current_task()

                def abort(_: Any) -> Any:  # cancelled from outside (the caller's own scope)
                    self.pending.pop(cid, None)
                    return trio.lowlevel.Abort.SUCCEEDED

                result = await trio.lowlevel.wait_task_rescheduled(abort)
        except BaseException:  # cancelled: tell the callee to stop the handler
            await self._cancel_remote(cid)
            raise
        if isinstance(result, TimedOut):
            await self._cancel_remote(cid)
            raise result
        return result

    def _finish(self, call: _Call, result: Any) -> None:
        if call.task is not None:
            trio.lowlevel.reschedule(call.task, outcome.Value(result))
        else:  # not parked yet (its write is still in progress)
            call.result = result

    def _dispatch(self, message: Any) -> None:
        call = self.pending.pop(message.call_id, None) if message.call_id is not None else None
        if call is not None:  # else: a reply to a call that already timed out
            self._finish(call, message)

    async def _expire_calls(self) -> None:
        heap = self._deadlines
        while True:
            now = trio.current_time()
            while heap and (heap[0][0] <= now or heap[0][1] not in self.pending):
                _, cid = heapq.heappop(heap)
                call = self.pending.get(cid)
                if call is not None and call.deadline <= now:
                    del self.pending[cid]
                    self._finish(call, TimedOut())
            with trio.CancelScope(deadline=heap[0][0] if heap else math.inf) as self._timer:
                await trio.sleep_forever()  # until the earliest deadline, moved by new calls

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

    async def _read_replies(self) -> None:
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
            self._error = RPCError(f"fast lane lost: {exc}")
        finally:
            self.closed = True
            for call in self.pending.values():
                self._finish(call, self._error)
            self.pending.clear()

    async def _cancel_remote(self, call_id: int) -> None:
        self.pending.pop(call_id, None)
        if self.closed:
            return
        with trio.CancelScope(shield=True), trio.move_on_after(1.0):
            try:
                await self.stream.write(wire.encode_header(wire.CANCEL, call_id=call_id), fin=False)
            except StreamError:
                pass


def result_of(message: Any) -> Any:
    """The value of a reply message, or raise what it reports."""
    if isinstance(message, Exception):
        raise message
    if message.kind == wire.ERR:
        if message.error_type == "MethodNotFound":
            raise MethodNotFound(message.error_message or "")
        raise RemoteCallError(message.error_type or "Error", message.error_message or "")
    if message.kind != wire.MSG:
        raise PayloadError(f"unexpected {message.kind!r} reply on the fast lane")
    return message.value


class _Workers:
    """Callee-side tasks that run a lane's calls. A finished worker parks and takes the next call
    (no task spawn, and one cancel scope per worker instead of one per call); a call's cancel
    cancels its worker's scope, and that worker carries on in a new one."""

    def __init__(self, rpc: Any, stream: Stream, nursery: trio.Nursery) -> None:
        self.rpc = rpc
        self.stream = stream
        self.peer: PeerId = stream.remote_peer
        self.nursery = nursery
        # call id -> the scope its worker runs it in (None: not started yet, False: cancelled before)
        self.scopes: dict[int, trio.CancelScope | Literal[False] | None] = {}
        self.idle: list[Any] = []  # parked worker tasks, most recent last

    @property
    def busy(self) -> int:
        return len(self.scopes)

    def submit(self, message: Any) -> None:
        self.scopes[message.call_id] = None  # counted at once
        self.rpc.begin_inbound(self.peer)  # in the peer's and the node's inbound calls until it ends
        if self.idle:
            trio.lowlevel.reschedule(self.idle.pop(), outcome.Value(message))
        else:
            self.nursery.start_soon(self._work, message)

    def cancel(self, call_id: int) -> None:
        scope = self.scopes.get(call_id)
        if scope:
            scope.cancel()
        elif scope is None and call_id in self.scopes:  # not started yet: it never runs
            self.scopes[call_id] = False

    async def _work(self, message: Any) -> None:
        while message is not None:
            with trio.CancelScope() as scope:
                while message is not None:
                    cid = message.call_id
                    if self.scopes.get(cid) is False:  # cancelled before it started
                        del self.scopes[cid]
                        self.rpc.end_inbound(self.peer)
                    else:
                        self.scopes[cid] = scope
                        try:
                            await _one_call(self.rpc, self.stream, self.peer, message)
                        finally:
                            self.scopes.pop(cid, None)
                            self.rpc.end_inbound(self.peer)
                    message = await self._next()
            if scope.cancelled_caught:  # this call was cancelled by its caller: a fresh scope
                message = await self._next()

    async def _next(self) -> Any:
        """Park until the next call (None: too many idle workers, this one ends)."""
        if len(self.idle) >= MAX_IDLE_WORKERS:
            return None
        task = trio.lowlevel.current_task()
        self.idle.append(task)

        def abort(_: Any) -> Any:  # the lane is shutting down
            self.idle.remove(task)
            return trio.lowlevel.Abort.SUCCEEDED

        return await trio.lowlevel.wait_task_rescheduled(abort)


async def serve(rpc: Any, stream: Stream) -> None:
    """Callee side: run calls concurrently (up to MAX_LANE_CALLS, and within the peer's and the
    node's caps on inbound calls); replies go back tagged with the call's id. Only small calls come
    this way (SMALL_CALL bytes of payload at most: what a caller sends on its lane), left raw until
    their method's limits are checked (_one_call)."""
    limit = SMALL_CALL
    peer = stream.remote_peer
    async with trio.open_nursery() as nursery:
        workers = _Workers(rpc, stream, nursery)

        def take_buffered() -> bool:
            """Start every complete, well-formed call already buffered (and apply cancels); True if
            nothing is left over. Anything else stays buffered for the loop below."""
            try:
                for _ in range(MAX_LANE_CALLS):
                    parsed = wire.parse_buffered(stream, limit, max_header=MAX_CALL_HEADER, raw=True)
                    if parsed is None:
                        break
                    message, size = parsed
                    cid = message.call_id
                    if cid is None:
                        break
                    if message.kind == wire.CANCEL:
                        stream.skip_first(size)
                        workers.cancel(cid)
                    elif message.kind == wire.CALL and message.method and message.has_value:
                        if workers.busy >= MAX_LANE_CALLS or cid in workers.scopes or rpc.inbound_full(peer):
                            break  # the loop below answers "Overloaded" (or rejects the reused id)
                        stream.skip_first(size)
                        workers.submit(message)
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
                message = await wire.receive(stream, limit, max_header=MAX_CALL_HEADER, raw=True)
                cid = message.call_id
                if cid is None:
                    raise PayloadError("fast-lane message without a call id")
                if message.kind == wire.CANCEL:
                    workers.cancel(cid)
                    continue
                if message.kind != wire.CALL or not message.method or not message.has_value:
                    raise PayloadError("the fast lane carries unary calls only")
                if cid in workers.scopes:
                    raise PayloadError(f"call id {cid} is already in progress")
                refusal = "too many calls in progress" if workers.busy >= MAX_LANE_CALLS else None
                refusal = refusal or rpc.inbound_refusal(peer)
                if refusal is not None:
                    await wire.send_error(stream, "Overloaded", refusal, cid, fin=False)
                    continue
                workers.submit(message)
        except PayloadError as exc:  # a broken lane: say why, then drop it (the caller reopens one)
            log.info("fast lane from %s broken: %s", workers.peer, exc)
            rpc.penalize(peer, f"malformed fast-lane message: {exc}")
            try:
                await wire.send_error(stream, "PayloadError", str(exc))
            except StreamError:
                pass
            await stream.reset()
        except StreamError:
            pass
        finally:
            nursery.cancel_scope.cancel()


async def _one_call(rpc: Any, stream: Stream, peer: PeerId, message: Any) -> None:
    cid = message.call_id
    method = message.method
    entry = rpc.lookup(method)
    lease = None
    try:
        if entry is None:
            await wire.send_error(stream, "MethodNotFound", f"no method {method!r}", cid, fin=False)
            return
        if entry.kind != "unary":
            await wire.send_error(stream, "PayloadError", "not a unary method", cid, fin=False)
            return
        try:
            if message.size:  # tensors: within the method's limit (0 bytes always are)
                limit = rpc.check_size(peer, entry, method, message.size)
                if message.size > SMALL_CALL:  # compressed tensors that decode larger: reserve that
                    lease = rpc.reserve(peer, message.size)
                value = tensors.finish(message.value, None, limit)
            else:
                value = tensors.finish(message.value)
        except (OverLimit, Overloaded) as exc:
            await wire.send_error(stream, _error_type(exc), str(exc), cid, fin=False)
            return
        except PayloadError as exc:  # malformed compressed data
            rpc.penalize(peer, f"malformed RPC message: {exc}")
            await wire.send_error(stream, "PayloadError", str(exc), cid, fin=False)
            return
        rpc.counters["calls_in"] += 1
        try:
            result = await rpc.invoke_for(entry, value, peer, method)
        except StreamError:
            raise
        except Exception as exc:
            rpc.counters["errors_in"] += 1
            await wire.send_error(stream, type(exc).__name__, str(exc), cid, fin=False)
            return
        encoded = tensors.encode(result, entry.codec)
        if wire.encoded_size(encoded) <= wire.SMALL and not stream.exclusive_held:
            await stream.write(wire.small_message(wire.MSG, encoded, last=True, call_id=cid), fin=False)
        else:  # large (several writes, kept together) or behind another large reply
            await wire.send(stream, wire.MSG, encoded=encoded, end=True, fin=False, call_id=cid)
    except StreamError:
        pass
    finally:
        if lease is not None:
            lease.close()


def _error_type(exc: Exception) -> str:
    return "PayloadError" if isinstance(exc, PayloadError) else type(exc).__name__
