"""Known-answer vectors for the hand-written codecs, taken from the specifications and from other
implementations' test suites (only the vectors: inputs and expected bytes). Each block says where
its vectors come from, so a disagreement can be checked against the source.
"""

from __future__ import annotations

import struct

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from lattice import _proto
from lattice.multiaddr import Multiaddr, MultiaddrError
from lattice.transport import multistream
from lattice.transport.noise import XXHandshake
from lattice.transport.yamux import FLAG_ACK, FLAG_FIN, FLAG_RST, FLAG_SYN, TYPE_DATA, TYPE_PING, header
from wire import yamux_under_test

# ------------------------------------------------------------------------------------------ Noise
# Noise_XX_25519_ChaChaPoly_SHA256 from the cacophony vectors, as shipped by snow
# (github.com/mcginty/snow, tests/vectors/cacophony.txt at 8ac60f51cfe3e010c84f0a454cc575ad9204fa12).
# Messages 0-2 are the handshake (initiator, responder, initiator); 3-5 are transport messages,
# responder first, then alternating.
NOISE_XX = {
    "init_prologue": "4a6f686e2047616c74",
    "init_static": "e61ef9919cde45dd5f82166404bd08e38bceb5dfdfded0a34c8df7ed542214d1",
    "init_ephemeral": "893e28b9dc6ca8d611ab664754b8ceb7bac5117349a4439a6b0569da977c464a",
    "resp_prologue": "4a6f686e2047616c74",
    "resp_static": "4a3acbfdb163dec651dfa3194dece676d437029c62a408b4c5ea9114246e4893",
    "resp_ephemeral": "bbdb4cdbd309f1a1f2e1456967fe288cadd6f712d65dc7b7793d5e63da6b375b",
    "handshake_hash": "c8e5f64e846193be2a834104c2a009868d6c9f3bd3c186299888b488b2f1f58e",
    "messages": [
        ("4c756477696720766f6e204d69736573",
         "ca35def5ae56cec33dc2036731ab14896bc4c75dbb07a61f879f8e3afa4c79444c756477696720766f6e204d69736573"),
        ("4d757272617920526f746862617264",
         "95ebc60d2b1fa672c1f46a8aa265ef51bfe38e7ccb39ec5be34069f14480884381cbad1f276e038c48378ffce2b65285"
         "e08d6b68aaa3629a5a8639392490e5b9bd5269c2f1e4f488ed8831161f19b7815528f8982ffe09be9b5c412f8a0db50f"
         "8814c7194e83f23dbd8d162c9326ad"),
        ("462e20412e20486179656b",
         "c7195ffacac1307ff99046f219750fc47693e23c3cb08b89c2af808b444850a80ae475b9df0f169ae80a89be0865b57f"
         "58c9fea0d4ec82a286427402f113e4b6ae769a1d95941d49b25030"),
        ("4361726c204d656e676572", "96763ed773f8e47bb3712f0e29b3060ffc956ffc146cee53d5e1df"),
        ("4a65616e2d426170746973746520536179",
         "3e40f15f6f3a46ae446b253bf8b1d9ffb6ed9b174d272328ff91a7e2e5c79c07f5"),
        ("457567656e2042f6686d20766f6e2042617765726b",
         "eb3f3515110702e047a6c9da4478b6ead94873c11c0f2d710ddb3f09fce024b3a58502ae3f"),
    ],
}  # fmt: skip


def _key(hex_text: str) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(bytes.fromhex(hex_text))


def test_noise_xx_cacophony_vector():
    v, h = NOISE_XX, bytes.fromhex
    initiator = XXHandshake(None, True, prologue=h(v["init_prologue"]), static_key=_key(v["init_static"]),
                            ephemeral_key=_key(v["init_ephemeral"]))  # fmt: skip
    responder = XXHandshake(None, False, prologue=h(v["resp_prologue"]), static_key=_key(v["resp_static"]),
                            ephemeral_key=_key(v["resp_ephemeral"]))  # fmt: skip
    sender, receiver = initiator, responder
    for payload, ciphertext in v["messages"][:3]:
        message = sender.write_message(h(payload))
        assert message.hex() == ciphertext
        assert receiver.read_message(message) == h(payload)
        sender, receiver = receiver, sender
    assert initiator.complete and responder.complete
    assert initiator.handshake_hash == responder.handshake_hash == h(v["handshake_hash"])
    i_send, i_recv = initiator.split()
    r_send, r_recv = responder.split()
    for n, (payload, ciphertext) in enumerate(v["messages"][3:]):
        send, recv = (r_send, i_recv) if n % 2 == 0 else (i_send, r_recv)
        frame = send.encrypt(h(payload))
        assert frame.hex() == ciphertext
        assert recv.decrypt(frame) == h(payload)


def test_noise_xx_vector_message_tampering_is_refused():
    """The same fixed handshake with one flipped bit in message 2 fails authentication."""
    from lattice.errors import HandshakeError

    v, h = NOISE_XX, bytes.fromhex
    responder = XXHandshake(None, False, prologue=h(v["resp_prologue"]), static_key=_key(v["resp_static"]),
                            ephemeral_key=_key(v["resp_ephemeral"]))  # fmt: skip
    initiator = XXHandshake(None, True, prologue=h(v["init_prologue"]), static_key=_key(v["init_static"]),
                            ephemeral_key=_key(v["init_ephemeral"]))  # fmt: skip
    responder.read_message(initiator.write_message(h(v["messages"][0][0])))
    message = bytearray(h(v["messages"][1][1]))
    message[40] ^= 1
    with pytest.raises(HandshakeError):
        initiator.read_message(bytes(message))


# ------------------------------------------------------------------------------------------ Yamux
# Frame header layout from the Yamux spec (github.com/hashicorp/yamux, spec.md: version 8 bits,
# type 8, flags 16, stream id 32, length 32, network order); byte vectors from nim-libp2p
# (github.com/vacp2p/nim-libp2p, tests/libp2p/muxers/test_yamux_header.nim).
YAMUX_HEADERS = [
    ((TYPE_DATA, FLAG_SYN, 1, 100), [0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 100]),  # data
    ((1, FLAG_SYN, 5, 1000), [0, 1, 0, 1, 0, 0, 0, 5, 0, 0, 0x03, 0xE8]),  # window update
    ((TYPE_PING, FLAG_SYN, 0, 0x12345678), [0, 2, 0, 1, 0, 0, 0, 0, 0x12, 0x34, 0x56, 0x78]),  # ping
    ((3, 0, 0, 1), [0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]),  # go away, protocol error
    ((TYPE_DATA, FLAG_SYN | FLAG_ACK | FLAG_FIN | FLAG_RST, 0xFFFFFFFF, 0xFFFFFFFF),
     [0, 0, 0, 15, 255, 255, 255, 255, 255, 255, 255, 255]),  # boundary values
    ((TYPE_DATA, 0, 0, 0), [0] * 12),
    ((TYPE_DATA, 0, 0x01020304, 0), [0, 0, 0, 0, 1, 2, 3, 4, 0, 0, 0, 0]),  # big-endian stream id
]  # fmt: skip


@pytest.mark.parametrize(("fields", "expected"), YAMUX_HEADERS)
def test_yamux_header_encoding(fields, expected):
    assert header(*fields) == bytes(expected)


async def test_yamux_session_reads_the_vector_frames():
    """The vector frames as a peer sends them: the session opens the streams, delivers the data,
    acknowledges the ping with the same opaque value and notes the go-away."""
    async with yamux_under_test() as peer:
        data = bytes(range(100))
        await peer.send_plain(bytes(YAMUX_HEADERS[0][1]) + data)  # SYN + 100 bytes on stream 1
        await peer.send_plain(bytes(YAMUX_HEADERS[1][1]))  # SYN window update opens stream 5
        await peer.send_plain(bytes(YAMUX_HEADERS[2][1]))  # ping 0x12345678
        with trio.fail_after(5):
            reply = await peer.receive_plain()
            while len(reply) < 12 or reply[1] != TYPE_PING:  # skip our ACKs of the two streams
                reply = reply[12:] if len(reply) > 12 else await peer.receive_plain()
        assert reply[:12] == bytes([0, 2, 0, 2, 0, 0, 0, 0, 0x12, 0x34, 0x56, 0x78])  # ping ACK, same id
        assert [s.id for s in peer.streams] == [1, 5]
        with trio.fail_after(5):
            assert await peer.streams[0].read_exactly(100) == data
        await peer.send_plain(bytes(YAMUX_HEADERS[3][1]))
        with trio.fail_after(5):
            while not peer.session.going_away:
                await trio.sleep(0.005)


# ------------------------------------------------------------------------------ multistream-select
# multistream-select README (github.com/multiformats/multistream-select): every message is a
# uvarint length-prefixed line whose length counts the trailing newline; "na\n" is 0x036e610a and
# "ls\n" is 0x036c730a. The header "/multistream/1.0.0\n" is 19 bytes, so it goes out as 0x13 + text.
MULTISTREAM = [
    ("/multistream/1.0.0", "132f6d756c746973747265616d2f312e302e300a"),
    ("na", "036e610a"),
    ("ls", "036c730a"),
    ("/noise", "072f6e6f6973650a"),
    ("/yamux/1.0.0", "0d2f79616d75782f312e302e300a"),
]


class _Bytes:
    """A ByteStream that yields fixed bytes one at a time (the worst split a peer can choose)."""

    def __init__(self, data: bytes) -> None:
        self.data = bytearray(data)
        self.sent = bytearray()

    async def send_all(self, data: bytes) -> None:
        self.sent += data

    async def receive_some(self, max_bytes: int = 1024) -> bytes:
        chunk = bytes(self.data[:1])
        del self.data[:1]
        return chunk


@pytest.mark.parametrize(("message", "wire"), MULTISTREAM)
async def test_multistream_message_vectors(message, wire):
    assert multistream.encode(message).hex() == wire
    buf = bytearray()
    assert await multistream.read_message(_Bytes(bytes.fromhex(wire)), buf) == message
    assert not buf


async def test_multistream_listener_answers_na_then_accepts():
    """A dialer's bytes from the README's example flow: header, an unknown protocol, a known one."""
    dialer = b"".join(bytes.fromhex(w) for _, w in MULTISTREAM[:1]) + multistream.encode("/nope")
    stream = _Bytes(dialer + multistream.encode("/noise"))
    proto, _ = await multistream.select_inbound(stream, lambda p: p == "/noise", bytearray())
    assert proto == "/noise"
    expected = [
        bytes.fromhex(MULTISTREAM[0][1]),
        bytes.fromhex(MULTISTREAM[1][1]),
        bytes.fromhex(MULTISTREAM[3][1]),
    ]
    assert bytes(stream.sent) == b"".join(expected)


# -------------------------------------------------------------------------------------- multiaddr
# From rust-multiaddr (github.com/multiformats/rust-multiaddr, tests/lib.rs construct_success at
# 33f1de2cb2c4a265b3d2dae3fe522d7bcf61ae11), the ones whose protocols Lattice supports; the first
# three are also go-multiaddr's TestStringToBytes vectors.
PEER = "QmcgpsyWgH8Y8ajJz1Cu72KnS5uo2Aa2LpzU7kinSupNKC"
PEER_HEX = "A503221220D52EBB89D85B02A284948203A62FF28389C57C9F42BEEC4EC20DB76A68911C0B"
IP6 = "2001:8a0:7ac5:4201:3ac9:86ff:fe31:7095"
MULTIADDRS = [
    ("/ip4/127.0.0.1/udp/1234", "047F000001910204D2"),
    ("/ip4/127.0.0.1/tcp/4321", "047F0000010610E1"),
    ("/ip4/127.0.0.1/udp/1234/ip4/127.0.0.1/tcp/4321", "047F000001910204D2047F0000010610E1"),
    ("/ip4/1.2.3.4", "0401020304"),
    ("/ip4/0.0.0.0", "0400000000"),
    ("/ip6/::1", "2900000000000000000000000000000001"),
    ("/ip6/2601:9:4f81:9700:803e:ca65:66e8:c21", "29260100094F819700803ECA6566E80C21"),
    ("/udp/0", "91020000"),
    ("/tcp/0", "060000"),
    ("/udp/1234", "910204D2"),
    ("/tcp/1234", "0604D2"),
    ("/udp/65535", "9102FFFF"),
    ("/tcp/65535", "06FFFF"),
    (f"/p2p/{PEER}", PEER_HEX),
    (f"/p2p/{PEER}/tcp/1234", PEER_HEX + "0604D2"),
    ("/ip4/127.0.0.1/udp/0", "047F00000191020000"),
    ("/ip4/127.0.0.1/tcp/1234", "047F0000010604D2"),
    (f"/ip4/127.0.0.1/p2p/{PEER}", "047F000001" + PEER_HEX),
    (f"/ip4/127.0.0.1/p2p/{PEER}/tcp/1234", "047F000001" + PEER_HEX + "0604D2"),
    (f"/ip6/{IP6}/tcp/8000/ws/p2p/{PEER}", "29200108A07AC542013AC986FFFE317095061F40DD03" + PEER_HEX),
    (f"/ip6/{IP6}/tcp/8000/wss/p2p/{PEER}", "29200108A07AC542013AC986FFFE317095061F40DE03" + PEER_HEX),
    (f"/ip4/127.0.0.1/tcp/9090/p2p-circuit/p2p/{PEER}", "047F000001062382A202" + PEER_HEX),
    ("/dnsaddr/sjc-1.bootstrap.libp2p.io", "3819736A632D312E626F6F7473747261702E6C69627032702E696F"),
    ("/dnsaddr/sjc-1.bootstrap.libp2p.io/tcp/1234/p2p/QmNnooDu7bfjPFoTZYxMNLWUQJyrVwtbZg5gBMjTezGAJN",
     "3819736A632D312E626F6F7473747261702E6C69627032702E696F0604D2"
     "A50322122006B3608AA000274049EB28AD8E793A26FF6FAB281A7D3BD77CD18EB745DFAABB"),
    ("/ip4/127.0.0.1/tcp/127/ws", "047F00000106007FDD03"),
    ("/ip4/127.0.0.1/tcp/127/tls", "047F00000106007FC003"),
    ("/ip4/127.0.0.1/tcp/127/tls/ws", "047F00000106007FC003DD03"),
    ("/ip4/127.0.0.1/tcp/127/noise", "047F00000106007FC603"),
]  # fmt: skip

# rust-multiaddr's construct_fail cases within the supported protocols.
BAD_MULTIADDRS = [
    "/ip4", "/ip4/::1", "/ip4/fdpsofodsajfdoisa", "/ip6", "/udp", "/tcp", "/udp/65536", "/tcp/65536",
    "/ip4/127.0.0.1/udp/jfodsajfidosajfoidsa", "/ip4/127.0.0.1/udp",
    "/ip4/127.0.0.1/tcp/jfodsajfidosajfoidsa", "/ip4/127.0.0.1/tcp", "/ip4/127.0.0.1/p2p",
    "/ip4/127.0.0.1/p2p/tcp", "/p2p-circuit/50",
]  # fmt: skip


@pytest.mark.parametrize(("text", "wire"), MULTIADDRS)
def test_multiaddr_vectors(text, wire):
    addr = Multiaddr.parse(text)
    assert addr.to_bytes().hex().upper() == wire
    assert str(addr) == text
    assert Multiaddr.from_bytes(bytes.fromhex(wire)) == addr


def test_multiaddr_ipfs_alias_reads_as_p2p():
    # js-multiaddr (github.com/multiformats/js-multiaddr, test/index.spec.ts): /ipfs/ prints as /p2p/
    assert (
        str(Multiaddr.parse(f"/ip4/127.0.0.1/ipfs/{PEER}/tcp/1234")) == f"/ip4/127.0.0.1/p2p/{PEER}/tcp/1234"
    )


@pytest.mark.parametrize("text", BAD_MULTIADDRS)
def test_multiaddr_invalid_vectors(text):
    with pytest.raises(MultiaddrError):
        Multiaddr.parse(text)


# --------------------------------------------------------------------------------------- protobuf
# The protobuf encoding guide (protobuf.dev/programming-guides/encoding): field 1 = 150 is
# "08 96 01", field 2 = "testing" is "12 07 74 65 73 74 69 6e 67", the embedded message
# {1: 150} in field 3 is "1a 03 08 96 01"; the varint 300 is "ac 02", and a uint64 takes at most
# 10 bytes (2**64 - 1 is nine 0xff and a 0x01).
VARINTS = [(0, "00"), (1, "01"), (127, "7f"), (128, "8001"), (150, "9601"), (300, "ac02"), (16383, "ff7f"),
           (16384, "808001"), (2**32 - 1, "ffffffff0f"), (2**64 - 1, "ffffffffffffffffff01")]  # fmt: skip


@pytest.mark.parametrize(("value", "wire"), VARINTS)
def test_protobuf_varint_vectors(value, wire):
    assert _proto.encode_uvarint(value).hex() == wire
    assert _proto.decode_uvarint(bytes.fromhex(wire)) == (value, len(wire) // 2)


def test_protobuf_field_vectors():
    assert _proto.encode([(1, 150)]).hex() == "089601"
    assert _proto.encode([(2, "testing")]).hex() == "120774657374696e67"
    assert _proto.encode([(3, _proto.encode([(1, 150)]))]).hex() == "1a03089601"
    assert _proto.decode(bytes.fromhex("089601")) == {1: [150]}
    assert _proto.decode(bytes.fromhex("120774657374696e67")) == {2: [b"testing"]}
    nested = _proto.decode(bytes.fromhex("1a03089601"))
    assert _proto.decode(nested[3][0]) == {1: [150]}
    # fixed-width fields (I64 = wire type 1, I32 = 5) are skipped, the rest still read
    skipped = bytes([1 << 3 | 1]) + struct.pack("<d", 1.5) + bytes([2 << 3 | 5]) + struct.pack("<f", 2.5)
    assert _proto.decode(skipped + bytes.fromhex("189601")) == {3: [150]}
    with pytest.raises(_proto.DecodeError):
        _proto.decode_uvarint(bytes.fromhex("ff" * 10 + "01"))  # 11 bytes: longer than any uint64
