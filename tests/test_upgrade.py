"""The libp2p connection upgrade in round trips: a lazy ``/noise`` proposal and Yamux agreed inside
the Noise handshake (spec: inlined muxer negotiation) leave one round trip before the dialer may
send, where multistream-select at each step took three.

Both ends run ``host.upgrade`` over an in-memory pipe that delivers each write 10 ms later, under
trio's mock clock: the times are exact, whatever the machine's load.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from lattice.errors import HandshakeError
from lattice.identity import KeyPair
from lattice.transport import host, noise

ONE_WAY = 0.010


class DelayedPipe(trio.abc.Stream):
    """One end of a duplex pipe whose every write arrives ``ONE_WAY`` s after it was sent."""

    def __init__(self, send: trio.MemorySendChannel, receive: trio.MemoryReceiveChannel) -> None:
        self._send, self._receive = send, receive
        self._pending = bytearray()

    async def send_all(self, data) -> None:
        await self._send.send((trio.current_time() + ONE_WAY, bytes(data)))

    async def wait_send_all_might_not_block(self) -> None:
        return None

    async def send_eof(self) -> None:
        await self._send.aclose()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if not self._pending:
            try:
                at, data = await self._receive.receive()
            except trio.EndOfChannel:
                return b""
            await trio.sleep_until(at)
            self._pending += data
        n = len(self._pending) if max_bytes is None else max_bytes
        out = bytes(self._pending[:n])
        del self._pending[:n]
        return out

    async def aclose(self) -> None:
        await self._send.aclose()


def pipe() -> tuple[DelayedPipe, DelayedPipe]:
    a_to_b, b_from_a = trio.open_memory_channel(64)
    b_to_a, a_from_b = trio.open_memory_channel(64)
    return DelayedPipe(a_to_b, a_from_b), DelayedPipe(b_to_a, b_from_a)


async def upgrade_both(dialer_muxers=host.MUXERS, listener_muxers=host.MUXERS) -> dict:
    """Upgrade both ends; the virtual time at which each was done, and what it agreed."""
    dialer_end, listener_end = pipe()
    done: dict = {}
    t0 = trio.current_time()

    async def side(name, stream, outbound, muxers):
        secure, _ = await host.upgrade(stream, KeyPair.generate(), outbound, muxers=muxers)
        done[name] = (round(trio.current_time() - t0, 6), secure.muxer)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(side, "dialer", dialer_end, True, dialer_muxers)
        nursery.start_soon(side, "listener", listener_end, False, listener_muxers)
    return done


@pytest.fixture
def autojump_clock():
    return trio.testing.MockClock(autojump_threshold=0)


async def test_the_dialer_is_ready_after_one_round_trip(autojump_clock):
    done = await upgrade_both()
    rtt = 2 * ONE_WAY
    assert done["dialer"] == (pytest.approx(1 * rtt), "/yamux/1.0.0")  # was 3 RTT
    assert done["listener"] == (pytest.approx(1.5 * rtt), "/yamux/1.0.0")  # message 3 arrived


async def test_a_peer_that_lists_no_muxer_negotiates_yamux_with_multistream(autojump_clock):
    for dialer, listener in (((), host.MUXERS), (host.MUXERS, ())):
        done = await upgrade_both(dialer, listener)
        rtt = 2 * ONE_WAY
        assert done["dialer"] == (pytest.approx(2 * rtt), None)  # Yamux's own round trip
        assert done["listener"][1] is None


async def test_muxer_lists_with_nothing_in_common_end_the_upgrade(autojump_clock):
    with pytest.raises(ExceptionGroup) as info:
        await upgrade_both(("/mplex/6.7.0",), host.MUXERS)
    assert info.group_contains(HandshakeError, match="no stream muxer in common")


def test_noise_is_still_the_only_security_protocol():
    assert noise.PROTOCOL_ID == "/noise" and host.MUXERS == ("/yamux/1.0.0",)
