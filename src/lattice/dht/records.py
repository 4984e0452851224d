"""Signed, expiring DHT records with subkeys, ownership and per-namespace validators.

A record lives in a slot ``(key, subkey)``. The subkey defaults to the publisher's peer id, so every
writer has its own entry under a shared key (a dictionary value, one entry per writer) and nobody can
overwrite somebody else's. Keys under ``/owned/<peer id>/`` accept records from that peer only. A
record replaces the one in its slot only if it comes from the same publisher and is newer. A subkey that
is a peer id (raw multihash or base58 text) must be that peer's own: otherwise a stranger could take
another peer's default slot ahead of it and hide its value (mesh announcements live there). Every hop
verifies the signature (domain-separated, over a canonical msgpack encoding; once per distinct
record: valid signatures are remembered); values above ``MAX_VALUE`` are refused at ``put`` with
a clear error, never stored and silently dropped.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import msgpack

from lattice.errors import IdentityError, LatticeError
from lattice.identity import KeyPair, PeerId, PublicKey, b58decode, verify_for

MAX_KEY = 512
MAX_SUBKEY = 128
MIN_PEER_ID = 34  # bytes of the shortest real peer id (a sha2-256 multihash); shorter ones are not ids
MAX_VALUE = 64 * 1024
MAX_TTL = 30 * 24 * 3600.0
CLOCK_SKEW = 120.0
SIGN_CONTEXT = "dht-record"
OWNED_PREFIX = b"/owned/"
VERIFIED_CACHE = 4096  # signatures remembered as valid (a record seen again is not re-verified)


class RecordError(LatticeError):
    """A record is invalid (bad signature, expired, too large, not allowed by its namespace)."""


@dataclass(frozen=True)
class Record:
    key: bytes
    subkey: bytes
    value: bytes
    publisher: bytes  # raw Ed25519 public key (32 bytes)
    published_at: float
    expires_at: float
    signature: bytes

    @property
    def publisher_id(self) -> PeerId:
        return PublicKey(self.publisher).peer_id()

    def encode(self) -> bytes:
        return msgpack.packb(
            [
                self.key,
                self.subkey,
                self.value,
                self.publisher,
                self.published_at,
                self.expires_at,
                self.signature,
            ],
            use_bin_type=True,
        )

    @classmethod
    def decode(cls, data: bytes) -> Record:
        try:
            fields = msgpack.unpackb(data, raw=True, max_bin_len=MAX_VALUE + MAX_KEY + 256, max_array_len=8)
        except Exception:
            raise RecordError("malformed record") from None
        if not isinstance(fields, list) or len(fields) != 7:
            raise RecordError("malformed record")
        key, subkey, value, publisher, published_at, expires_at, signature = fields
        if not all(isinstance(x, bytes) for x in (key, subkey, value, publisher, signature)):
            raise RecordError("malformed record fields")
        if not all(isinstance(x, float | int) for x in (published_at, expires_at)):
            raise RecordError("malformed record times")
        return cls(key, subkey, value, publisher, float(published_at), float(expires_at), signature)


def signed_bytes(key: bytes, subkey: bytes, value: bytes, published_at: float, expires_at: float) -> bytes:
    """What a record's signature covers (canonical msgpack of every field but the publisher)."""
    return msgpack.packb([key, subkey, value, published_at, expires_at], use_bin_type=True)


def create(
    keypair: KeyPair,
    key: bytes,
    value: bytes,
    expires_at: float,
    subkey: bytes | None = None,
    now: float | None = None,
) -> Record:
    """A signed record; raises RecordError (clear message) if it would not be accepted."""
    now = time.time() if now is None else now
    subkey = keypair.peer_id.multihash if subkey is None else subkey
    if len(value) > MAX_VALUE:
        raise RecordError(f"value of {len(value)} bytes is over the limit of {MAX_VALUE} bytes")
    signed = signed_bytes(key, subkey, value, now, expires_at)
    signature = keypair.sign_for(SIGN_CONTEXT, signed)
    record = Record(key, subkey, value, keypair.public_key.raw, now, expires_at, signature)
    _remember(_digest(record.publisher, signed, signature))  # we just signed it: valid by construction
    validate(record, now)  # every other rule (lengths, times, owned keys, validators)
    return record


_verified: OrderedDict[bytes, None] = OrderedDict()
_keys: dict[bytes, PublicKey] = {}  # publisher keys seen recently (parsing one costs ~12 us)


def _digest(publisher: bytes, signed: bytes, signature: bytes) -> bytes:
    # lengths fixed (publisher) or prefixed (signature): no two triples give the same input
    return hashlib.sha256(publisher + len(signature).to_bytes(4, "big") + signature + signed).digest()


def _remember(digest: bytes) -> None:
    _verified[digest] = None
    if len(_verified) > VERIFIED_CACHE:
        _verified.popitem(last=False)


def _public_key(raw: bytes) -> PublicKey:
    key = _keys.get(raw)
    if key is None:
        key = PublicKey(raw)
        if len(_keys) >= VERIFIED_CACHE:
            _keys.clear()
        _keys[raw] = key
    return key


def _signature_ok(public: PublicKey, signed: bytes, signature: bytes) -> bool:
    """Verify once per distinct (publisher, signed bytes, signature): the publisher stores its own
    record right after signing it, and gets and republishing bring back records already seen. The
    cache key is a digest of all three, so only the very same triple can hit."""
    digest = _digest(public.raw, signed, signature)
    if digest in _verified:
        _verified.move_to_end(digest)
        return True
    if not verify_for(public, SIGN_CONTEXT, signed, signature):
        return False
    _remember(digest)
    return True


def subkey_peer(subkey: bytes) -> PeerId | None:
    """The peer a subkey names, if it is a peer id: its multihash bytes or its base58 text."""
    if len(subkey) < MIN_PEER_ID:
        return None
    candidates = [subkey]
    if subkey.isascii() and subkey.isalnum():
        try:
            candidates.append(b58decode(subkey.decode()))
        except ValueError:
            pass
    for raw in candidates:
        if len(raw) >= MIN_PEER_ID:
            try:
                return PeerId(raw)
            except (IdentityError, ValueError):
                continue
    return None


def _check_subkey(record: Record, public: PublicKey) -> None:
    """A subkey naming a peer belongs to that peer (the default slot of every writer)."""
    if record.subkey == _default_subkey(public):
        return
    named = subkey_peer(record.subkey)
    if named is not None and named != public.peer_id():
        raise RecordError("a subkey that is a peer id must be signed by that peer")


def _default_subkey(public: PublicKey) -> bytes:
    """The publisher's own peer id multihash (Ed25519: identity multihash of the protobuf key)."""
    return b"\x00\x24\x08\x01\x12\x20" + public.raw


Validator = Callable[[Record], None]
_VALIDATORS: dict[bytes, Validator] = {}


def register_validator(prefix: bytes, validator: Validator) -> None:
    """Extra checks for keys starting with ``prefix`` (raise RecordError to reject)."""
    _VALIDATORS[prefix] = validator


def validate(record: Record, now: float | None = None) -> None:
    """Every check a node makes before storing or returning a record."""
    now = time.time() if now is None else now
    if not 0 < len(record.key) <= MAX_KEY or len(record.subkey) > MAX_SUBKEY:
        raise RecordError("record key or subkey has an invalid length")
    if len(record.value) > MAX_VALUE:
        raise RecordError(f"value of {len(record.value)} bytes is over the limit of {MAX_VALUE} bytes")
    if record.expires_at <= now:
        raise RecordError("record has expired")
    if record.expires_at > now + MAX_TTL or record.published_at > now + CLOCK_SKEW:
        raise RecordError("record times are out of range")
    try:
        public = _public_key(record.publisher)
    except (IdentityError, ValueError):
        raise RecordError("record publisher key is invalid") from None
    signed = signed_bytes(record.key, record.subkey, record.value, record.published_at, record.expires_at)
    if not _signature_ok(public, signed, record.signature):
        raise RecordError("record signature is invalid")
    _check_subkey(record, public)
    if record.key.startswith(OWNED_PREFIX):
        owner = record.key[len(OWNED_PREFIX) :].split(b"/", 1)[0]
        if owner.decode("ascii", "replace") != public.peer_id().to_base58():
            raise RecordError("only the owner may write an owned key")
    for prefix, validator in _VALIDATORS.items():
        if record.key.startswith(prefix):
            validator(record)


def may_replace(old: Record | None, new: Record, now: float | None = None) -> bool:
    """Whether ``new`` may take the slot of ``old`` (same slot assumed)."""
    now = time.time() if now is None else now
    if old is None or old.expires_at <= now:
        return True
    return old.publisher == new.publisher and new.published_at > old.published_at
