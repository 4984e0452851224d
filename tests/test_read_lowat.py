"""The receive low-water mark (SO_RCVLOWAT) while a large Yamux data frame arrives: the reader wakes
once per chunk of the frame instead of once per burst of packets, the frame arrives whole, and
nothing after the frame (a small message) waits for bytes that are not coming.

Real Noise + Yamux over a real loopback TCP connection; the peer trickles a frame in small Noise
frames, as a paced wide-area link delivers it."""

from __future__ import annotations

import socket

import pytest
import trio

from lattice.identity import KeyPair
from lattice.transport.noise import MAX_MESSAGE, SecureStream, read_lowat, secure_inbound, secure_outbound
from lattice.transport.yamux import FLAG_SYN, TYPE_DATA, YamuxSession, YamuxStream, header

KIB = 1024


def test_read_lowat_waits_only_for_what_is_sure_to_come() -> None:
    empty = bytearray()
    assert read_lowat(empty, 0, 0, 0, 256 * KIB) == 1  # nothing known: any byte wakes
    assert read_lowat(empty, 0, 0, 100 * KIB, 0) == 1  # off
    assert read_lowat(empty, 0, 0, 100 * KIB, 256 * KIB) == 100 * KIB  # the rest of the frame, no more
    assert read_lowat(empty, 0, 0, 4 << 20, 256 * KIB) == 256 * KIB  # at most the cap
    # 1000 ciphertext bytes buffered hold fewer than 1000 plaintext bytes of the frame
    buf = bytearray(b"\xff\xff" + bytes(998))
    assert read_lowat(buf, 0, 1000, 100 * KIB, 256 * KIB) == 100 * KIB - 1000
    # the rest of a partial Noise frame is sure even when the layer above knows nothing
    assert read_lowat(buf, 0, 1000, 0, 256 * KIB) == 2 + MAX_MESSAGE - 1000
    assert read_lowat(bytearray(b"\x00"), 0, 1, 0, 256 * KIB) == 1  # its length is not there yet
    assert read_lowat(buf, 0, 1000, 0, 16 * KIB) == 16 * KIB


async def _tcp_secure_pair() -> tuple[SecureStream, SecureStream]:
    """(initiator, responder) secure streams after a real XX handshake over loopback TCP."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    box: dict[str, SecureStream] = {}

    async def inbound() -> None:
        box["b"] = await secure_inbound(await listener.accept(), KeyPair.generate())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(inbound)
        box["a"] = await secure_outbound(await trio.open_tcp_stream("127.0.0.1", port), KeyPair.generate())
    await listener.aclose()
    return box["a"], box["b"]


def _lowat(secure: SecureStream) -> int:
    return secure.raw.socket.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT)


async def _trickle(read_lowat_max: int, frame: int, piece: int = 8 * KIB) -> tuple[int, float, int]:
    """The peer sends one ``frame``-byte data frame in ``piece``-byte Noise frames 2 ms apart, then
    a 5-byte message. Returns the receiver's waits for readable during the frame, the seconds from
    sending the small message to reading it, and the socket's low-water mark afterwards."""
    peer, mine = await _tcp_secure_pair()
    streams: list[YamuxStream] = []
    opened = trio.Event()

    def on_stream(stream: YamuxStream) -> None:
        streams.append(stream)
        opened.set()

    session = YamuxSession(mine, is_client=False, on_stream=on_stream, read_lowat_max=read_lowat_max)
    payload = bytes(range(256)) * (frame // 256)
    with trio.fail_after(10):  # a low-water mark past what is coming would hang here
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.run)
            await peer.send_all(header(TYPE_DATA, FLAG_SYN, 1, len(payload)))
            await opened.wait()
            got = bytearray()

            async def reader() -> None:
                while len(got) < len(payload):
                    got.extend(await streams[0].read(1 << 20))

            waits = mine.read_waits
            async with trio.open_nursery() as inner:
                inner.start_soon(reader)
                for off in range(0, len(payload), piece):
                    await peer.send_all(payload[off : off + piece])
                    await trio.sleep(0.002)
            waits = mine.read_waits - waits
            assert got == payload  # the whole frame, in order
            sent = trio.current_time()
            await peer.send_all(header(TYPE_DATA, 0, 1, 5) + b"hello")
            assert await streams[0].read() == b"hello"
            delay = trio.current_time() - sent
            lowat = _lowat(mine)
            nursery.cancel_scope.cancel()
    await peer.aclose()
    await mine.aclose()
    return waits, delay, lowat


async def test_a_trickled_frame_wakes_the_reader_per_chunk_not_per_packet() -> None:
    frame = 640 * KIB  # 80 pieces, 2.5 times the low-water mark
    with_lowat, delay, lowat = await _trickle(256 * KIB, frame)
    without, _, _ = await _trickle(0, frame)
    assert with_lowat <= 8  # ~1 per 256 KiB (measured 3-4) where each piece woke it before
    assert without >= 2 * with_lowat
    assert delay < 1.0  # the small message after the frame was not held back (ms on loopback)
    assert lowat == 1  # set back once the frame ended


@pytest.mark.parametrize("frame", [8 * KIB, 200 * KIB])
async def test_the_end_of_a_frame_shorter_than_the_cap_is_not_waited_past(frame: int) -> None:
    waits, delay, lowat = await _trickle(256 * KIB, frame)
    assert waits <= 4  # the frame's end wakes the reader: it is not left waiting for a fuller buffer
    assert delay < 1.0 and lowat == 1
