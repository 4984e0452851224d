"""Yamux receive-window auto-tuning: a stream whose window limits it grows it (up to max_window),
paid from the peer's memory budget; without a known RTT or without budget it stays put.

Two real Yamux sessions over a real Noise handshake on memory streams (tests/wire.py)."""

from __future__ import annotations

import trio

from lattice.transport.resources import ResourceLimits, ResourceManager
from lattice.transport.yamux import YamuxSession, YamuxStream
from wire import secure_pair

MIB = 1 << 20


async def _transfer(total: int, rtt: float | None, resources: ResourceManager | None = None) -> YamuxStream:
    """Send ``total`` bytes on one stream from a client session to a server session whose
    transport reports ``rtt``; return the server's stream once everything was read."""
    client_secure, server_secure = await secure_pair()
    inbound: list[YamuxStream] = []
    arrived = trio.Event()

    def on_stream(stream: YamuxStream) -> None:
        inbound.append(stream)
        arrived.set()

    client = YamuxSession(client_secure, is_client=True, on_stream=lambda s: None)
    server = YamuxSession(
        server_secure, is_client=False, on_stream=on_stream, max_window=16 * MIB,
        rtt=lambda: rtt, resources=resources,
    )  # fmt: skip
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.run)
        nursery.start_soon(server.run)
        stream = await client.open_stream()

        async def send() -> None:
            chunk = bytes(MIB)
            for _ in range(total // MIB):
                await stream.write(chunk)

        nursery.start_soon(send)
        await arrived.wait()
        got = 0
        while got < total:
            got += len(await inbound[0].read(1 << 20))
        nursery.cancel_scope.cancel()
    return inbound[0]


async def test_window_grows_while_it_limits_the_stream() -> None:
    # A long RTT: every half window is consumed well within 4 RTTs, so the window doubles to the max.
    stream = await _transfer(40 * MIB, rtt=1.0)
    assert stream.window == 16 * MIB


async def test_window_stays_without_rtt_or_when_consumed_slowly() -> None:
    assert (await _transfer(24 * MIB, rtt=None)).window == 4 * MIB
    assert (await _transfer(24 * MIB, rtt=1e-9)).window == 4 * MIB  # half a window takes > 4 RTTs


async def test_window_growth_is_paid_from_the_peer_budget() -> None:
    # 20 MiB for the peer, half of it for grown windows: the 4 MiB window and one doubling (8 MiB)
    # fit, 16 MiB does not.
    rm = ResourceManager(ResourceLimits(max_memory=80 * MIB, peer_memory=0.25))
    stream = await _transfer(40 * MIB, rtt=1.0, resources=rm)
    assert stream.window == 8 * MIB
