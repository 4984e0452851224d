"""Control API wire format over a local Unix socket; values may contain numpy arrays / torch tensors.

frame     := u64 frame_len | u32 doc_len | doc | payload        (frame_len counts what follows it)
doc       := msgpack map, tensors replaced by descriptors (lattice.codec.tensors); payload = their bytes
request   {"id": int, "op": str, "args": {...}}
reply     {"id": int, "ok": true, "result": ...}  |  {"id": int, "ok": false, "error": {"type", "message"}}
streamed  {"id": int, "item": ...} repeated before the final reply (ops that produce a sequence)
"""

from __future__ import annotations

import struct

from lattice.errors import PayloadError

MAX_FRAME = 4 << 30
_LEN = struct.Struct(">I")
_HEAD = struct.Struct(">QI")  # frame length (64-bit: tensors over 4 GiB fit), document length


class FrameError(ValueError):
    """A malformed or oversized control frame."""


HEADER_LEN = _HEAD.size


def encode_parts(message: dict) -> list:
    """The frame as a list of buffers (header, document, tensor bytes), for a vectored send."""
    from lattice.codec import tensors

    doc, buffers = tensors.encode(message)
    total = 4 + len(doc) + sum(b.nbytes for b in buffers)
    if total > MAX_FRAME:
        raise FrameError(f"control message of {total} bytes exceeds {MAX_FRAME}")
    return [_HEAD.pack(total, len(doc)), doc, *buffers]


def encode(message: dict) -> bytes:
    return b"".join(encode_parts(message))


def frame_length(prefix: bytes) -> int:
    """Bytes that follow the 8-byte length prefix (checked against the limit before allocating)."""
    (length,) = struct.unpack(">Q", prefix[:8])
    if length > MAX_FRAME or length < 4:
        raise FrameError(f"control frame of {length} bytes is out of range")
    return length


def decode(body: bytes | bytearray | memoryview) -> dict:
    """Decode what follows the 8-byte length prefix."""
    from lattice.codec import tensors

    view = memoryview(body)
    (doc_len,) = _LEN.unpack(view[:4])
    if doc_len > len(view) - 4:
        raise FrameError("control frame document overruns the frame")
    try:
        value, specs = tensors.parse(bytes(view[4 : 4 + doc_len]), MAX_FRAME)
        payload = view[4 + doc_len :]
        if sum(s.nbytes for s in specs) != len(payload):
            raise FrameError("control frame payload does not match its tensors")
        off = 0
        for spec in specs:
            tensors.allocate(spec)[:] = payload[off : off + spec.nbytes]
            off += spec.nbytes
        message = tensors.finish(value)
    except PayloadError as exc:
        raise FrameError(f"malformed control frame: {exc}") from None
    if not isinstance(message, dict):
        raise FrameError("control frame is not a map")
    return message
