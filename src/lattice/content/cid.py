"""Content ids: CIDv1 with a multihash, spelled in base32 (``bafk...``), as IPFS and iroh do.

    cid       := "b" base32lower(varint(1) varint(codec) multihash)   (multibase prefix "b")
    multihash := varint(hash code) varint(digest length) digest

Chunks are ``raw`` (0x55) blocks; a manifest is a ``dag-json`` (0x0129) block that links to them, so
the id of a manifest names every byte of the content. BLAKE3 (0x1e) when the ``blake3`` package is
installed (3x SHA-256's speed here), SHA2-256 (0x12) otherwise; both are verified. Pure functions,
bounded parsing: a peer's id string is at most ``MAX_TEXT`` characters.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

from lattice._proto import encode_uvarint
from lattice.content.errors import ContentError

_blake3: ModuleType | None
try:
    import blake3 as _blake3
except ImportError:  # pragma: no cover - blake3 is a dependency; SHA-256 still works
    _blake3 = None

__all__ = ["BLAKE3", "DAG_JSON", "RAW", "SHA2_256", "ContentId", "default_hash", "digest"]

RAW = 0x55
DAG_JSON = 0x0129
BLAKE3 = 0x1E
SHA2_256 = 0x12
DIGEST_SIZE = 32
MAX_TEXT = 128  # characters of an id string we parse (ours are 59 or 61)
CODECS = {RAW: "raw", DAG_JSON: "dag-json"}
HASHES = {BLAKE3: "blake3", SHA2_256: "sha2-256"}


def _hasher(code: int) -> Callable[[bytes | memoryview], bytes]:
    if code == BLAKE3:
        if _blake3 is None:
            raise ContentError("this id uses BLAKE3: install the `blake3` package")
        return lambda data: _blake3.blake3(data).digest()
    if code == SHA2_256:
        return lambda data: hashlib.sha256(data).digest()
    raise ContentError(f"unsupported multihash code 0x{code:x}")


def default_hash() -> int:
    """The multihash code new content is added with."""
    return BLAKE3 if _blake3 is not None else SHA2_256


def digest(code: int, data: bytes | memoryview) -> bytes:
    """The ``code`` hash of ``data`` (32 bytes)."""
    return _hasher(code)(data)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    for i in range(pos, min(len(data), pos + 9)):
        byte = data[i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if byte == 0 and i > pos:
                raise ContentError("malformed content id (varint not minimal)")
            return value, i + 1
        shift += 7
    raise ContentError("malformed content id (truncated varint)")


@dataclass(frozen=True)
class ContentId:
    """A CIDv1: what the bytes are (``codec``) and their hash (``hash_code``, ``digest``)."""

    codec: int
    hash_code: int
    digest: bytes

    @classmethod
    def of(cls, data: bytes | memoryview, codec: int = RAW, hash_code: int | None = None) -> ContentId:
        code = default_hash() if hash_code is None else hash_code
        return cls(codec, code, digest(code, data))

    @classmethod
    def parse(cls, text: str | ContentId) -> ContentId:
        """A CIDv1 string (base32, ``b...``); ContentError (one line) for anything else."""
        if isinstance(text, ContentId):
            return text
        if not isinstance(text, str) or not 2 <= len(text) <= MAX_TEXT or text[0] != "b":
            raise ContentError(f"not a content id (a base32 CIDv1, 'b...'): {str(text)[:MAX_TEXT]!r}")
        body = text[1:].upper()
        try:
            raw = base64.b32decode(body + "=" * (-len(body) % 8))
        except (binascii.Error, ValueError):
            raise ContentError(f"not a content id (bad base32): {text!r}") from None
        return cls.from_bytes(raw)

    @classmethod
    def from_bytes(cls, raw: bytes) -> ContentId:
        version, pos = _read_varint(raw, 0)
        if version != 1:
            raise ContentError(f"only CIDv1 content ids are supported (got version {version})")
        codec, pos = _read_varint(raw, pos)
        code, pos = _read_varint(raw, pos)
        length, pos = _read_varint(raw, pos)
        if codec not in CODECS:
            raise ContentError(f"unsupported content codec 0x{codec:x}")
        if code not in HASHES:
            raise ContentError(f"unsupported multihash code 0x{code:x}")
        if length != DIGEST_SIZE or len(raw) - pos != DIGEST_SIZE:
            raise ContentError("malformed content id (digest length)")
        return cls(codec, code, raw[pos:])

    def to_bytes(self) -> bytes:
        return (
            encode_uvarint(1)
            + encode_uvarint(self.codec)
            + encode_uvarint(self.hash_code)
            + encode_uvarint(len(self.digest))
            + self.digest
        )

    def __str__(self) -> str:
        return "b" + base64.b32encode(self.to_bytes()).decode().lower().rstrip("=")

    def matches(self, data: bytes | memoryview) -> bool:
        """Do ``data`` hash to this id?"""
        return digest(self.hash_code, data) == self.digest
