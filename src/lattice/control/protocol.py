"""Control API wire format: 4-byte big-endian length + a msgpack map, over a local Unix socket.

request   {"id": int, "op": str, "args": {...}}
reply     {"id": int, "ok": true, "result": ...}  |  {"id": int, "ok": false, "error": {"type", "message"}}
streamed  {"id": int, "item": ...} repeated before the final reply (ops that produce a sequence)
"""

from __future__ import annotations

import struct

import msgpack

MAX_FRAME = 64 * 1024 * 1024
_LEN = struct.Struct(">I")


class FrameError(ValueError):
    """A malformed or oversized control frame."""


def encode(message: dict) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise FrameError(f"control message of {len(body)} bytes exceeds {MAX_FRAME}")
    return _LEN.pack(len(body)) + body


def frame_length(prefix: bytes) -> int:
    (length,) = _LEN.unpack(prefix)
    if length > MAX_FRAME:
        raise FrameError(f"control frame of {length} bytes exceeds {MAX_FRAME}")
    return length


def decode(body: bytes) -> dict:
    try:
        message = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise FrameError(f"malformed control frame: {exc}") from None
    if not isinstance(message, dict):
        raise FrameError("control frame is not a map")
    return message
