"""libp2p Kademlia wire messages (protobuf ``dht.pb.Message``), encoded with the bounded codec.

The messages are libp2p's, so go/rust/py libp2p peers route through a Lattice node (FIND_NODE) and
exchange provider records with it (ADD_PROVIDER, GET_PROVIDERS), under a shared protocol id (the
``libp2p`` or ``lattica`` swarm profile). Values do not cross implementations: a Lattice record in
``Message.record.value`` is a msgpack Record signed by its publisher (records.py), which other
implementations neither make nor check; a Lattice node refuses their records (a libp2p ``/pk/`` or
``/ipns/`` record, a Lattica pickle) with a stream reset, and never decodes them beyond msgpack.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lattice import _proto
from lattice.errors import IdentityError, PayloadError
from lattice.identity import PeerId
from lattice.multiaddr import Multiaddr, MultiaddrError

PUT_VALUE, GET_VALUE, ADD_PROVIDER, GET_PROVIDERS, FIND_NODE, PING = range(6)
# Lattice extension (a field libp2p does not define, so go/rust peers skip it and echo PUT_VALUE
# without peers): a PUT_VALUE asking the replica to list its closest peers to the key in the reply,
# which then also answers the store's lookup query to that peer (one round trip instead of two).
WANT_CLOSER = 100
MAX_MESSAGE = 256 * 1024
MAX_PEERS = 40
MAX_ADDRS = 16


@dataclass
class PeerEntry:
    peer: PeerId
    addrs: list[Multiaddr] = field(default_factory=list)
    connection: int = 0


@dataclass
class Message:
    type: int
    key: bytes = b""
    record_key: bytes | None = None
    record_value: bytes | None = None
    closer: list[PeerEntry] = field(default_factory=list)
    providers: list[PeerEntry] = field(default_factory=list)
    want_closer: bool = False  # PUT_VALUE only: list closer peers in the reply (WANT_CLOSER)


_ENTRY_CACHE: dict[bytes, PeerEntry] = {}  # replies repeat the same peers: decode each once
_CACHE_MAX = 8192


_ENCODED: dict[tuple, bytes] = {}


def _encode_peer(entry: PeerEntry) -> bytes:
    cache_key = (entry.peer, tuple(entry.addrs[:MAX_ADDRS]), entry.connection)
    cached = _ENCODED.get(cache_key)
    if cached is None:
        cached = _build_peer(entry)
        if len(_ENCODED) >= _CACHE_MAX:
            _ENCODED.clear()
        _ENCODED[cache_key] = cached
    return cached


def _build_peer(entry: PeerEntry) -> bytes:
    fields: list = [(1, entry.peer.multihash)]
    fields += [(2, a.to_bytes()) for a in entry.addrs[:MAX_ADDRS]]
    if entry.connection:
        fields.append((3, entry.connection))
    return _proto.encode(fields)


def _decode_peer(data: bytes) -> PeerEntry | None:
    cached = _ENTRY_CACHE.get(data)
    if cached is not None:
        return PeerEntry(cached.peer, cached.addrs, cached.connection)
    entry = _parse_peer(data)
    if entry is not None:
        if len(_ENTRY_CACHE) >= _CACHE_MAX:
            _ENTRY_CACHE.clear()
        _ENTRY_CACHE[bytes(data)] = entry
    return entry


def _parse_peer(data: bytes) -> PeerEntry | None:
    fields = _proto.decode(data, max_fields=MAX_ADDRS * 4 + 8)
    raw = _proto.one_bytes(fields, 1, required=True)
    try:
        peer = PeerId(raw)
    except IdentityError:
        return None
    addrs = []
    for a in _proto.all_bytes(fields, 2)[:MAX_ADDRS]:
        try:
            addrs.append(Multiaddr.from_bytes(a))
        except MultiaddrError:
            continue
    return PeerEntry(peer, addrs, _proto.one_int(fields, 3, 0) or 0)


def encode(message: Message) -> bytes:
    fields: list = [(1, message.type)]
    if message.key:
        fields.append((2, message.key))
    if message.record_key is not None or message.record_value is not None:
        rec = _proto.encode([(1, message.record_key or message.key), (2, message.record_value or b"")])
        fields.append((3, rec))
    fields += [(8, _encode_peer(p)) for p in message.closer[:MAX_PEERS]]
    fields += [(9, _encode_peer(p)) for p in message.providers[:MAX_PEERS]]
    if message.want_closer:
        fields.append((WANT_CLOSER, 1))
    return _proto.encode(fields)


def decode(data: bytes) -> Message:
    if len(data) > MAX_MESSAGE:
        raise PayloadError("DHT message too large")
    try:
        fields = _proto.decode(data, max_fields=4 * MAX_PEERS + 16)
        mtype = _proto.one_int(fields, 1, 0)
        if mtype not in range(6):
            raise PayloadError(f"unknown DHT message type {mtype}")
        message = Message(mtype, _proto.one_bytes(fields, 2) or b"")
        message.want_closer = mtype == PUT_VALUE and bool(_proto.one_int(fields, WANT_CLOSER, 0))
        rec = _proto.one_bytes(fields, 3)
        if rec is not None:
            rf = _proto.decode(rec, max_fields=16)
            message.record_key = _proto.one_bytes(rf, 1)
            message.record_value = _proto.one_bytes(rf, 2)
        for number, target in ((8, message.closer), (9, message.providers)):
            for raw in _proto.all_bytes(fields, number)[:MAX_PEERS]:
                entry = _decode_peer(raw)
                if entry is not None:
                    target.append(entry)
    except _proto.DecodeError as exc:
        raise PayloadError(f"malformed DHT message: {exc}") from None
    return message
