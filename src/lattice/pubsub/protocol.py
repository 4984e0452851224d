"""The gossipsub v1.1 wire format (``/meshsub/1.1.0``): one protobuf ``RPC`` per uvarint-framed message.

    message RPC { repeated SubOpts subscriptions = 1; repeated Message publish = 2;
                  ControlMessage control = 3; }
    message SubOpts { bool subscribe = 1; string topicid = 2; }
    message Message { bytes from = 1; bytes data = 2; bytes seqno = 3; string topic = 4;
                      bytes signature = 5; bytes key = 6; }
    message ControlMessage { repeated ControlIHave ihave = 1; repeated ControlIWant iwant = 2;
                             repeated ControlGraft graft = 3; repeated ControlPrune prune = 4; }
    message ControlIHave { string topicID = 1; repeated bytes messageIDs = 2; }
    message ControlIWant { repeated bytes messageIDs = 1; }
    message ControlGraft { string topicID = 1; }
    message ControlPrune { string topicID = 1; repeated PeerInfo peers = 2; uint64 backoff = 3; }

Signing follows libp2p's ``StrictSign`` policy (the default of go-libp2p and rust-libp2p): a message
carries its publisher (``from``), an 8-byte sequence number and an Ed25519 signature over
``"libp2p-pubsub:" + Message{from, data, seqno, topic}`` (protobuf, field order); its id is
``from + seqno``. Unsigned messages (``StrictNoSign``) are identified by the SHA-256 of topic and data.
Every count and size is bounded while decoding.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from lattice import _proto
from lattice.errors import IdentityError, PayloadError
from lattice.identity import KeyPair, PeerId, PublicKey

PROTOCOL_ID = "/meshsub/1.1.0"
PROTOCOLS = [PROTOCOL_ID, "/meshsub/1.0.0"]
MAX_RPC = 1 << 20  # the usual gossipsub cap on one RPC (and so on one message)
MAX_TOPIC = 512
MAX_ITEMS = 5000  # subscriptions, messages, control entries or ids in one RPC


SIGN_PREFIX = b"libp2p-pubsub:"


@dataclass(frozen=True)
class Message:
    topic: str
    data: bytes
    from_: bytes | None = None  # the publisher's peer id (multihash bytes)
    seqno: bytes | None = None
    signature: bytes | None = None
    key: bytes | None = None  # protobuf public key, when the peer id does not embed it

    @property
    def id(self) -> bytes:
        if self.from_ is not None and self.seqno is not None:
            return self.from_ + self.seqno
        return message_id(self.topic, self.data)

    def signed_bytes(self) -> bytes:
        return SIGN_PREFIX + _proto.encode(
            [(1, self.from_), (2, self.data), (3, self.seqno), (4, self.topic)]
        )

    def verify(self) -> bool:
        """Whether the message is signed by the peer in ``from`` (StrictSign)."""
        if self.from_ is None or self.seqno is None or self.signature is None:
            return False
        try:
            peer = PeerId(self.from_)
            public = PublicKey.from_protobuf(self.key) if self.key else peer.public_key()
        except (IdentityError, ValueError):
            return False
        if public is None or public.peer_id() != peer:
            return False
        return public.verify(self.signature, self.signed_bytes())


def signed(keypair: KeyPair, topic: str, data: bytes, seqno: int) -> Message:
    """A StrictSign message published by ``keypair``."""
    m = Message(topic, data, keypair.peer_id.multihash, seqno.to_bytes(8, "big"))
    return Message(topic, data, m.from_, m.seqno, keypair.sign(m.signed_bytes()))


@dataclass
class RPC:
    subscriptions: list[tuple[bool, str]] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    ihave: list[tuple[str, list[bytes]]] = field(default_factory=list)
    iwant: list[bytes] = field(default_factory=list)
    graft: list[str] = field(default_factory=list)
    prune: list[tuple[str, int]] = field(default_factory=list)  # (topic, backoff seconds)

    def empty(self) -> bool:
        return not (
            self.subscriptions or self.messages or self.ihave or self.iwant or self.graft or self.prune
        )

    def merge(self, other: RPC) -> None:
        self.subscriptions += other.subscriptions
        self.messages += other.messages
        self.ihave += other.ihave
        self.iwant += other.iwant
        self.graft += other.graft
        self.prune += other.prune

    def items(self) -> int:
        """Entries to process: subscriptions, messages, control entries and message ids."""
        return (
            len(self.subscriptions) + len(self.messages) + len(self.iwant) + len(self.graft) + len(self.prune)
            + sum(1 + len(ids) for _, ids in self.ihave)
        )  # fmt: skip

    def size_hint(self) -> int:
        return (
            sum(len(m.data) + len(m.topic) + 8 for m in self.messages)
            + 64 * (len(self.subscriptions) + len(self.ihave) + len(self.graft) + len(self.prune))
            + 40 * (len(self.iwant) + sum(len(ids) for _, ids in self.ihave))
        )


def message_id(topic: str, data: bytes) -> bytes:
    return hashlib.sha256(topic.encode() + b"\0" + data).digest()[:20]


def encode(rpc: RPC) -> bytes:
    fields: list[tuple[int, int | bytes | str | None]] = []
    for subscribe, topic in rpc.subscriptions:
        fields.append((1, _proto.encode([(1, int(subscribe)), (2, topic)])))
    for m in rpc.messages:
        body = [(1, m.from_), (2, m.data), (3, m.seqno), (4, m.topic), (5, m.signature), (6, m.key)]
        fields.append((2, _proto.encode(body)))
    control: list[tuple[int, int | bytes | str | None]] = []
    for topic, ids in rpc.ihave:
        control.append((1, _proto.encode([(1, topic), *((2, i) for i in ids)])))
    if rpc.iwant:
        control.append((2, _proto.encode([(1, i) for i in rpc.iwant])))
    for topic in rpc.graft:
        control.append((3, _proto.encode([(1, topic)])))
    for topic, backoff in rpc.prune:
        control.append((4, _proto.encode([(1, topic), (3, backoff)])))
    if control:
        fields.append((3, _proto.encode(control)))
    return _proto.encode(fields)


def decode(raw: bytes) -> RPC:
    """Parse one RPC (PayloadError on anything malformed or over a limit)."""
    if len(raw) > MAX_RPC:
        raise PayloadError(f"pubsub RPC of {len(raw)} bytes is over the limit")
    try:
        return _decode(raw)
    except (_proto.DecodeError, UnicodeDecodeError) as exc:
        raise PayloadError(f"malformed pubsub RPC: {exc}") from None


def _topic(raw: bytes | None) -> str:
    if raw is None or len(raw) > MAX_TOPIC:
        raise PayloadError("pubsub topic missing or too long")
    return raw.decode()


def _decode(raw: bytes) -> RPC:
    top = _proto.decode(raw, max_fields=3 * MAX_ITEMS)
    rpc = RPC()
    for sub in _proto.all_bytes(top, 1)[:MAX_ITEMS]:
        f = _proto.decode(sub, max_fields=8)
        rpc.subscriptions.append((bool(_proto.one_int(f, 1, 0)), _topic(_proto.one_bytes(f, 2))))
    for msg in _proto.all_bytes(top, 2)[:MAX_ITEMS]:
        f = _proto.decode(msg, max_fields=16)
        sender, seqno, sig, key = (_proto.one_bytes(f, n) for n in (1, 3, 5, 6))
        if any(v is not None and len(v) > 256 for v in (sender, seqno, sig)) or (key and len(key) > 1024):
            raise PayloadError("pubsub message fields too long")
        topic = _topic(_proto.one_bytes(f, 4))
        rpc.messages.append(Message(topic, _proto.one_bytes(f, 2) or b"", sender, seqno, sig, key))
    control = _proto.one_bytes(top, 3)
    if control:
        c = _proto.decode(control, max_fields=4 * MAX_ITEMS)
        for ihave in _proto.all_bytes(c, 1)[:MAX_ITEMS]:
            f = _proto.decode(ihave, max_fields=MAX_ITEMS + 1)
            rpc.ihave.append((_topic(_proto.one_bytes(f, 1)), _ids(_proto.all_bytes(f, 2))))
        for iwant in _proto.all_bytes(c, 2)[:MAX_ITEMS]:
            f = _proto.decode(iwant, max_fields=MAX_ITEMS)
            rpc.iwant += _ids(_proto.all_bytes(f, 1))
        for graft in _proto.all_bytes(c, 3)[:MAX_ITEMS]:
            rpc.graft.append(_topic(_proto.one_bytes(_proto.decode(graft, max_fields=4), 1)))
        for prune in _proto.all_bytes(c, 4)[:MAX_ITEMS]:
            f = _proto.decode(prune, max_fields=MAX_ITEMS + 4)
            rpc.prune.append((_topic(_proto.one_bytes(f, 1)), min(_proto.one_int(f, 3, 0) or 0, 3600)))
    rpc.iwant = rpc.iwant[:MAX_ITEMS]
    return rpc


def _ids(ids: list[bytes]) -> list[bytes]:
    return [i for i in ids[:MAX_ITEMS] if 0 < len(i) <= 128]
