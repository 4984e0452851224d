"""msgpack for small calls' headers and plain values, in Python: the same bytes as msgpack's.

Why: after an idle gap (a user's calls on a WAN are spaced by the round trip) the first use of a C
extension's code costs this VM ~20 us (msgpack's packb or unpackb, each; docs/perf.md "Cold calls"),
50-100x its warm cost, while a few lines of Python run on the interpreter's already-warm loop. A
small call used msgpack four times on each side. This covers exactly what those messages hold:
maps of up to 15 entries with str keys, and str, bytes, int, bool and None values. Anything else
(lists, floats, extension types, tensors) returns ``None`` and the caller uses msgpack as before;
so does any input this decoder does not accept as well-formed, and msgpack then reports the error.
"""

from __future__ import annotations

from typing import Any

_NIL, _FALSE, _TRUE = b"\xc0", b"\xc2", b"\xc3"
_INT64_MIN, _UINT64_MAX = -(1 << 63), (1 << 64) - 1
MISSING = object()  # what unpack returns for input outside the subset


def pack(value: Any) -> bytes | None:
    """``msgpack.packb(value, use_bin_type=True)`` for a str, bytes, int, bool or None; else None."""
    t = type(value)
    if t is bytes:
        n = len(value)
        if n < 0x100:
            return b"\xc4" + n.to_bytes(1, "big") + value
        if n < 0x10000:
            return b"\xc5" + n.to_bytes(2, "big") + value
        return b"\xc6" + n.to_bytes(4, "big") + value if n < 1 << 32 else None
    if t is str:
        try:
            data = value.encode()
        except UnicodeEncodeError:  # lone surrogates: msgpack refuses them too
            return None
        n = len(data)
        if n < 32:
            return (0xA0 | n).to_bytes(1, "big") + data
        if n < 0x100:
            return b"\xd9" + n.to_bytes(1, "big") + data
        if n < 0x10000:
            return b"\xda" + n.to_bytes(2, "big") + data
        return b"\xdb" + n.to_bytes(4, "big") + data if n < 1 << 32 else None
    if t is int:
        return _pack_int(value)
    if value is None:
        return _NIL
    if t is bool:
        return _TRUE if value else _FALSE
    return None


def _pack_int(v: int) -> bytes | None:
    if 0 <= v < 0x80:
        return v.to_bytes(1, "big")
    if v >= 0:
        if v < 0x100:
            return b"\xcc" + v.to_bytes(1, "big")
        if v < 0x10000:
            return b"\xcd" + v.to_bytes(2, "big")
        if v < 1 << 32:
            return b"\xce" + v.to_bytes(4, "big")
        return b"\xcf" + v.to_bytes(8, "big") if v <= _UINT64_MAX else None
    if v >= -32:
        return (v & 0xFF).to_bytes(1, "big")
    if v >= -0x80:
        return b"\xd0" + v.to_bytes(1, "big", signed=True)
    if v >= -0x8000:
        return b"\xd1" + v.to_bytes(2, "big", signed=True)
    if v >= -(1 << 31):
        return b"\xd2" + v.to_bytes(4, "big", signed=True)
    return b"\xd3" + v.to_bytes(8, "big", signed=True) if v >= _INT64_MIN else None


def pack_map(items: dict[str, Any]) -> bytes | None:
    """``msgpack.packb(items, use_bin_type=True)`` for up to 15 str keys with :func:`pack` values."""
    if len(items) > 15:
        return None
    parts = [(0x80 | len(items)).to_bytes(1, "big")]
    for key, value in items.items():
        k = pack(key) if type(key) is str else None
        v = pack(value)
        if k is None or v is None:
            return None
        parts.append(k)
        parts.append(v)
    return b"".join(parts)


def unpack(data: bytes | memoryview, max_bin: int) -> Any:
    """``msgpack.unpackb(data, raw=False)`` if ``data`` is exactly one value of the subset (a map
    only at the top, with str keys), bin/str lengths at most ``max_bin``; else MISSING."""
    data = bytes(data) if type(data) is not bytes else data
    end = len(data)
    if not end:
        return MISSING
    first = data[0]
    if 0x80 <= first <= 0x8F:  # fixmap
        out: dict[str, Any] = {}
        pos = 1
        for _ in range(first & 0x0F):
            key, pos = _one(data, pos, end, max_bin)
            if type(key) is not str:
                return MISSING
            value, pos = _one(data, pos, end, max_bin)
            if value is MISSING:
                return MISSING
            out[key] = value
    else:
        value, pos = _one(data, 0, end, max_bin)
        if value is MISSING:
            return MISSING
        out = value
    return out if pos == end else MISSING


def _one(data: bytes, pos: int, end: int, max_bin: int) -> tuple[Any, int]:
    """One scalar of the subset at ``pos``: (value, next position), or (MISSING, end)."""
    if pos >= end:
        return MISSING, end
    b = data[pos]
    pos += 1
    if b < 0x80:
        return b, pos
    if b >= 0xE0:
        return b - 0x100, pos
    if 0xA0 <= b <= 0xBF:
        n = b & 0x1F
        kind = "s"
    elif b == 0xC0:
        return None, pos
    elif b == 0xC2:
        return False, pos
    elif b == 0xC3:
        return True, pos
    elif 0xCC <= b <= 0xD3:  # uint8..64, int8..64
        width = 1 << ((b - 0xCC) & 3)
        if pos + width > end:
            return MISSING, end
        v = int.from_bytes(data[pos : pos + width], "big", signed=b >= 0xD0)
        return v, pos + width
    elif b in (0xC4, 0xC5, 0xC6, 0xD9, 0xDA, 0xDB):
        width = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4}[b]
        if pos + width > end:
            return MISSING, end
        n = int.from_bytes(data[pos : pos + width], "big")
        pos += width
        kind = "b" if b <= 0xC6 else "s"
    else:
        return MISSING, end
    if n > max_bin or pos + n > end:
        return MISSING, end
    raw = data[pos : pos + n]
    if kind == "b":
        return raw, pos + n
    try:
        return raw.decode("utf-8"), pos + n
    except UnicodeDecodeError:
        return MISSING, end
