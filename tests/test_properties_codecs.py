"""Property tests (hypothesis) for the parsers of peer bytes that are pure functions: protobuf,
multiaddr, msgpack tensors, Kademlia, gossipsub, identify, circuit relay v2 and DCUtR messages.

For each: decode(encode(x)) == x on valid input, and arbitrary (or hostile, structure-aware) input
raises only the documented error type, within the declared bounds and in bounded time (deadline).
"""

from __future__ import annotations

import math
from datetime import timedelta
from types import SimpleNamespace

import msgpack
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lattice import _proto
from lattice.codec import tensors
from lattice.dht import protocol as kad
from lattice.errors import IdentityError, PayloadError, ProtocolError
from lattice.identity import KeyPair, PeerId
from lattice.multiaddr import Multiaddr, MultiaddrError
from lattice.nat import circuit, dcutr
from lattice.pubsub import protocol as gossip
from lattice.transport import identify
from lattice.transport.peerstore import PeerInfo

PROPS = settings(max_examples=150, deadline=timedelta(seconds=2), database=None,
                 suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
SOME_BYTES = st.binary(max_size=512)

# -------------------------------------------------------------------------------------- strategies
KEYS = [KeyPair.from_seed(bytes([i]) * 32) for i in range(8)]  # Ed25519 is slow to draw per example
peer_ids = st.sampled_from([k.peer_id for k in KEYS])
ports = st.integers(0, 65535).map(str)
dns_names = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="/"), min_size=1, max_size=40
)
component = st.one_of(
    st.tuples(st.just("ip4"), st.ip_addresses(v=4).map(str)),
    st.tuples(st.just("ip6"), st.ip_addresses(v=6).map(str)),
    st.tuples(st.sampled_from(["tcp", "udp"]), ports),
    st.tuples(st.sampled_from(["dns", "dns4", "dns6", "dnsaddr"]), dns_names),
    st.tuples(st.just("p2p"), peer_ids.map(PeerId.to_base58)),
    st.tuples(st.sampled_from(["p2p-circuit", "tls", "noise", "quic", "quic-v1", "ws", "wss"]), st.none()),
)
multiaddrs = st.lists(component, min_size=1, max_size=6).map(lambda parts: Multiaddr(tuple(parts)))


def damaged(encoded: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """Valid encodings with one byte changed and maybe cut short: close to valid, so the parser goes
    deep into the structure instead of failing on the first byte."""

    def damage(data: bytes, cut: int, pos: int, byte: int) -> bytes:
        if not data:
            return data
        i = pos % len(data)
        return (data[:i] + bytes([byte]) + data[i + 1 :])[:cut]

    return st.builds(damage, encoded, st.integers(0, 1 << 20), st.integers(0, 1 << 20), st.integers(0, 255))


# --------------------------------------------------------------------------------------- protobuf
proto_values = st.one_of(st.integers(0, 2**64 - 1), st.binary(max_size=64))


@PROPS
@given(st.lists(st.tuples(st.integers(1, 2**29 - 1), proto_values), max_size=20))
def test_protobuf_round_trip(fields):
    expected: dict[int, list] = {}
    for number, value in fields:
        expected.setdefault(number, []).append(value)
    assert _proto.decode(_proto.encode(fields)) == expected


@PROPS
@given(st.integers(0, 2**64 - 1))
def test_varint_round_trip(value):
    data = _proto.encode_uvarint(value)
    assert len(data) <= _proto.MAX_VARINT_BYTES
    assert _proto.decode_uvarint(data + b"tail") == (value, len(data))


@PROPS
@given(SOME_BYTES, st.integers(1, 64))
def test_protobuf_arbitrary_bytes(data, max_fields):
    try:
        fields = _proto.decode(data, max_fields=max_fields)
    except _proto.DecodeError:
        return
    assert sum(len(v) for v in fields.values()) <= max_fields
    assert all(len(v) <= len(data) for vs in fields.values() for v in vs if isinstance(v, bytes))


# -------------------------------------------------------------------------------------- multiaddr
@PROPS
@given(multiaddrs)
def test_multiaddr_round_trip(addr):
    assert Multiaddr.from_bytes(addr.to_bytes()) == addr
    assert Multiaddr.parse(str(addr)) == addr


@PROPS
@given(SOME_BYTES)
def test_multiaddr_from_arbitrary_bytes(data):
    try:
        addr = Multiaddr.from_bytes(data)
    except MultiaddrError:
        return
    assert addr.to_bytes() == data or Multiaddr.from_bytes(addr.to_bytes()) == addr  # canonical forms
    assert Multiaddr.parse(str(addr)) == addr


TOKENS = ["", "ip4", "ip6", "tcp", "udp", "dns", "p2p", "ipfs", "p2p-circuit", "1.2.3.4", "::1", "80",
          "99999", "12D3KooW", KEYS[0].peer_id.to_base58(), "x" * 300, "١٢", "%", ".."]  # fmt: skip


@PROPS
@given(st.one_of(st.text(max_size=300), st.lists(st.sampled_from(TOKENS), max_size=10).map("/".join)))
def test_multiaddr_parse_arbitrary_text(text):
    try:
        addr = Multiaddr.parse(text)
    except MultiaddrError:
        return
    assert Multiaddr.from_bytes(addr.to_bytes()) == addr
    assert Multiaddr.parse(str(addr)) == addr


# ---------------------------------------------------------------------------------------- tensors
DTYPES = ["bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float16",
          "float32", "float64", "complex64", "complex128"]  # fmt: skip
arrays = st.builds(
    lambda dtype, shape, seed: np.random.default_rng(seed).integers(0, 100, size=shape).astype(dtype),
    st.sampled_from(DTYPES), st.lists(st.integers(0, 4), max_size=3).map(tuple), st.integers(0, 2**32),
)  # fmt: skip
plain = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=False),
              st.text(max_size=20), st.binary(max_size=20), arrays),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)  # fmt: skip


def _decode_tensors(doc: bytes, payload: list, max_payload: int):
    value, specs = tensors.parse(doc, max_payload)
    assert sum(s.nbytes for s in specs) <= max_payload
    data = b"".join(bytes(p) for p in payload)
    pos = 0
    for spec in specs:
        buf = tensors.allocate(spec)
        chunk = data[pos : pos + spec.nbytes]
        buf[: len(chunk)] = chunk
        pos += spec.nbytes
    return tensors.finish(value, as_torch=False, max_elements=1 << 16)


def _same(a, b) -> bool:
    if isinstance(a, np.ndarray):
        return (
            isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
        )
    if isinstance(a, list | tuple):
        return (
            isinstance(b, list) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))


@PROPS
@given(plain)
def test_tensor_codec_round_trip(value):
    doc, buffers = tensors.encode(value)
    assert _same(value, _decode_tensors(doc, buffers, 1 << 20))


hostile_meta = st.dictionaries(
    st.sampled_from(["shape", "dtype", "scale", "block", "k", "x"]),
    st.one_of(st.integers(-5, 2**40), st.floats(), st.sampled_from(["float32", "float16", "int8"]),
              st.lists(st.integers(-2, 300), max_size=5), st.none()),
    max_size=6,
)  # fmt: skip
hostile_desc = st.tuples(
    st.one_of(st.sampled_from([*DTYPES, "bfloat16"]), st.text(max_size=5), st.integers(-(2**63), 2**64 - 1)),
    st.one_of(st.lists(st.integers(-2, 2**40), max_size=34), st.integers(-(2**63), 2**64 - 1), st.none()),
    st.one_of(st.integers(-2, 2**40), st.floats(), st.none()),
    st.sampled_from(["numpy", "torch", "cuda", 3]),
    st.sampled_from([None, "fp16", "bf16", "int8", "int8-block", "topk", "topk:0.5", "topk:nan", "nope", 7]),
    st.one_of(hostile_meta, st.integers(-(2**63), 2**64 - 1), st.none()),
).map(list)  # fmt: skip


@PROPS
@given(st.lists(hostile_desc, max_size=3), st.binary(max_size=256), st.integers(0, 4096))
def test_tensor_decode_hostile_descriptors(descs, payload, max_payload):
    doc = msgpack.packb([msgpack.ExtType(tensors.TENSOR_EXT, msgpack.packb(d)) for d in descs])
    try:
        _decode_tensors(doc, [payload], max_payload)
    except PayloadError:
        pass


@PROPS
@given(st.one_of(SOME_BYTES, damaged(plain.map(lambda v: tensors.encode(v)[0]))), st.integers(0, 1 << 20))
def test_tensor_decode_arbitrary_bytes(doc, max_payload):
    try:
        _decode_tensors(doc, [], max_payload)
    except PayloadError:
        pass


# ------------------------------------------------------------------------------------------- kad
peer_entries = st.builds(kad.PeerEntry, peer_ids, st.lists(multiaddrs, max_size=3), st.integers(0, 3))


@st.composite
def kad_messages(draw):
    mtype = draw(st.integers(0, 5))
    message = kad.Message(mtype, draw(st.binary(max_size=40)))
    if draw(st.booleans()):
        message.record_key = draw(st.binary(min_size=1, max_size=40))
        message.record_value = draw(st.binary(max_size=100))
    message.closer = draw(st.lists(peer_entries, max_size=4))
    message.providers = draw(st.lists(peer_entries, max_size=2))
    message.want_closer = mtype == kad.PUT_VALUE and draw(st.booleans())
    return message


@PROPS
@given(kad_messages())
def test_kad_round_trip(message):
    assert kad.decode(kad.encode(message)) == message


@PROPS
@given(st.one_of(SOME_BYTES, damaged(kad_messages().map(kad.encode))))
def test_kad_arbitrary_bytes(data):
    try:
        message = kad.decode(data)
    except PayloadError:
        return
    assert len(message.closer) <= kad.MAX_PEERS and len(message.providers) <= kad.MAX_PEERS
    assert all(len(p.addrs) <= kad.MAX_ADDRS for p in message.closer + message.providers)


# -------------------------------------------------------------------------------------- gossipsub
topics = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
short = st.binary(max_size=64)
gossip_messages = st.builds(
    gossip.Message, topics, st.binary(max_size=100), st.none() | short, st.none() | short, st.none() | short,
    st.none() | st.binary(min_size=1, max_size=64),
)  # fmt: skip
ids = st.lists(st.binary(min_size=1, max_size=32), max_size=4)
rpcs = st.builds(
    gossip.RPC, st.lists(st.tuples(st.booleans(), topics), max_size=3), st.lists(gossip_messages, max_size=3),
    st.lists(st.tuples(topics, ids), max_size=3), ids, st.lists(topics, max_size=3),
    st.lists(st.tuples(topics, st.integers(0, 3600)), max_size=3),
)  # fmt: skip


@PROPS
@given(rpcs)
def test_gossipsub_round_trip(rpc):
    assert gossip.decode(gossip.encode(rpc)) == rpc


@PROPS
@given(st.one_of(SOME_BYTES, damaged(rpcs.map(gossip.encode))))
def test_gossipsub_arbitrary_bytes(data):
    try:
        rpc = gossip.decode(data)
    except PayloadError:
        return
    for items in (rpc.subscriptions, rpc.messages, rpc.ihave, rpc.iwant, rpc.graft, rpc.prune):
        assert len(items) <= gossip.MAX_ITEMS
    assert all(len(t.encode()) <= gossip.MAX_TOPIC for t in rpc.graft)
    assert all(0 <= backoff <= 3600 for _, backoff in rpc.prune)
    for m in rpc.messages:
        m.verify()  # never raises on hostile signatures, keys or peer ids


# --------------------------------------------------------------------------------------- identify
def _identify_host(key: KeyPair, addrs: list[Multiaddr], protocols: list[str]) -> SimpleNamespace:
    config = SimpleNamespace(protocol_version="ipfs/0.1.0", agent_version="lattice/test")
    return SimpleNamespace(config=config, keypair=key, advertised_addrs=lambda: addrs, protocols=protocols)


@PROPS
@given(st.sampled_from(KEYS), st.lists(multiaddrs, max_size=4), st.none() | multiaddrs,
       st.lists(topics.filter(bool), max_size=5))  # fmt: skip
def test_identify_round_trip(key, addrs, observed, protocols):
    data = identify.encode(_identify_host(key, addrs, protocols), observed)
    info = PeerInfo(key.peer_id)
    assert identify.decode(data, info) == observed
    assert info.public_key == key.public_key and info.addrs == addrs and info.protocols == protocols
    assert info.agent_version == "lattice/test"


identify_messages = st.builds(
    lambda key, addrs, observed: identify.encode(_identify_host(key, addrs, ["/ipfs/id/1.0.0"]), observed),
    st.sampled_from(KEYS), st.lists(multiaddrs, max_size=3), st.none() | multiaddrs,
)  # fmt: skip


@PROPS
@given(st.one_of(SOME_BYTES, damaged(identify_messages)))
def test_identify_arbitrary_bytes(data):
    info = PeerInfo(KEYS[0].peer_id)
    try:
        identify.decode(data, info)
    except (_proto.DecodeError, IdentityError, ProtocolError):
        return
    assert len(info.addrs) <= identify.MAX_ADDRS and len(info.protocols) <= identify.MAX_PROTOCOLS
    assert len(info.agent_version) <= 256 and len(info.protocol_version) <= 256


# ------------------------------------------------------------------------------- circuit and DCUtR
circuit_messages = st.builds(
    circuit.CircuitMessage, st.integers(0, 2), st.none() | peer_ids, st.lists(multiaddrs, max_size=3),
    st.none() | st.integers(0, 2**40), st.lists(multiaddrs, max_size=3),
    st.none() | st.builds(circuit.Limit, st.integers(0, 2**31), st.integers(0, 2**40)),
    st.none() | st.sampled_from(sorted(circuit.STATUS_NAMES)),
)  # fmt: skip


@PROPS
@given(circuit_messages, st.booleans())
def test_circuit_round_trip(message, hop):
    if message.peer is None:
        message.peer_addrs = []
    if not hop or message.expire is None:
        message.expire, message.reservation_addrs = None, []
    assert circuit.decode(circuit.encode(message, hop), hop) == message


@PROPS
@given(st.one_of(SOME_BYTES, damaged(circuit_messages.map(lambda m: circuit.encode(m, True)))), st.booleans())
def test_circuit_arbitrary_bytes(data, hop):
    try:
        message = circuit.decode(data, hop)
    except ProtocolError:
        return
    assert (
        len(message.peer_addrs) <= circuit.MAX_ADDRS and len(message.reservation_addrs) <= circuit.MAX_ADDRS
    )


tcp_addrs = st.builds(lambda ip, port: Multiaddr.parse(f"/ip4/{ip}/tcp/{port}"), st.ip_addresses(v=4), ports)


@PROPS
@given(st.sampled_from([dcutr.CONNECT, dcutr.SYNC]), st.lists(tcp_addrs, max_size=dcutr.MAX_ADDRS))
def test_dcutr_round_trip(mtype, addrs):
    framed = dcutr.encode(mtype, addrs)
    length, pos = _proto.decode_uvarint(framed)
    assert length == len(framed) - pos
    assert dcutr.decode(framed[pos:], mtype) == addrs


@PROPS
@given(
    st.one_of(
        SOME_BYTES, damaged(st.lists(tcp_addrs, max_size=4).map(lambda a: dcutr.encode(dcutr.CONNECT, a)[1:]))
    )
)
def test_dcutr_arbitrary_bytes(data):
    try:
        addrs = dcutr.decode(data, dcutr.CONNECT)
    except ProtocolError:
        return
    assert len(addrs) <= dcutr.MAX_ADDRS and all(a.tcp_target() for a in addrs)
