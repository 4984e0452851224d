"""Signed CRDT updates: one Yjs v1 update, its document, its author and the author's sequence number.

The signature covers a canonical msgpack of ``[doc, author, seq, data, prev]`` with a domain-separated
context, so an update cannot be moved to another document, renumbered or replayed as something else.
``prev`` is the digest of the author's previous update (zeros for seq 1): an author's updates form a
hash chain, so a receiver of a contiguous run verifies one signature (the newest) and the hashes
below it, instead of one Ed25519 verification (~100 us here) per update.
Every field is bounded and checked before anything is allocated from it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property

import msgpack

from lattice.errors import IdentityError, PayloadError
from lattice.identity import KeyPair, PeerId, verify_for

MAX_UPDATE = 256 * 1024
MAX_DOC_NAME = 200
MAX_SEQ = 2**63 - 1
SIGN_CONTEXT = "lattice-crdt-update"
_MAX_AUTHOR = 128
_SIGNATURE_LEN = 64
MAX_ENCODED = MAX_UPDATE + MAX_DOC_NAME * 4 + _MAX_AUTHOR + _SIGNATURE_LEN + 128
NO_PREV = bytes(32)


@dataclass(frozen=True)
class SignedUpdate:
    doc: str
    author: PeerId
    seq: int
    data: bytes
    signature: bytes
    prev: bytes = NO_PREV

    def encode(self) -> bytes:
        return self._encoded

    @cached_property
    def _encoded(self) -> bytes:  # an update is encoded for the log and for every push: once
        return msgpack.packb(
            [self.doc, self.author.multihash, self.seq, self.data, self.signature, self.prev],
            use_bin_type=True,
        )

    @cached_property
    def _signed(self) -> bytes:
        return _signed_bytes(self.doc, self.author, self.seq, self.data, self.prev)

    def digest(self) -> bytes:
        """What the author's next update names as ``prev`` (covers every signed field)."""
        return self._digest

    @cached_property
    def _digest(self) -> bytes:
        return hashlib.sha256(self._signed).digest()

    @classmethod
    def decode(cls, raw: bytes) -> SignedUpdate:
        """Parse and structurally validate (not the signature: see :meth:`verify`)."""
        if len(raw) > MAX_ENCODED:
            raise PayloadError(f"CRDT update of {len(raw)} bytes is over the limit")
        try:
            fields = msgpack.unpackb(
                raw,
                raw=False,
                max_bin_len=MAX_UPDATE,
                max_str_len=MAX_DOC_NAME * 4,
                max_array_len=6,
                max_map_len=0,
                max_ext_len=0,
            )
        except Exception:
            raise PayloadError("malformed CRDT update") from None
        if not isinstance(fields, list) or len(fields) != 6:
            raise PayloadError("malformed CRDT update")
        doc, author, seq, data, signature, prev = fields
        if not isinstance(prev, bytes) or len(prev) != 32:
            raise PayloadError("malformed CRDT update chain link")
        if not isinstance(doc, str) or not isinstance(author, bytes) or not isinstance(data, bytes):
            raise PayloadError("malformed CRDT update fields")
        if not isinstance(signature, bytes) or type(seq) is not int:
            raise PayloadError("malformed CRDT update fields")
        check_fields(doc, seq, data)
        if len(signature) != _SIGNATURE_LEN or len(author) > _MAX_AUTHOR:
            raise PayloadError("malformed CRDT update signature or author")
        try:
            peer = PeerId(author)
        except IdentityError:
            raise PayloadError("CRDT update author is not a valid peer id") from None
        update = cls(doc, peer, seq, data, signature, prev)
        update.__dict__["_encoded"] = bytes(raw)  # forwarded and logged as received (it parsed)
        return update

    def verify(self) -> bool:
        """Whether the signature was made by ``author`` over exactly these fields."""
        try:
            public = self.author.public_key()
        except IdentityError:
            return False
        if public is None:
            return False
        return verify_for(public, SIGN_CONTEXT, self._signed, self.signature)


def check_fields(doc: str, seq: int, data: bytes) -> None:
    """The limits every update must respect (raised as PayloadError)."""
    if not 0 < len(doc) <= MAX_DOC_NAME:
        raise PayloadError(f"document name must have 1 to {MAX_DOC_NAME} characters")
    if not 1 <= seq <= MAX_SEQ:
        raise PayloadError("CRDT update sequence number out of range")
    if len(data) > MAX_UPDATE:
        raise PayloadError(f"CRDT update of {len(data)} bytes is over the limit of {MAX_UPDATE} bytes")


def _signed_bytes(doc: str, author: PeerId, seq: int, data: bytes, prev: bytes) -> bytes:
    return msgpack.packb([doc, author.multihash, seq, data, prev], use_bin_type=True)


def sign(keypair: KeyPair, doc: str, seq: int, data: bytes, prev: bytes = NO_PREV) -> SignedUpdate:
    """A signed update authored by ``keypair`` (raises PayloadError if it breaks a limit); ``prev`` is
    the digest of the author's update ``seq - 1``."""
    check_fields(doc, seq, data)
    signature = keypair.sign_for(SIGN_CONTEXT, _signed_bytes(doc, keypair.peer_id, seq, data, prev))
    return SignedUpdate(doc, keypair.peer_id, seq, bytes(data), signature, bytes(prev))
