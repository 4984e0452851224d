"""libp2p Noise: Noise_XX_25519_ChaChaPoly_SHA256 with the libp2p identity payload.

Wire-compatible with go-libp2p, rust-libp2p and py-libp2p (spec: libp2p/specs noise/README.md).
The handshake is a sans-IO state machine (:class:`XXHandshake`); :class:`SecureStream` frames the
transport messages (2-byte length, at most 65535 bytes each) over a trio stream. Messages 2 and 3
carry each side's stream muxers (spec: connections/inlined-muxer-negotiation.md), so a connection
needs no multistream round trip for its muxer when both sides list one.

Transport ciphers: the handshake is always ChaChaPoly (the spec's only suite). When both sides list
``AESGCM`` in a Lattice-private field of their NoiseExtensions, the transport messages after it use
AES-256-GCM instead, keyed from the same split: on CPUs with AES instructions it costs a third of
ChaCha20-Poly1305 per byte. Other implementations ignore the unknown field and keep ChaChaPoly.
"""

from __future__ import annotations

import hashlib
import hmac
import socket
import struct
import threading
from collections.abc import Callable, Sequence

import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from lattice import _proto
from lattice.errors import ConnectionLost, HandshakeError, IdentityError, ProtocolError
from lattice.identity import KeyPair, PeerId, PublicKey

PROTOCOL_ID = "/noise"
_PROTOCOL_NAME = b"Noise_XX_25519_ChaChaPoly_SHA256"
_SIG_PREFIX = b"noise-libp2p-static-key:"
MAX_MESSAGE = 65535
TAG_LEN = 16
MAX_PLAINTEXT = MAX_MESSAGE - TAG_LEN
_DH_LEN = 32
_MAX_NONCE = 2**64 - 1
_PLACE_MIN = 4096  # frames smaller than this are never decrypted in place (headers, small calls)
RECV_BUFFER = 1 << 21  # one read from the socket: large reads keep bulk transfers cheap
_CARRY_MAX = 2 + MAX_MESSAGE  # at most one partial frame is kept per idle connection
_EMPTY = bytearray()
MAX_MUXERS = 16  # stream muxers a peer may list in its handshake payload
MAX_MUXER_NAME = 128
CHACHAPOLY = "ChaChaPoly"
AESGCM_CIPHER = "AESGCM"
TRANSPORT_CIPHERS = (AESGCM_CIPHER,)  # offered beyond ChaChaPoly, by preference
CIPHERS_FIELD = 1447  # Lattice-private NoiseExtensions field: transport ciphers (unknown to others)
MAX_CIPHERS = 8
REKEY_EVERY = 1 << 20  # AES-GCM messages per key (<= 64 GiB) before both sides rekey (Noise REKEY)


class BufferPool:
    """Reusable buffers of one size. A connection holds its receive and send buffers only while it
    is reading or writing, not while idle, so an open connection costs almost nothing and churned
    connections leave no 2 MiB blocks behind to fragment the heap (issue 16, defect 3)."""

    __slots__ = ("free", "keep", "size")

    def __init__(self, size: int, keep: int) -> None:
        self.size = size
        self.keep = keep
        self.free: list[bytearray] = []

    def take(self, need: int = 0) -> bytearray:
        """A buffer of at least ``need`` bytes (the pool's size when ``need`` is 0)."""
        if need <= self.size:
            if self.free:
                return self.free.pop()
            if need * 4 >= self.size or not need:
                return bytearray(self.size)
            return bytearray(need)  # a small one-off: not worth a pooled block
        return bytearray(need)

    def give(self, buf: bytearray) -> None:
        if len(buf) == self.size and len(self.free) < self.keep:
            self.free.append(buf)


class _Pools(threading.local):
    """Per thread (each runs its own trio loop): receive, send and staging buffers."""

    def __init__(self) -> None:
        self.recv = BufferPool(RECV_BUFFER, 8)
        self.send = BufferPool(21 * MAX_MESSAGE, 8)  # a 1 MiB batch plus frame overhead
        self.stage = BufferPool(MAX_PLAINTEXT, 8)


_pools = _Pools()


class WriteTimeout(ConnectionLost):
    """The peer accepted no data for the whole write timeout; the connection must be dropped."""


def _hkdf2(chaining_key: bytes, ikm: bytes) -> tuple[bytes, bytes]:
    temp = hmac.digest(chaining_key, ikm, "sha256")
    out1 = hmac.digest(temp, b"\x01", "sha256")
    out2 = hmac.digest(temp, out1 + b"\x02", "sha256")
    return out1, out2


# Nonces: 4 zero bytes and the 64-bit counter, little-endian for ChaCha20-Poly1305 and big-endian for
# AES-GCM (Noise's rule); one struct call per message, no Python function around it.
_nonce = struct.Struct("<4xQ").pack
_nonce_be = struct.Struct(">4xQ").pack


class CipherState:
    """An AEAD key with its message counter (one direction of a session): ChaCha20-Poly1305, or
    AES-256-GCM with a rekey every :data:`REKEY_EVERY` messages (both sides count the same)."""

    __slots__ = ("_aead", "_next_rekey", "_nonce", "cipher", "n")

    def __init__(self, key: bytes, cipher: str = CHACHAPOLY) -> None:
        self.cipher = cipher
        self.n = 0
        if cipher == CHACHAPOLY:
            self._aead: ChaCha20Poly1305 | AESGCM = ChaCha20Poly1305(key)
            self._nonce = _nonce
            self._next_rekey = _MAX_NONCE + 1
        elif cipher == AESGCM_CIPHER:
            self._aead = AESGCM(key)
            self._nonce = _nonce_be
            self._next_rekey = REKEY_EVERY
        else:
            raise ValueError(f"unknown noise cipher {cipher!r}")

    def _rekey(self) -> None:
        """Noise's REKEY (k = ENCRYPT(k, 2^64-1, "", 32 zeros)[:32]); the counter runs on."""
        self._aead = AESGCM(self._aead.encrypt(self._nonce(_MAX_NONCE), bytes(32), None)[:32])
        self._next_rekey += REKEY_EVERY

    def encrypt(self, plaintext: bytes | memoryview, ad: bytes = b"") -> bytes:
        if self.n >= _MAX_NONCE:
            raise ProtocolError("noise nonce exhausted")
        out = self._aead.encrypt(self._nonce(self.n), plaintext, ad or None)
        self.n += 1
        if self.n >= self._next_rekey:
            self._rekey()
        return out

    def encrypt_into(self, plaintext: memoryview, out: memoryview) -> None:
        if self.n >= _MAX_NONCE:
            raise ProtocolError("noise nonce exhausted")
        self._aead.encrypt_into(self._nonce(self.n), plaintext, None, out)
        self.n += 1
        if self.n >= self._next_rekey:
            self._rekey()

    def decrypt_into(self, ciphertext: memoryview, out: bytearray | memoryview) -> None:
        if self.n >= _MAX_NONCE:
            raise ProtocolError("noise nonce exhausted")
        try:
            self._aead.decrypt_into(self._nonce(self.n), ciphertext, None, out)
        except InvalidTag:
            raise ProtocolError("noise frame failed authentication") from None
        self.n += 1
        if self.n >= self._next_rekey:
            self._rekey()

    def decrypt(self, ciphertext: bytes | memoryview, ad: bytes = b"") -> bytes:
        if self.n >= _MAX_NONCE:
            raise ProtocolError("noise nonce exhausted")
        try:
            out = self._aead.decrypt(self._nonce(self.n), ciphertext, ad or None)
        except InvalidTag:
            raise ProtocolError("noise frame failed authentication") from None
        self.n += 1
        if self.n >= self._next_rekey:
            self._rekey()
        return out


class XXHandshake:
    """The XX pattern as a sans-IO state machine: three messages, then two CipherStates.

    With an ``identity`` it is the libp2p profile: messages 2 and 3 carry the signed identity
    payload, checked on receipt. With ``identity=None`` it is plain Noise XX (payloads given to
    :meth:`write_message`, returned by :meth:`read_message`), which the spec's test vectors exercise
    together with a fixed ``prologue``, ``static_key`` and ``ephemeral_key``.
    """

    def __init__(
        self,
        identity: KeyPair | None,
        initiator: bool,
        *,
        prologue: bytes = b"",
        static_key: X25519PrivateKey | None = None,
        ephemeral_key: X25519PrivateKey | None = None,
        muxers: Sequence[str] = (),
        ciphers: Sequence[str] = (),
    ) -> None:
        self.identity = identity
        self.initiator = initiator
        self.muxers = tuple(muxers)  # ours, by preference, sent in our identity payload
        self.remote_muxers: tuple[str, ...] = ()  # the peer's (none: an older peer, or none offered)
        self.ciphers = tuple(ciphers)  # transport ciphers we offer beyond ChaChaPoly, by preference
        self.remote_ciphers: tuple[str, ...] = ()
        self._s = static_key or X25519PrivateKey.generate()
        self._fixed_e = ephemeral_key
        self._e: X25519PrivateKey | None = None
        self._re: bytes | None = None
        self.remote_static: bytes | None = None
        self.remote_identity: PublicKey | None = None
        self._h = _PROTOCOL_NAME  # exactly HASHLEN bytes: used as is
        self._ck = self._h
        self._k: CipherState | None = None
        self._mix_hash(prologue)  # empty in libp2p
        self._step = 0

    # -- symmetric state
    def _mix_hash(self, data: bytes) -> None:
        self._h = hashlib.sha256(self._h + data).digest()

    def _mix_key(self, ikm: bytes) -> None:
        self._ck, temp = _hkdf2(self._ck, ikm)
        self._k = CipherState(temp)

    def _encrypt_and_hash(self, plaintext: bytes) -> bytes:
        out = self._k.encrypt(plaintext, self._h) if self._k else plaintext
        self._mix_hash(out)
        return out

    def _decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        out = self._k.decrypt(ciphertext, self._h) if self._k else ciphertext
        self._mix_hash(ciphertext)
        return out

    @staticmethod
    def _pub(key: X25519PrivateKey) -> bytes:
        return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @staticmethod
    def _dh(key: X25519PrivateKey, remote: bytes) -> bytes:
        try:
            return key.exchange(X25519PublicKey.from_public_bytes(remote))
        except ValueError:
            raise HandshakeError("invalid Diffie-Hellman public key") from None

    def _payload(self) -> bytes:
        identity = self.identity
        assert identity is not None  # plain Noise (no identity) takes its payloads from the caller
        sig = identity.sign(_SIG_PREFIX + self._pub(self._s))
        # NoiseExtensions (field 4) with our stream_muxers (its field 2) and transport ciphers
        listed = [(2, m) for m in self.muxers] + [(CIPHERS_FIELD, c) for c in self.ciphers]
        extensions = [(4, _proto.encode(listed))] if listed else []
        return _proto.encode([(1, identity.public_key.to_protobuf()), (2, sig), *extensions])

    def _check_payload(self, payload: bytes) -> None:
        try:
            fields = _proto.decode(payload, max_fields=16)
            key_bytes = _proto.one_bytes(fields, 1, required=True)
            sig = _proto.one_bytes(fields, 2, required=True)
            key = PublicKey.from_protobuf(key_bytes)
            extensions = _proto.one_bytes(fields, 4)
            if extensions is not None:
                self.remote_muxers, self.remote_ciphers = _parse_extensions(extensions)
        except (_proto.DecodeError, IdentityError) as exc:
            raise HandshakeError(f"bad noise handshake payload: {exc}") from None
        assert self.remote_static is not None and sig is not None
        if not key.verify(sig, _SIG_PREFIX + self.remote_static):
            raise HandshakeError("noise static key is not signed by the peer's identity key")
        self.remote_identity = key

    @property
    def handshake_hash(self) -> bytes:
        """The transcript hash ``h`` (unique to this session once complete)."""
        return self._h

    # -- messages
    def write_message(self, payload: bytes = b"") -> bytes:
        """The next handshake message; ``payload`` is sent in message 1, and in 2 and 3 without identity."""
        if self.initiator and self._step == 0:  # -> e
            self._e = self._fixed_e or X25519PrivateKey.generate()
            e_pub = self._pub(self._e)
            self._mix_hash(e_pub)
            out = e_pub + self._encrypt_and_hash(payload)
        elif not self.initiator and self._step == 1:  # <- e, ee, s, es
            assert self._re is not None
            self._e = self._fixed_e or X25519PrivateKey.generate()
            e_pub = self._pub(self._e)
            self._mix_hash(e_pub)
            self._mix_key(self._dh(self._e, self._re))
            out = e_pub + self._encrypt_and_hash(self._pub(self._s))
            self._mix_key(self._dh(self._s, self._re))
            out += self._encrypt_and_hash(self._payload() if self.identity else payload)
        elif self.initiator and self._step == 2:  # -> s, se
            assert self._re is not None
            out = self._encrypt_and_hash(self._pub(self._s))
            self._mix_key(self._dh(self._s, self._re))
            out += self._encrypt_and_hash(self._payload() if self.identity else payload)
        else:
            raise HandshakeError("noise handshake: write out of order")
        self._step += 1
        return out

    def read_message(self, message: bytes) -> bytes:
        """Consume the peer's next handshake message; its payload (checked if we have an identity)."""
        if not self.initiator and self._step == 0:  # -> e
            if len(message) < _DH_LEN:
                raise HandshakeError("noise message 1 too short")
            self._re = message[:_DH_LEN]
            self._mix_hash(self._re)
            payload = self._decrypt_and_hash(message[_DH_LEN:])
        elif self.initiator and self._step == 1:  # <- e, ee, s, es
            if len(message) < 2 * _DH_LEN + TAG_LEN + TAG_LEN:
                raise HandshakeError("noise message 2 too short")
            assert self._e is not None
            self._re = message[:_DH_LEN]
            self._mix_hash(self._re)
            self._mix_key(self._dh(self._e, self._re))
            self.remote_static = self._decrypt_static(message[_DH_LEN : 2 * _DH_LEN + TAG_LEN])
            self._mix_key(self._dh(self._e, self.remote_static))
            payload = self._decrypt_payload(message[2 * _DH_LEN + TAG_LEN :])
        elif not self.initiator and self._step == 2:  # -> s, se
            if len(message) < _DH_LEN + 2 * TAG_LEN:
                raise HandshakeError("noise message 3 too short")
            assert self._e is not None
            self.remote_static = self._decrypt_static(message[: _DH_LEN + TAG_LEN])
            self._mix_key(self._dh(self._e, self.remote_static))
            payload = self._decrypt_payload(message[_DH_LEN + TAG_LEN :])
        else:
            raise HandshakeError("noise handshake: read out of order")
        if self._step and self.identity is not None:
            self._check_payload(payload)
        self._step += 1
        return payload

    def _decrypt_static(self, data: bytes) -> bytes:
        try:
            return self._decrypt_and_hash(data)
        except ProtocolError:
            raise HandshakeError("noise handshake decryption failed") from None

    def _decrypt_payload(self, data: bytes) -> bytes:
        try:
            return self._decrypt_and_hash(data)
        except ProtocolError:
            raise HandshakeError("noise handshake payload decryption failed") from None

    @property
    def complete(self) -> bool:
        return self._step == 3

    def _by_role(
        self, mine: tuple[str, ...], theirs: tuple[str, ...]
    ) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(the initiator's list, the responder's list) of ours and the peer's."""
        return (mine, theirs) if self.initiator else (theirs, mine)

    @property
    def muxer(self) -> str | None:
        """The stream muxer agreed in the handshake (once complete), or None: multistream-select
        negotiates it on the secured channel as before."""
        return negotiated_muxer(*self._by_role(self.muxers, self.remote_muxers))

    @property
    def cipher(self) -> str:
        """The transport messages' cipher (once complete): the first of the initiator's offered
        ciphers the responder offered too, else the spec's ChaChaPoly."""
        initiator, responder = self._by_role(self.ciphers, self.remote_ciphers)
        return next((name for name in initiator if name in responder), CHACHAPOLY)

    def split(self) -> tuple[CipherState, CipherState]:
        """(send, receive) cipher states once the three messages are done."""
        if not self.complete:
            raise HandshakeError("noise handshake not complete")
        k1, k2 = _hkdf2(self._ck, b"")
        cipher = self.cipher
        first, second = CipherState(k1, cipher), CipherState(k2, cipher)
        return (first, second) if self.initiator else (second, first)


class SecureStream:
    """Encrypted byte stream over a trio stream, in libp2p Noise transport framing.

    Hot path: ``send_all`` encrypts every 65519-byte slice straight into one preallocated output
    buffer (one ``send_all`` per batch); ``receive_some`` reads into a reusable buffer and decrypts
    every complete frame into one plaintext buffer. ``send_all`` is not cancel-safe by itself; the
    muxer above serialises writes and shields them so a frame is never cut half-way.
    """

    def __init__(self, raw: trio.abc.Stream, send: CipherState, recv: CipherState, remote: PublicKey):
        self.raw = raw
        self._send = send
        self._recv = recv
        self.remote_public_key = remote
        self.remote_peer: PeerId = remote.peer_id()
        self._buf = bytearray()  # bytes read during the handshake, not yet consumed
        self.muxer: str | None = None  # agreed in the handshake (None: negotiate with multistream)
        self.cipher = send.cipher  # of the transport messages: ChaChaPoly, or AESGCM between Lattice nodes
        self._recv_pool = _pools.recv  # this thread's buffer pools (a stream lives in one thread)
        self._send_pool = _pools.send
        self._stage_pool = _pools.stage
        self._rbuf = _EMPTY  # a pooled buffer while reading, else the partial frame left (if any)
        self._pooled = False
        self._rstart = 0
        self._rend = 0
        self._sock = getattr(raw, "socket", None)
        # Fast path for TCP: the plain non-blocking socket under trio's wrapper. Writes are already
        # serialised (the muxer's send lock), so trio's conflict detector and retry helper are only
        # overhead on a 0.3 ms round trip. Anything else (relayed streams) takes the generic path.
        self._fd = getattr(self._sock, "_sock", None)
        self.write_timeout = 30.0
        # A wait for readable asks the kernel (SO_RCVLOWAT) for up to this many bytes that are sure
        # to come (the rest of the current Noise frame, or of a muxer frame: see ``pump``), so a paced
        # link wakes the reader once per chunk, not per burst of packets. 0: never (the muxer sets it).
        self.read_lowat_max = 0
        self._lowat = 1  # the socket's SO_RCVLOWAT now
        self._drained = False
        # syscall and wake-up counters (each costs the Python of trio, Yamux and Noise: a bulk
        # transfer should need few): reads/writes that moved bytes, waits for readable/writable
        self.reads = 0
        self.read_waits = 0
        self.writes = 0
        self.write_waits = 0

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.send_parts((data,))

    async def send_parts(self, parts: tuple | list) -> int:
        """Encrypt the concatenation of ``parts`` into Noise frames and send them in one write.

        Large slices are encrypted straight from the caller's buffers; small pieces (headers) are
        gathered in a reused 64 KiB staging frame. The output buffer is reused too (the muxer
        serialises writes), so a bulk transfer allocates nothing per batch. Returns the plaintext
        bytes sent.
        """
        total = 0
        for part in parts:
            total += len(part) if not isinstance(part, memoryview) else part.nbytes
        if total <= MAX_PLAINTEXT:
            plain = parts[0] if len(parts) == 1 else b"".join(parts)
            ct = self._send.encrypt(plain)
            frame = struct.pack(">H", len(ct)) + ct
            if self._fd is not None:  # a small frame usually fits the socket buffer: no wait set up
                try:
                    sent = self._fd.send(frame)
                    self.writes += 1
                except BlockingIOError:
                    sent = 0
                if sent == len(frame):
                    return total
                frame = frame[sent:]
            await self._send_bytes(frame)
            return total
        # a staged piece flushed before a large part costs one frame more: at most one per part
        size = total + (-(-total // MAX_PLAINTEXT) + len(parts)) * (2 + TAG_LEN)
        buf = self._send_pool.take(size)
        stage = self._stage_pool.take()
        try:
            await self._encrypt_and_send(parts, buf, stage)
        finally:
            self._stage_pool.give(stage)
            self._send_pool.give(buf)
        return total

    async def _encrypt_and_send(self, parts: tuple | list, buf: bytearray, stage: bytearray) -> None:
        enc = self._send
        pos = 0
        staged = 0
        with memoryview(buf) as out, memoryview(stage) as st:

            def emit(src: memoryview) -> None:
                nonlocal pos
                n = len(src) + TAG_LEN
                out[pos] = n >> 8
                out[pos + 1] = n & 0xFF
                enc.encrypt_into(src, out[pos + 2 : pos + 2 + n])
                pos += 2 + n

            for part in parts:
                view = part if isinstance(part, memoryview) else memoryview(part)
                if view.format != "B" or view.ndim != 1:
                    view = view.cast("B")
                off, length = 0, len(view)
                while off < length:
                    if length - off >= MAX_PLAINTEXT:
                        if staged:  # headers get a frame of their own: the receiver can then decrypt
                            emit(st[:staged])  # the payload frames straight into their destination
                            staged = 0
                        emit(view[off : off + MAX_PLAINTEXT])  # zero-copy
                        off += MAX_PLAINTEXT
                        continue
                    take = min(MAX_PLAINTEXT - staged, length - off)
                    st[staged : staged + take] = view[off : off + take]
                    staged += take
                    off += take
                    if staged == MAX_PLAINTEXT:
                        emit(st)
                        staged = 0
            if staged:
                emit(st[:staged])
            await self._send_bytes(out[:pos])

    async def _send_bytes(self, data: bytes | memoryview) -> None:
        """Send everything; only waiting is shielded from cancellation and bounded by write_timeout.

        A send that completes at once has no await point, so nothing can cut a frame; when the
        socket is full we wait shielded (a caller's timeout never leaves half a frame on the wire),
        and a peer that accepts nothing for ``write_timeout`` is a WriteTimeout (connection is dead).
        """
        fd = self._fd
        if fd is None:
            with trio.CancelScope(shield=True, deadline=trio.current_time() + self.write_timeout) as scope:
                await self.raw.send_all(data)
            if scope.cancelled_caught:
                raise WriteTimeout("write timed out")
            return
        view = memoryview(data)
        try:
            while view:
                try:
                    sent = fd.send(view)
                except BlockingIOError:
                    # (waiting at once after a short send instead, which on paced links is always
                    # followed by this, cost 20-28 % more CPU per MiB on loopback: there the retry
                    # often finds room, the reader draining on the other core)
                    self.write_waits += 1
                    deadline = trio.current_time() + self.write_timeout
                    with trio.CancelScope(shield=True, deadline=deadline) as scope:
                        await trio.lowlevel.wait_writable(fd)
                    if scope.cancelled_caught:
                        raise WriteTimeout("write timed out") from None
                    continue
                self.writes += 1
                view = view[sent:]
        finally:
            view.release()

    async def receive_some(self, max_bytes: int = 262144) -> bytes | bytearray:
        """Decrypted bytes of one or more whole frames; b"" on clean EOF at a frame boundary."""
        if self._buf:  # handshake leftovers go through the ring buffer like everything else
            self._absorb(bytes(self._buf))
            self._buf.clear()
        while True:
            out = self._decrypt_ready()
            if out is not None:
                return out
            if not await self._read_more():
                return b""

    async def _read_more(self, sure: int = 0) -> bool:
        """Read more ciphertext into the receive buffer; False on clean EOF at a frame boundary.
        ``sure``: plaintext bytes the peer has committed to send next (see :meth:`pump`).

        The pooled buffer is taken only once data is there to read (no await holds it): an idle
        connection keeps at most one partial frame (see :meth:`_release`)."""
        try:
            fd = self._fd
            if fd is not None:
                n = await self._recv_fast(fd, sure)
            else:
                reader = self._sock.recv if self._sock is not None else self.raw.receive_some
                self._release()  # no pooled buffer is held while waiting
                chunk = await reader(RECV_BUFFER)
                self._hold()
                n = len(chunk)
                self._rbuf[self._rend : self._rend + n] = chunk
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._release()
            raise ConnectionLost(f"connection lost: {exc}") from None
        if not n:
            if self._rend > self._rstart:
                raise ConnectionLost("connection closed in the middle of a noise frame")
            self._release()
            return False
        self._rend += n
        return True

    async def _recv_fast(self, fd: socket.socket, sure: int = 0) -> int:
        if self._drained:  # the last read emptied the socket: wait first, save a failing recv
            await self._wait_readable(fd, sure)
        while True:
            self._hold()
            with memoryview(self._rbuf) as view:
                try:
                    n = fd.recv_into(view[self._rend :])
                    break
                except BlockingIOError:
                    pass
            await self._wait_readable(fd, sure)
        self._drained = n < len(self._rbuf) - self._rend
        self.reads += 1
        return n

    async def _wait_readable(self, fd: socket.socket, sure: int = 0) -> None:
        self._release()  # no pooled buffer is held while waiting
        self.read_waits += 1
        if self._lowat != 1 or (self.read_lowat_max and (sure or self._rend - self._rstart >= 2)):
            # (at a frame boundary with nothing sure, the mark is 1: no call for the common wait)
            lowat = read_lowat(self._rbuf, self._rstart, self._rend, sure, self.read_lowat_max)
            if lowat != self._lowat:
                try:
                    fd.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, lowat)
                    self._lowat = lowat
                except OSError:  # not settable here (Windows): wake on any byte, as before
                    self.read_lowat_max = 0
        await trio.lowlevel.wait_readable(fd)

    def _hold(self) -> None:
        """Have a pooled receive buffer with room for a whole frame (what was left comes first)."""
        buf = self._rbuf
        live = self._rend - self._rstart
        if not self._pooled:
            need = live + MAX_MESSAGE + 2
            pooled = self._recv_pool.take(0 if need <= RECV_BUFFER else need)  # a whole block: big reads
            if live:
                pooled[:live] = buf[self._rstart : self._rend]
            self._rbuf, self._pooled, self._rstart, self._rend = pooled, True, 0, live
        elif len(buf) - self._rend < MAX_MESSAGE + 2 and self._rstart:  # the live bytes to the front
            with memoryview(buf) as view:
                view[:live] = view[self._rstart : self._rend]
            self._rstart, self._rend = 0, live

    def _release(self) -> None:
        """Return the receive buffer to the pool, keeping what is left (at most a partial frame
        normally; more only while a paused reader has whole frames waiting)."""
        if not self._pooled:
            return
        live = self._rend - self._rstart
        if live > _CARRY_MAX:
            return
        buf = self._rbuf
        if live:
            with memoryview(buf) as view:
                self._rbuf = bytearray(view[self._rstart : self._rend])
        else:
            self._rbuf = _EMPTY
        self._pooled = False
        self._rstart, self._rend = 0, live
        self._recv_pool.give(buf)

    async def pump(
        self,
        feed: Callable[[bytearray], None],
        place: Callable[[int], memoryview | bool | None],
        placed: Callable[[int], None],
        sure: Callable[[], int] | None = None,
    ) -> bool:
        """Decrypt the frames that are ready, reading more first if none is; False on clean EOF.

        Before each large frame the reader above is asked (``place``) for a destination of exactly
        the frame's plaintext size: if it has one (a tensor being filled), the frame is decrypted
        straight into it and reported with ``placed``; everything else is decrypted into a new
        buffer and handed to ``feed``, in stream order, so ``place`` always sees an up-to-date
        parser state. ``place`` may answer False: stop here (the rest stays buffered for the next
        call), so a reader just woken can set its destination first. ``sure`` tells how many
        plaintext bytes the peer has committed to send next (the rest of a muxer data frame): a wait
        for more may then ask the kernel for that many (``read_lowat_max``).
        """
        if self._buf:
            self._absorb(bytes(self._buf))
            self._buf.clear()
        # (less than a frame's length prefix buffered: read first, nothing to decrypt yet)
        while self._rend - self._rstart < 2 or not self._decrypt_ready_to(feed, place, placed, keep=True):
            if not await self._read_more(sure() if sure is not None else 0):
                return False
        return True

    def _decrypt_ready_to(self, feed, place=None, placed=None, keep: bool = False) -> bool:
        """Decrypt the complete frames (see :meth:`pump`); False if there was none (and no pause).
        Without ``place`` every frame goes into a single buffer, fed once. ``keep``: the pooled
        receive buffer stays held (the pump reads again at once; it is given back before any wait),
        so a partial frame is not copied out and back in on every read."""
        buf = self._rbuf
        pos, end = self._rstart, self._rend
        if end - pos >= 2:  # the common small message: exactly one whole frame, nothing to place
            length = (buf[pos] << 8) | buf[pos + 1]
            if end - pos == 2 + length and TAG_LEN <= length < _PLACE_MIN:
                out = bytearray(length - TAG_LEN)
                with memoryview(buf) as src:
                    self._recv.decrypt_into(src[pos + 2 : end], out)
                feed(out)
                self._rstart = self._rend = 0
                if not keep:
                    self._release()
                return True
        first = pos
        dec = self._recv
        batch: list[tuple[int, int]] = []  # frames decrypted together into one fed buffer
        paused = False
        with memoryview(buf) as src:

            def flush() -> None:
                if len(batch) == 1:  # the common case of a small message: no generator
                    out = bytearray(batch[0][1] - TAG_LEN)
                else:
                    out = bytearray(sum([length - TAG_LEN for _, length in batch]))
                with memoryview(out) as dst:
                    at = 0
                    for start, length in batch:
                        size = length - TAG_LEN
                        dec.decrypt_into(src[start : start + length], dst[at : at + size])
                        at += size
                batch.clear()
                feed(out)

            while end - pos >= 2:
                length = (buf[pos] << 8) | buf[pos + 1]
                if length < TAG_LEN:
                    raise ProtocolError("noise frame shorter than its tag")
                if end - pos - 2 < length:
                    break
                size = length - TAG_LEN
                if place is not None and size >= _PLACE_MIN:
                    if batch:
                        flush()
                    dest = place(size)
                    if dest is False:
                        paused = True
                        break
                    if dest is not None:
                        dec.decrypt_into(src[pos + 2 : pos + 2 + length], dest)
                        pos += 2 + length
                        placed(size)
                        continue
                batch.append((pos + 2, length))
                pos += 2 + length
            if batch:
                flush()
        self._rstart = pos
        if pos == end:
            self._rstart = self._rend = 0
        if paused or not keep:
            self._release()
        return pos != first or paused

    def _absorb(self, data: bytes) -> None:
        self._hold()
        need = self._rend + len(data)
        if need > len(self._rbuf):
            self._rbuf.extend(bytes(need - len(self._rbuf)))
        self._rbuf[self._rend : need] = data
        self._rend = need

    def _decrypt_ready(self) -> bytearray | None:
        """Decrypt every complete frame in the receive buffer into one plaintext buffer."""
        out: list[bytearray] = []
        self._decrypt_ready_to(out.append)  # no ``place``: every frame goes in one fed buffer
        return out[0] if out else None

    async def aclose(self) -> None:
        await self.raw.aclose()


def read_lowat(buf: bytearray, start: int, end: int, sure: int, cap: int) -> int:
    """The receive low-water mark for the next wait: bytes that must arrive before anything more
    can be decrypted or parsed, at most ``cap`` (1 when nothing is sure, or ``cap`` is 0).

    ``buf[start:end]`` is the buffered ciphertext (at most a partial Noise frame: the rest of that
    frame is sure once its length is there); ``sure`` plaintext bytes are committed by the layer
    above, and the buffered ciphertext holds fewer plaintext bytes than its length, so at least
    ``sure - buffered`` more bytes are coming. Never more than is sure: a small message, or the end
    of a frame, is never waited past."""
    if cap <= 0:
        return 1
    buffered = end - start
    need = sure - buffered
    if buffered >= 2:
        need = max(need, 2 + ((buf[start] << 8) | buf[start + 1]) - buffered)
    return max(1, min(need, cap))


def _parse_extensions(extensions: bytes) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The stream muxers and the (Lattice-private) transport ciphers of a NoiseExtensions message,
    bounded; other fields are ignored."""
    fields = _proto.decode(extensions, max_fields=MAX_MUXERS + MAX_CIPHERS + 16)
    muxers = _names(_proto.all_bytes(fields, 2), MAX_MUXERS, "stream muxer")
    return muxers, _names(_proto.all_bytes(fields, CIPHERS_FIELD), MAX_CIPHERS, "cipher")


def _names(raw: list[bytes], most: int, what: str) -> tuple[str, ...]:
    if len(raw) > most or any(len(n) > MAX_MUXER_NAME for n in raw):
        raise _proto.DecodeError(f"too many or too long {what} names")
    try:
        return tuple(n.decode() for n in raw)
    except UnicodeDecodeError:
        raise _proto.DecodeError(f"a {what} name is not UTF-8") from None


def negotiated_muxer(initiator: Sequence[str], responder: Sequence[str]) -> str | None:
    """The first of the initiator's muxers the responder also lists (the spec's rule); None when
    either listed none (multistream-select negotiates it then). HandshakeError when both listed some
    and none is common: the spec says the handshake fails."""
    if not initiator or not responder:
        return None
    for name in initiator:
        if name in responder:
            return name
    raise HandshakeError("no stream muxer in common (handshake lists)")


def _frame(message: bytes) -> bytes:
    return struct.pack(">H", len(message)) + message


async def _read_handshake_frame(stream: trio.abc.Stream, buf: bytearray) -> bytes:
    while len(buf) < 2 or len(buf) < 2 + ((buf[0] << 8) | buf[1]):
        chunk = await stream.receive_some(65536 + 2)
        if not chunk:
            raise HandshakeError("connection closed during noise handshake")
        buf += chunk
    length = (buf[0] << 8) | buf[1]
    frame = bytes(buf[2 : 2 + length])
    del buf[: 2 + length]
    return frame


def start_outbound(
    identity: KeyPair, muxers: Sequence[str] = (), ciphers: Sequence[str] = TRANSPORT_CIPHERS
) -> tuple[XXHandshake, bytes]:
    """The initiator's handshake state and its first message, framed: the caller may send it in
    one write with what goes in front of it (the lazy ``/noise`` proposal)."""
    hs = XXHandshake(identity, initiator=True, muxers=muxers, ciphers=ciphers)
    return hs, _frame(hs.write_message())


async def finish_outbound(
    stream: trio.abc.Stream, hs: XXHandshake, expected: PeerId | None, buf: bytearray
) -> SecureStream:
    """The rest of the initiator's handshake once message 1 is sent; ``buf`` holds bytes already read."""
    hs.read_message(await _read_handshake_frame(stream, buf))
    await stream.send_all(_frame(hs.write_message()))
    assert hs.remote_identity is not None
    remote_peer = hs.remote_identity.peer_id()
    if expected is not None and remote_peer != expected:
        raise HandshakeError(f"peer id mismatch: dialed {expected}, got {remote_peer}")
    return _secured(stream, hs, buf)


async def secure_outbound(
    stream: trio.abc.Stream,
    identity: KeyPair,
    expected: PeerId | None = None,
    buf: bytearray | None = None,
    muxers: Sequence[str] = (),
    ciphers: Sequence[str] = TRANSPORT_CIPHERS,
) -> SecureStream:
    """Run the initiator side of the handshake; verify the peer is ``expected`` if given.

    ``buf`` holds bytes already read from ``stream`` (after protocol negotiation).
    """
    hs, first = start_outbound(identity, muxers, ciphers)
    await stream.send_all(first)
    return await finish_outbound(stream, hs, expected, buf if buf is not None else bytearray())


def _secured(stream: trio.abc.Stream, hs: XXHandshake, buf: bytearray) -> SecureStream:
    send, recv = hs.split()
    assert hs.remote_identity is not None
    secure = SecureStream(stream, send, recv, hs.remote_identity)
    secure.muxer = hs.muxer
    secure._buf = buf  # the peer may pipeline its first transport frames after the handshake
    return secure


async def secure_inbound(
    stream: trio.abc.Stream,
    identity: KeyPair,
    buf: bytearray | None = None,
    muxers: Sequence[str] = (),
    ciphers: Sequence[str] = TRANSPORT_CIPHERS,
) -> SecureStream:
    """Run the responder side of the handshake."""
    hs = XXHandshake(identity, initiator=False, muxers=muxers, ciphers=ciphers)
    buf = buf if buf is not None else bytearray()
    hs.read_message(await _read_handshake_frame(stream, buf))
    await stream.send_all(_frame(hs.write_message()))
    hs.read_message(await _read_handshake_frame(stream, buf))
    return _secured(stream, hs, buf)
