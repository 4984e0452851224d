"""libp2p ping (``/ipfs/ping/1.0.0``): 32 random bytes echoed back; measures round-trip time."""

from __future__ import annotations

import os

import trio

from lattice.errors import ProtocolError
from lattice.identity import PeerId
from lattice.transport import multistream
from lattice.transport.host import Connection, Host
from lattice.transport.stream import Stream

PROTOCOL_ID = "/ipfs/ping/1.0.0"
PING_SIZE = 32
MAX_PINGS_PER_STREAM = 10_000
IDLE_TIMEOUT = 60.0


async def _handle(stream: Stream) -> None:
    for _ in range(MAX_PINGS_PER_STREAM):
        with trio.move_on_after(IDLE_TIMEOUT):
            first = await stream.read(PING_SIZE)
            if not first:
                return
            rest = await stream.read_exactly(PING_SIZE - len(first)) if len(first) < PING_SIZE else b""
            await stream.write(first + rest)
            continue
        return  # idle too long


def install(host: Host) -> None:
    host.set_stream_handler(PROTOCOL_ID, _handle)


async def ping(host: Host, peer: PeerId | Connection, count: int = 1, timeout: float = 10.0) -> list[float]:
    """Round-trip times in seconds of ``count`` pings over one stream. The protocol proposal goes
    out with the first ping (lazy negotiation): one round trip for the first ping, not two."""
    rtts = []
    with trio.fail_after(timeout):
        stream = await host.new_stream(peer, [PROTOCOL_ID], lazy=True)
        try:
            for i in range(count):
                payload = os.urandom(PING_SIZE)
                start = trio.current_time()
                await stream.write(payload)
                if i == 0:
                    await multistream.confirm(stream, PROTOCOL_ID)
                echo = await stream.read_exactly(PING_SIZE)
                rtts.append(trio.current_time() - start)
                if echo != payload:
                    raise ProtocolError("ping echo does not match")
        finally:
            await stream.close()
    return rtts
