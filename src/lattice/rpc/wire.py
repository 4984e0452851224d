"""RPC messages on a stream: length-framed msgpack header, tensor payload, crc32 trailer.

    message := u32 header_len | header | payload (header["n"] bytes) | u32 crc32(payload) if n > 0
    header  := {"k": kind, "m": method (call), "d": value document, "n": payload bytes,
                "t"/"e": error type/message (err)}
    kinds   := "call" (opens a call, may carry the first value) | "msg" | "end" | "err"
    "z": 1 marks a call/msg as the sender's last (an "end" folded into it: one message, one parse)

Every call ends with an explicit end (or "err"), so a stream that stops early is an error, never a
short result. The payload is written and read in slices so the checksum is computed while the bytes
are hot in cache, and the receiver fills preallocated tensors directly (one copy after decryption).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack

from lattice.codec import tensors
from lattice.codec.packing import pack_plain
from lattice.errors import PayloadError, StreamError
from lattice.transport.stream import Stream

try:  # ISA-L's crc32 is zlib's (same polynomial, same value), ~4x faster: a bulk call's CRC was 15 %
    from isal.isal_zlib import crc32  # of its CPU with zlib's
except ImportError:  # pragma: no cover - isal is a dependency; zlib still works
    from zlib import crc32

CALL, MSG, END, ERR, CANCEL = "call", "msg", "end", "err", "cancel"
MAX_HEADER = 1 << 20
SLICE = 4 << 20
SMALL = 64 << 10  # payloads up to this size are coalesced with the header into one write
_U32 = struct.Struct(">I")


@dataclass
class Message:
    kind: str
    value: Any = None
    method: str | None = None
    error_type: str | None = None
    error_message: str | None = None
    has_value: bool = False
    last: bool = False  # the sender's final message (carries the end marker)
    call_id: int | None = None  # fast lane: which call a message belongs to
    size: int = 0  # memory its tensors take: payload bytes, plus what compressed ones decode to


# admit(method, size): called once a message's header is validated and before any of its payload is
# allocated; raises to refuse it (the payload is then left unread: the caller resets the stream).
Admit = Callable[[str | None, int], None]


def encode_header(
    kind: str,
    doc: bytes | None = None,
    n: int = 0,
    *,
    method: str | None = None,
    error_type: str | None = None,
    error_message: str | None = None,
    last: bool = False,
    call_id: int | None = None,
) -> bytes:
    header: dict[str, Any] = {"k": kind, "n": n}
    if last:
        header["z"] = 1
    if call_id is not None:
        header["i"] = call_id
    if doc is not None:
        header["d"] = doc
    if method is not None:
        header["m"] = method
    if error_type is not None:
        header["t"] = error_type
    if error_message is not None:
        header["e"] = error_message
    body = pack_plain(header)
    return _U32.pack(len(body)) + body


async def send(
    stream: Stream,
    kind: str,
    value: Any = None,
    *,
    has_value: bool = False,
    codec: str | None = None,
    prefix: bytes = b"",
    end: bool = False,
    fin: bool | None = None,
    method: str | None = None,
    call_id: int | None = None,
    encoded: tuple[bytes | None, list[memoryview]] | None = None,
    on_error: Any = None,
) -> None:
    """Send one message; ``prefix`` (protocol negotiation) rides in front. ``end`` marks it as the
    sender's last and (unless ``fin=False``, as on the shared fast lane) half-closes in the same write.

    ``encoded`` passes a value already encoded by ``tensors.encode``; ``on_error`` (an async callable)
    runs if the write fails, e.g. to read the peer's refusal.
    """
    if encoded is None:
        encoded = tensors.encode(value, codec) if has_value else (None, [])
    try:
        await _send(stream, kind, encoded, prefix, end, end if fin is None else fin, method, call_id)
    except StreamError:
        if on_error is not None:
            await on_error()
        raise


def encoded_size(encoded: tuple[bytes, list]) -> int:
    """Bytes of a value encoded by ``tensors.encode``: its document and its tensors."""
    doc, buffers = encoded
    return len(doc) + tensors.total_nbytes(buffers)


def small_message(
    kind: str,
    encoded: tuple[bytes, list],
    *,
    method: str | None = None,
    last: bool = False,
    call_id: int | None = None,
) -> bytes:
    """One whole message (payload of at most ``SMALL`` bytes) as bytes, for a single write."""
    doc, buffers = encoded
    n = tensors.total_nbytes(buffers)
    head = encode_header(kind, doc, n, method=method, last=last, call_id=call_id)
    if not n:  # no payload, no checksum
        return head
    crc = 0
    for b in buffers:
        crc = crc32(b, crc)
    return b"".join([head, *buffers, _U32.pack(crc)])


async def _send(stream, kind, encoded, prefix, last, fin, method, call_id) -> None:
    doc, buffers = encoded
    n = tensors.total_nbytes(buffers)
    if n <= SMALL:  # one write: atomic with respect to other writers of the stream (fast lane)
        data = small_message(kind, encoded, method=method, last=last, call_id=call_id)
        if prefix:
            data = prefix + data
        if stream.exclusive_held:  # a large message is being written on this stream: wait for it
            async with stream.exclusive():
                await stream.write(data, fin=fin)
        else:
            await stream.write(data, fin=fin)
        return
    head = encode_header(kind, doc, n, method=method, last=last, call_id=call_id)
    if prefix:
        head = prefix + head
    async with stream.exclusive():  # large: several writes, kept together on a shared stream
        await stream.write(head)
        crc = 0
        for buf in buffers:
            for off in range(0, buf.nbytes, SLICE):
                piece = buf[off : off + SLICE]
                crc = crc32(piece, crc)
                await stream.write(piece)
        await stream.write(_U32.pack(crc), fin=fin)


async def send_end(stream: Stream, fin: bool = True, prefix: bytes = b"") -> None:
    await stream.write(prefix + encode_header(END), fin=fin)


async def send_error(
    stream: Stream, type_name: str, message: str, call_id: int | None = None, fin: bool = True
) -> None:
    header = encode_header(ERR, error_type=type_name[:128], error_message=message[:4096], call_id=call_id)
    await stream.write(header, fin=fin)


async def receive(
    stream: Stream,
    max_payload: int,
    as_torch: bool | None = None,
    *,
    admit: Admit | None = None,
    max_header: int = MAX_HEADER,
    raw: bool = False,
) -> Message:
    """Read one message (validated, bounded).

    ``admit`` sees the method and size of a message with a value before its payload is allocated.
    ``raw=True`` leaves tensors as filled TensorSpec placeholders (``tensors.finish`` builds them
    later, e.g. once the method's limit on decoded sizes is known).

    A peer that half-closes in the middle of a message gets PayloadError ("truncated"); a lost
    connection or a reset stays a StreamError. Either way no partial value is ever returned.
    """
    try:
        return await _receive(stream, max_payload, as_torch, admit, max_header, raw)
    except StreamError as exc:
        if stream.remote_closed:
            raise PayloadError(f"truncated message: {exc}") from None
        raise


async def _receive(
    stream: Stream,
    max_payload: int,
    as_torch: bool | None,
    admit: Admit | None = None,
    max_header: int = MAX_HEADER,
    raw: bool = False,
) -> Message:
    try:
        (length,) = _U32.unpack(await stream.read_exactly(4))
    except StreamError:
        raise
    if length > max_header:
        raise PayloadError(f"message header of {length} bytes exceeds {max_header}")
    try:
        header = msgpack.unpackb(await stream.read_exactly(length), raw=False, max_bin_len=MAX_HEADER)
    except Exception as exc:
        if isinstance(exc, StreamError):
            raise
        raise PayloadError(f"malformed message header: {exc}") from None
    head = _check_header(header, max_payload)
    if isinstance(head, Message):
        return head
    kind, call_id, n, method, value, specs, last = head
    size = tensors.message_bytes(specs) if specs else 0
    if admit is not None:
        admit(method, size)  # before any payload byte is allocated
    crc = 0
    for spec in specs:  # allocation happens only now, after every size was checked
        dest = tensors.allocate(spec)
        await stream.read_into(dest)  # one sink for the whole tensor: frames decrypt straight into it
        crc = crc32(dest, crc)
    if n:
        (expected,) = _U32.unpack(await stream.read_exactly(4))
        if expected != crc:
            raise PayloadError("payload checksum mismatch (corrupted transfer)")
    if not raw:
        value = tensors.finish(value, as_torch, max_payload)
    return Message(kind, value=value, method=method, has_value=True, last=last, call_id=call_id, size=size)


def _check_header(header: Any, max_payload: int) -> Message | tuple:
    """Validate a decoded header: a finished Message (error, or no value), or the parts of one
    with a value (kind, call id, payload size, method, value with TensorSpecs, specs, last)."""
    if not isinstance(header, dict) or header.get("k") not in (CALL, MSG, END, ERR, CANCEL):
        raise PayloadError("malformed message header")
    kind = header["k"]
    call_id = header.get("i")
    if call_id is not None and (not isinstance(call_id, int) or not 0 <= call_id < 1 << 63):
        raise PayloadError("invalid call id")
    n = header.get("n", 0)
    if not isinstance(n, int) or n < 0 or n > max_payload:
        raise PayloadError(f"message payload of {n} bytes is over the limit of {max_payload}")
    if kind == ERR:
        return Message(
            ERR,
            error_type=str(header.get("t", "Error"))[:128],
            error_message=str(header.get("e", ""))[:4096],
            call_id=call_id,
        )
    method = header.get("m")
    if method is not None and (not isinstance(method, str) or len(method) > 256):
        raise PayloadError("invalid method name")
    doc = header.get("d")
    last = bool(header.get("z"))
    if doc is None:
        if n:
            raise PayloadError("payload without a value document")
        return Message(kind, method=method, last=last, call_id=call_id)
    if not isinstance(doc, bytes):
        raise PayloadError("value document must be bytes")
    value, specs = tensors.parse(doc, max_payload)
    if tensors.total_nbytes(specs) != n:
        raise PayloadError("declared payload size does not match the tensors")
    return kind, call_id, n, method, value, specs, last


def parse_buffered(
    stream: Stream, max_payload: int, *, max_header: int = MAX_HEADER, raw: bool = False
) -> tuple[Message, int] | None:
    """The next message and its size if it lies complete in the stream's first buffered chunk,
    parsed without waiting and without consuming (``stream.skip_first(size)`` does that); None if
    it is incomplete or anything is wrong with it (``receive`` then reads it and reports why).
    ``raw`` as for :func:`receive`.

    The fast lane calls this from the connection's reader task when data arrives, so a small reply
    or call needs no wake-up of the lane's own reader task. Its messages are small (bounded by
    ``max_payload`` and already inside the stream's reserved window), so there is no ``admit``:
    the lane checks a call against its method when it dispatches it.
    """
    chunk = stream.first_chunk()
    if chunk is None or len(chunk) < 4:
        return None
    (length,) = _U32.unpack_from(chunk, 0)
    end = 4 + length
    if length > max_header or len(chunk) < end:
        return None
    try:
        head = _check_header(msgpack.unpackb(chunk[4:end], raw=False, max_bin_len=MAX_HEADER), max_payload)
    except Exception:
        return None
    if isinstance(head, Message):
        return head, end
    kind, call_id, n, method, value, specs, last = head
    if n and len(chunk) < end + n + 4:
        return None
    crc = 0
    for spec in specs:
        dest = tensors.allocate(spec)
        dest[:] = chunk[end : end + spec.nbytes]
        crc = crc32(dest, crc)
        end += spec.nbytes
    if n:
        if _U32.unpack_from(chunk, end)[0] != crc:
            return None
        end += 4
    size = tensors.message_bytes(specs) if specs else 0
    if not raw:
        try:
            value = tensors.finish(value, None, max_payload)
        except PayloadError:
            return None
    message = Message(kind, value=value, method=method, has_value=True, last=last, call_id=call_id, size=size)
    return message, end
