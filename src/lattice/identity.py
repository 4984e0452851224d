"""Node identity: Ed25519 keys, libp2p peer ids, signatures, the key file.

Peer ids follow the libp2p spec: the identity multihash of the protobuf-encoded public key, shown
in base58btc (``12D3KooW...``). Every signature made by a Lattice layer is domain-separated (a
context string is prepended) so a signature made for one purpose cannot be replayed for another.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from lattice import _proto
from lattice.errors import IdentityError

__all__ = ["KeyPair", "PeerId", "PublicKey", "load_or_create_key", "peer_id_from_public_key"]

KEY_TYPE_ED25519 = 1
_IDENTITY_MULTIHASH = 0x00
_SHA256_MULTIHASH = 0x12
_MAX_INLINE_KEY = 42  # keys up to this many bytes are inlined with the identity multihash

_B58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58_ALPHABET)}


def b58encode(data: bytes) -> str:
    zeros = len(data) - len(data.lstrip(b"\0"))
    num = int.from_bytes(data, "big")
    out = []
    while num:
        num, rem = divmod(num, 58)
        out.append(_B58_ALPHABET[rem])
    return "1" * zeros + "".join(reversed(out))


def b58decode(text: str) -> bytes:
    if len(text) > 256:
        raise ValueError("base58 string too long")
    num = 0
    for ch in text:
        try:
            num = num * 58 + _B58_INDEX[ch]
        except KeyError:
            raise ValueError(f"invalid base58 character {ch!r}") from None
    zeros = len(text) - len(text.lstrip("1"))
    body = num.to_bytes((num.bit_length() + 7) // 8, "big") if num else b""
    return b"\0" * zeros + body


class PublicKey:
    """An Ed25519 public key as libp2p marshals it (protobuf ``PublicKey{Type, Data}``)."""

    __slots__ = ("_key", "raw")

    def __init__(self, raw: bytes) -> None:
        if len(raw) != 32:
            raise IdentityError("an Ed25519 public key has 32 bytes")
        self.raw = bytes(raw)
        self._key = Ed25519PublicKey.from_public_bytes(self.raw)

    @classmethod
    def from_protobuf(cls, data: bytes) -> PublicKey:
        try:
            fields = _proto.decode(data, max_fields=4)
            key_type = _proto.one_int(fields, 1)
            raw = _proto.one_bytes(fields, 2, required=True)
        except _proto.DecodeError as exc:
            raise IdentityError(f"malformed public key: {exc}") from None
        if key_type != KEY_TYPE_ED25519:
            raise IdentityError(f"unsupported key type {key_type} (only Ed25519 is accepted)")
        return cls(raw)

    def to_protobuf(self) -> bytes:
        return _proto.encode([(1, KEY_TYPE_ED25519), (2, self.raw)])

    def verify(self, signature: bytes, data: bytes) -> bool:
        try:
            self._key.verify(signature, data)
        except InvalidSignature:
            return False
        return True

    def peer_id(self) -> PeerId:
        return peer_id_from_public_key(self)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PublicKey) and other.raw == self.raw

    def __hash__(self) -> int:
        return hash(self.raw)


class PeerId:
    """A libp2p peer id (multihash bytes); compares and hashes by value."""

    __slots__ = ("_b58", "multihash")

    def __init__(self, multihash: bytes) -> None:
        if not 2 <= len(multihash) <= 128:
            raise IdentityError("peer id has an invalid length")
        try:
            code, pos = _proto.decode_uvarint(multihash)
            length, pos = _proto.decode_uvarint(multihash, pos)
        except _proto.DecodeError as exc:  # any bytes reach here (a DHT key that may name a peer)
            raise IdentityError(f"peer id is not a multihash: {exc}") from None
        if code not in (_IDENTITY_MULTIHASH, _SHA256_MULTIHASH) or length != len(multihash) - pos:
            raise IdentityError("peer id is not a valid identity or sha2-256 multihash")
        self.multihash = bytes(multihash)
        self._b58: str | None = None

    @classmethod
    def from_string(cls, text: str) -> PeerId:
        cached = _PARSED.get(text)
        if cached is not None:
            return cached
        try:
            peer = cls(b58decode(text))
        except (ValueError, _proto.DecodeError) as exc:
            raise IdentityError(f"invalid peer id {text!r}: {exc}") from None
        if len(_PARSED) >= 4096:  # peer ids recur (every call names its peer): keep a bounded cache
            _PARSED.clear()
        _PARSED[text] = peer
        return peer

    def public_key(self) -> PublicKey | None:
        """The public key inlined in an identity-multihash peer id (Ed25519 ids), else None."""
        if self.multihash[0] != _IDENTITY_MULTIHASH:
            return None
        return PublicKey.from_protobuf(self.multihash[2:])

    def to_base58(self) -> str:
        if self._b58 is None:
            self._b58 = b58encode(self.multihash)
        return self._b58

    def short(self) -> str:
        text = self.to_base58()
        return text[-8:]

    def __str__(self) -> str:
        return self.to_base58()

    def __repr__(self) -> str:
        return f"PeerId({self.to_base58()})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PeerId) and other.multihash == self.multihash

    def __lt__(self, other: PeerId) -> bool:
        return self.multihash < other.multihash

    def __hash__(self) -> int:
        return hash(self.multihash)


_PARSED: dict[str, PeerId] = {}


def peer_id_from_public_key(key: PublicKey) -> PeerId:
    encoded = key.to_protobuf()
    if len(encoded) <= _MAX_INLINE_KEY:
        return PeerId(bytes((_IDENTITY_MULTIHASH, len(encoded))) + encoded)
    return PeerId(bytes((_SHA256_MULTIHASH, 32)) + hashlib.sha256(encoded).digest())


class KeyPair:
    """An Ed25519 key pair: the node's identity."""

    __slots__ = ("_private", "peer_id", "public_key")

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.public_key = PublicKey(raw)
        self.peer_id = self.public_key.peer_id()

    @classmethod
    def generate(cls) -> KeyPair:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> KeyPair:
        """Deterministic key from a 32-byte seed (tests, reproducible testnets)."""
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    def sign(self, data: bytes) -> bytes:
        """Raw Ed25519 signature (used where a wire protocol fixes the signed bytes, e.g. Noise)."""
        return self._private.sign(data)

    def sign_for(self, context: str, data: bytes) -> bytes:
        """Domain-separated signature: what layers above use for records and updates."""
        return self._private.sign(_domain(context, data))

    def seed(self) -> bytes:
        return self._private.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )

    def to_protobuf(self) -> bytes:
        """libp2p ``PrivateKey`` protobuf (Ed25519 data = 32-byte seed + 32-byte public key)."""
        return _proto.encode([(1, KEY_TYPE_ED25519), (2, self.seed() + self.public_key.raw)])

    @classmethod
    def from_protobuf(cls, data: bytes) -> KeyPair:
        try:
            fields = _proto.decode(data, max_fields=4)
            key_type = _proto.one_int(fields, 1)
            raw = _proto.one_bytes(fields, 2, required=True)
        except _proto.DecodeError as exc:
            raise IdentityError(f"malformed private key: {exc}") from None
        if key_type != KEY_TYPE_ED25519:
            raise IdentityError(f"unsupported private key type {key_type} (only Ed25519)")
        assert raw is not None
        if len(raw) not in (32, 64):
            raise IdentityError("an Ed25519 private key has 32 or 64 bytes")
        pair = cls.from_seed(raw[:32])
        if len(raw) == 64 and raw[32:] != pair.public_key.raw:
            raise IdentityError("private key file is inconsistent (public half does not match)")
        return pair


def verify_for(public_key: PublicKey, context: str, data: bytes, signature: bytes) -> bool:
    """Check a signature made with :meth:`KeyPair.sign_for`."""
    return public_key.verify(signature, _domain(context, data))


def _domain(context: str, data: bytes) -> bytes:
    tag = context.encode()
    return b"lattice:" + len(tag).to_bytes(2, "big") + tag + data


def load_or_create_key(path: str | os.PathLike[str], create: bool = True) -> KeyPair:
    """Load the node key from ``path`` (libp2p protobuf format), creating it with mode 0600 if absent.

    A key file readable by group or others, or not ours, is refused: a leaked identity lets anyone
    impersonate the node and forge its records; so is a key directory others can write (they could
    plant a key of their own choosing).
    """
    from lattice._files import private_dir

    path = Path(path)
    if create:  # the daemon's key (printing a key's peer id trusts nothing)
        private_dir(path.parent, "key directory")
    try:
        st = path.stat()
    except FileNotFoundError:
        if not create:
            raise IdentityError(f"key file {path} does not exist") from None
        return _create_key(path)
    except OSError as exc:
        raise IdentityError(f"cannot read key file {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise IdentityError(f"key file {path} is not a regular file")
    if st.st_uid != os.geteuid():
        raise IdentityError(f"key file {path} is owned by uid {st.st_uid}, not by you (uid {os.geteuid()})")
    if st.st_mode & 0o077:
        raise IdentityError(
            f"key file {path} is accessible by group/others (mode {stat.S_IMODE(st.st_mode):o}); "
            f"run: chmod 600 {path}"
        )
    if st.st_size > 4096:
        raise IdentityError(f"key file {path} is too large to be a key")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise IdentityError(f"cannot read key file {path}: {exc.strerror}") from None
    return KeyPair.from_protobuf(data)


def _create_key(path: Path) -> KeyPair:
    pair = KeyPair.generate()
    try:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, pair.to_protobuf())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        raise IdentityError(f"cannot create key file {path}: {exc.strerror}") from None
    return pair
