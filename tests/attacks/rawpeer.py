"""A libp2p peer that speaks the wire formats by hand and breaks the rules a real host keeps: it
never reads what the victim sends back, opens streams without waiting, stops mid-handshake.

It completes multistream + Noise + Yamux negotiation with the victim like any peer (so the victim
treats it as an authenticated stranger), then writes raw Yamux frames. Nothing reads the socket
afterwards unless a test asks: the victim's replies pile up in its own buffers.
"""

from __future__ import annotations

import struct

import trio

from lattice import _proto
from lattice.identity import KeyPair
from lattice.multiaddr import Multiaddr
from lattice.transport import multistream, noise, yamux

_HDR = struct.Struct(">BBHII")
MS_HEADER = multistream.encode(multistream.HEADER)


def frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"", length: int | None = None) -> bytes:
    size = len(payload) if length is None else length
    return _HDR.pack(0, ftype, flags, stream_id, size) + payload


class RawPeer:
    """One connection of a hand-driven libp2p client (see the module docstring)."""

    def __init__(self, keypair: KeyPair | None = None) -> None:
        self.keypair = keypair or KeyPair.generate()
        self.tcp: trio.SocketStream | None = None
        self.secure: noise.SecureStream | None = None
        self._next_id = 1

    async def connect(
        self, addr: str | Multiaddr, window: int = yamux.INITIAL_WINDOW, local_address: str | None = None
    ) -> None:
        """Dial (from ``local_address`` if given), secure and multiplex; ``window``: the receive
        window we claim per stream."""
        ma = Multiaddr.parse(str(addr))
        host, port = ma.tcp_target()
        self.tcp = await trio.open_tcp_stream(host, port, local_address=local_address)
        buf = bytearray()
        await multistream.select_outbound(self.tcp, [noise.PROTOCOL_ID], buf)
        self.secure = await noise.secure_outbound(self.tcp, self.keypair, ma.peer_id, buf)
        # yamux negotiation, inside the secure channel, without waiting for the answer
        await self.secure.send_all(MS_HEADER + multistream.encode(yamux.PROTOCOL_ID))
        self.window = window

    async def open_stream(self, protocol: str, payload: bytes = b"") -> int:
        """SYN + protocol proposal (+ ``payload``) in one write; returns the stream id."""
        sid = self._next_id
        self._next_id += 2
        body = MS_HEADER + multistream.encode(protocol) + payload
        extra = max(0, self.window - yamux.INITIAL_WINDOW)
        data = frame(yamux.TYPE_WINDOW_UPDATE, yamux.FLAG_SYN, sid, length=extra)
        data += frame(yamux.TYPE_DATA, 0, sid, body)
        await self.send(data)
        return sid

    async def send_on(self, sid: int, payload: bytes, fin: bool = False) -> None:
        await self.send(frame(yamux.TYPE_DATA, yamux.FLAG_FIN if fin else 0, sid, payload))

    async def send(self, data: bytes) -> None:
        assert self.secure is not None
        await self.secure.send_all(data)

    async def stall_handshake(self, addr: str | Multiaddr, local_address: str | None = None) -> None:
        """Slowloris: propose /noise and go silent (the socket stays open)."""
        ma = Multiaddr.parse(str(addr))
        host, port = ma.tcp_target()
        self.tcp = await trio.open_tcp_stream(host, port, local_address=local_address)
        await self.tcp.send_all(MS_HEADER + multistream.encode(noise.PROTOCOL_ID))

    async def aclose(self) -> None:
        if self.tcp is not None:
            await trio.aclose_forcefully(self.tcp)


def delimited(data: bytes) -> bytes:
    return _proto.delimited(data)
