"""In-memory libp2p connections for wire tests: a real Noise handshake and a real Yamux session over
trio's memory streams (no sockets), so a test can put any bytes on the wire and watch what the
session does with them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio
import trio.testing

from lattice.identity import KeyPair
from lattice.transport.noise import SecureStream, secure_inbound, secure_outbound
from lattice.transport.yamux import YamuxSession, YamuxStream

__all__ = ["Peer", "secure_pair", "yamux_under_test"]


async def secure_pair() -> tuple[SecureStream, SecureStream]:
    """(initiator, responder) secure streams after a real XX handshake over memory streams."""
    a_raw, b_raw = trio.testing.memory_stream_pair()
    box: dict[str, SecureStream] = {}

    async def inbound() -> None:
        box["b"] = await secure_inbound(b_raw, KeyPair.generate())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(inbound)
        box["a"] = await secure_outbound(a_raw, KeyPair.generate())
    return box["a"], box["b"]


@dataclass
class Peer:
    """The remote end of a session under test: it writes Yamux plaintext, or raw bytes below Noise."""

    secure: SecureStream
    session: YamuxSession
    streams: list[YamuxStream] = field(default_factory=list)

    async def send_plain(self, data: bytes) -> None:
        """Encrypted as Noise frames: the session parses ``data`` as Yamux frames."""
        await self.secure.send_all(data)

    async def send_raw(self, data: bytes) -> None:
        """Below Noise: the session's secure stream parses ``data`` as Noise frames."""
        await self.secure.raw.send_all(data)

    async def receive_plain(self) -> bytes:
        return bytes(await self.secure.receive_some())


@asynccontextmanager
async def yamux_under_test(**session_options) -> AsyncIterator[Peer]:
    """A running server-side YamuxSession (inbound streams land in ``peer.streams``) and its peer."""
    client, server = await secure_pair()
    peer_streams: list[YamuxStream] = []
    session = YamuxSession(server, is_client=False, on_stream=peer_streams.append, **session_options)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run)
        try:
            yield Peer(client, session, peer_streams)
        finally:
            nursery.cancel_scope.cancel()
