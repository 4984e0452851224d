"""Property tests (hypothesis) for the stream parsers: multistream-select, the Noise handshake
messages and transport frames, Yamux frames and the uvarint-delimited messages read from a Yamux
stream. They run on real Noise and Yamux sessions over in-memory streams (tests/wire.py).

Properties: valid input round-trips; arbitrary input ends in the documented errors only (never
another exception, never a crashed session), within the declared bounds and in bounded time.
"""

from __future__ import annotations

import itertools
import struct
from datetime import timedelta

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lattice.errors import ConnectionLost, HandshakeError, NegotiationError, ProtocolError, StreamError
from lattice.identity import KeyPair
from lattice.transport import multistream
from lattice.transport.framing import read_delimited
from lattice.transport.noise import XXHandshake
from lattice.transport.yamux import FLAG_FIN, FLAG_RST, FLAG_SYN, HEADER_LEN, TYPE_DATA, header
from wire import secure_pair, yamux_under_test

PROPS = settings(max_examples=100, deadline=timedelta(seconds=5), database=None,
                 suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
chunks = st.lists(st.binary(min_size=1, max_size=64), max_size=40)


class _Chunks:
    """A ByteStream that yields the peer's chunks, then a clean end of stream."""

    def __init__(self, parts: list[bytes]) -> None:
        self.parts = list(parts)
        self.sent = bytearray()

    async def send_all(self, data: bytes) -> None:
        self.sent += data

    async def receive_some(self, max_bytes: int = 65536) -> bytes:
        return self.parts.pop(0) if self.parts else b""


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


# ------------------------------------------------------------------------------ multistream-select
messages = st.text(st.characters(blacklist_categories=("Cs",)), max_size=200).filter(
    lambda m: 0 < len(m.encode()) + 1 <= multistream.MAX_MESSAGE
)


@PROPS
@given(st.lists(messages, min_size=1, max_size=5), st.lists(st.integers(0, 10_000), max_size=8))
def test_multistream_round_trip(texts, cuts):
    async def main() -> list[str]:
        stream = _Chunks(_split(b"".join(multistream.encode(t) for t in texts), cuts))
        buf = bytearray()
        return [await multistream.read_message(stream, buf) for _ in texts]

    assert trio.run(main) == texts


@PROPS
@given(chunks)
def test_multistream_arbitrary_bytes(parts):
    async def main() -> None:
        stream = _Chunks(parts)
        buf = bytearray()
        try:
            while True:
                message = await multistream.read_message(stream, buf)
                assert len(message.encode()) < multistream.MAX_MESSAGE
                assert len(buf) <= multistream.MAX_MESSAGE + 16 + 64  # never buffers past the bound
        except NegotiationError:
            pass

    trio.run(main)


@PROPS
@given(st.one_of(chunks, st.lists(messages, max_size=20).map(lambda ts: [multistream.encode(t) for t in ts])))
def test_multistream_listener_arbitrary_proposals(parts):
    """A listener facing any bytes either agrees on a protocol it supports or fails to negotiate."""

    async def main() -> None:
        stream = _Chunks([multistream.encode(multistream.HEADER), *parts])
        try:
            proto, _ = await multistream.select_inbound(stream, lambda p: p == "/noise", bytearray())
        except NegotiationError:
            return
        assert proto == "/noise"

    trio.run(main)


# ------------------------------------------------------------------------------------------ Noise
def _damage(data: bytes, pos: int, byte: int, cut: int) -> bytes:
    if not data:
        return data
    i = pos % len(data)
    return (data[:i] + bytes([byte]) + data[i + 1 :])[:cut]


damage = st.tuples(st.integers(0, 1 << 16), st.integers(0, 255), st.integers(0, 1 << 16))
IDS = [KeyPair.from_seed(bytes([i]) * 32) for i in (1, 2)]


@PROPS
@given(
    st.integers(0, 2),
    st.one_of(st.binary(max_size=300).map(lambda b: (b, None)), damage.map(lambda d: (None, d))),
)
def test_noise_handshake_messages(step, hostile):
    """Any message in place of message 1, 2 or 3 (random, or a real one damaged) is a HandshakeError
    or, if it happens to be intact, completes the handshake with the right peer."""
    initiator, responder = XXHandshake(IDS[0], True), XXHandshake(IDS[1], False)
    real = [initiator.write_message()]
    pairs = [(initiator, responder), (responder, initiator), (initiator, responder)]
    for i in range(step):
        reader = pairs[i][1]
        reader.read_message(real[i])
        real.append(pairs[i + 1][0].write_message())
    raw, spoil = hostile
    message = raw if raw is not None else _damage(real[step], *spoil)
    try:
        pairs[step][1].read_message(message)
    except HandshakeError:
        return
    if step:  # messages 2 and 3 are authenticated: only the genuine one gets through
        assert message == real[step] and pairs[step][1].remote_identity == pairs[step][0].identity.public_key


@PROPS
@given(st.one_of(chunks, st.lists(st.binary(max_size=100), max_size=6).map(
    lambda frames: [struct.pack(">H", len(f)) + f for f in frames])))  # fmt: skip
def test_noise_transport_frames(parts):
    """Below the encryption, any bytes are a ProtocolError (forged or short frame) or ConnectionLost
    (cut frame); never a plaintext, never another error."""

    async def main() -> None:
        a, b = await secure_pair()
        for part in parts:
            await a.raw.send_all(part)
        await a.raw.aclose()
        try:
            while await b.receive_some():
                raise AssertionError("forged bytes were decrypted")
        except (ProtocolError, ConnectionLost):
            pass

    trio.run(main)


# ------------------------------------------------------------------------------------------ Yamux
frames = st.lists(
    st.builds(
        lambda version, ftype, flags, sid, length, body: (
            struct.pack(">BBHII", version, ftype, flags, sid, length) + body
        ),
        st.sampled_from([0, 0, 0, 1]), st.integers(0, 5), st.integers(0, 15),
        st.sampled_from([0, 1, 2, 3, 5, 7, 2**31 + 1, 2**32 - 1]),
        st.one_of(st.integers(0, 64), st.integers(0, 2**32 - 1)), st.binary(max_size=64),
    ),
    max_size=12,
).map(b"".join)  # fmt: skip


@PROPS
@given(st.one_of(frames, st.binary(max_size=300)), st.lists(st.integers(0, 1000), max_size=4))
def test_yamux_arbitrary_frames(data, cuts):
    """Whatever frames a peer sends, the session goes on or closes with a protocol error (a data
    frame over the window granted is one); it never crashes, and it ends when the peer leaves."""

    async def main() -> None:
        async with yamux_under_test(window=256 * 1024) as peer:
            try:
                for part in _split(data, cuts):
                    await peer.send_plain(part)
            except trio.BrokenResourceError:  # the session closed on a protocol error: it stops reading
                assert peer.session.closed
            await peer.secure.aclose()
            with trio.fail_after(5):
                await peer.session.wait_closed()
            reason = peer.session.close_reason or ""
            assert reason.startswith(("protocol error", "connection closed by peer", "write failed")), reason

    trio.run(main)


# bodies that start with a run of varint continuation bytes (a length prefix that may never end),
# random bodies, and well-formed messages
continued = st.builds(lambda n, byte, rest: bytes([byte]) * n + rest, st.integers(0, 14),
                      st.integers(0x80, 0xFF), st.binary(max_size=80))  # fmt: skip
delimited = st.lists(st.binary(max_size=80), max_size=4).map(
    lambda ms: b"".join(bytes([len(m)]) + m for m in ms)
)


@PROPS
@given(st.one_of(st.binary(max_size=200), continued, delimited), st.lists(st.integers(0, 300), max_size=4),
       st.sampled_from([FLAG_FIN, FLAG_RST]))  # fmt: skip
def test_delimited_message_from_a_stream(body, cuts, last_flag):
    """The uvarint-delimited framing of identify, kad, gossipsub, relay and DCUtR, read from a real
    Yamux stream: messages within the limit, None at a clean end, or ProtocolError/StreamError."""
    limit = 64

    async def main() -> None:
        async with yamux_under_test() as peer:
            parts = _split(body, cuts) or [b""]
            for i, part in enumerate(parts):
                flags = (FLAG_SYN if i == 0 else 0) | (last_flag if i == len(parts) - 1 else 0)
                await peer.send_plain(header(TYPE_DATA, flags, 1, len(part)) + part)
            with trio.fail_after(5):
                while not peer.streams:
                    await trio.sleep(0.001)
                try:
                    while (message := await read_delimited(peer.streams[0], limit)) is not None:
                        assert len(message) <= limit
                except (ProtocolError, StreamError):
                    pass

    trio.run(main)


def test_header_len_matches_the_struct():
    assert len(header(TYPE_DATA, 0, 0, 0)) == HEADER_LEN
