"""The small-message fast paths (one whole Noise frame holding one whole Yamux data frame) behave as
the general parser: data for an open stream arrives in order, data for an unknown stream is dropped,
a frame over the window is a protocol error, flags (FIN) still apply; and several frames in one
read still take the general path. Real Noise and Yamux over memory streams (tests/wire.py)."""

from __future__ import annotations

import trio

from lattice.transport.yamux import FLAG_FIN, FLAG_SYN, TYPE_DATA, header
from wire import Peer, yamux_under_test


async def _open(peer: Peer, stream_id: int = 1) -> None:
    await peer.send_plain(header(TYPE_DATA, FLAG_SYN, stream_id, 0))
    with trio.fail_after(5):
        while not peer.streams:
            await trio.sleep(0.001)


async def test_whole_data_frames_arrive_in_order_and_unknown_streams_are_dropped() -> None:
    async with yamux_under_test() as peer:
        await _open(peer)
        stream = peer.streams[0]
        for i in range(20):
            await peer.send_plain(header(TYPE_DATA, 0, 1, 8) + bytes([i]) * 8)  # one Noise frame each
            if i == 10:
                await peer.send_plain(header(TYPE_DATA, 0, 7, 5) + b"stray")  # no such stream: dropped
        with trio.fail_after(5):
            got = await stream.read_exactly(160)
        assert got == b"".join(bytes([i]) * 8 for i in range(20))
        assert stream.buffered == 0 and not peer.session.closed


async def test_several_frames_in_one_noise_frame_and_a_fin() -> None:
    async with yamux_under_test() as peer:
        await _open(peer)
        stream = peer.streams[0]
        batch = header(TYPE_DATA, 0, 1, 3) + b"abc" + header(TYPE_DATA, FLAG_FIN, 1, 2) + b"de"
        await peer.send_plain(batch)
        with trio.fail_after(5):
            assert await stream.read_exactly(5) == b"abcde"
            assert await stream.read() == b""  # the FIN applied
        await _open(peer, 3)
        await peer.send_plain(header(TYPE_DATA, FLAG_FIN, 3, 4) + b"last")  # a flag: general path
        with trio.fail_after(5):
            assert await peer.streams[1].read_exactly(4) == b"last"
            assert await peer.streams[1].read() == b""


async def test_a_frame_over_the_window_is_a_protocol_error() -> None:
    async with yamux_under_test() as peer:
        await _open(peer)
        await peer.send_plain(header(TYPE_DATA, 0, 1, peer.session.window + 1))  # refused at the header
        with trio.fail_after(5):
            while not peer.session.closed:
                await trio.sleep(0.005)
        assert "protocol error" in (peer.session.close_reason or "")
