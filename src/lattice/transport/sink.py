"""Accept a protocol and read it to nothing: for protocols a swarm's peers insist on opening.

A Lattica node (rust-libp2p with beetswap) whose bitswap stream is refused opens another at once,
~500 a second, until our stream rate limit bans it. A peer of such a swarm is better served by a
stream that is accepted, read and discarded: it costs one stream and a bounded read buffer, and the
bytes are never parsed. Swarm profiles name these protocols (``SwarmProfile.sink_protocols``).
"""

from __future__ import annotations

import trio

from lattice.transport.stream import Stream

__all__ = ["IDLE_TIMEOUT", "drain"]

IDLE_TIMEOUT = 300.0  # seconds without a byte before the stream is closed (the peer may reopen it)
READ_SIZE = 16 * 1024


async def drain(stream: Stream) -> None:
    """Read ``stream`` until the peer ends it or stays silent for ``IDLE_TIMEOUT``; keep nothing."""
    while True:
        with trio.move_on_after(IDLE_TIMEOUT):
            if not await stream.read(READ_SIZE):
                return
            continue
        return
