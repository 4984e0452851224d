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
    out = bytearray((0x80 | len(items),))
    for key, value in items.items():
        if type(key) is not str or len(key) > 31 or not key.isascii():
            return None
        out.append(0xA0 | len(key))
        out += key.encode()
        if type(value) is int and 0 <= value < 0x80:  # inline: the usual sizes and ids
            out.append(value)
            continue
        packed = pack(value)
        if packed is None:
            return None
        out += packed
    return bytes(out)


def unpack(data: bytes | memoryview, max_bin: int) -> Any:
    """``msgpack.unpackb(data, raw=False)`` if ``data`` is exactly one value of the subset (a map
    only at the top, with str keys), bin/str lengths at most ``max_bin``; else MISSING."""
    data = bytes(data) if type(data) is not bytes else data
    if not data:
        return MISSING
    first = data[0]
    if 0x80 <= first <= 0x8F:  # fixmap: its keys and values in one scan
        items = _scan(data, 1, 2 * (first & 0x0F), max_bin)
        if items is None:
            return MISSING
        keys = items[0::2]
        for key in keys:
            if type(key) is not str:
                return MISSING
        return dict(zip(keys, items[1::2], strict=True))
    items = _scan(data, 0, 1, max_bin)
    return MISSING if items is None else items[0]


_WIDTH = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4}


def _scan(data: bytes, pos: int, count: int, max_bin: int) -> list | None:
    """``count`` scalars of the subset from ``pos`` to the end of ``data`` exactly, or None."""
    end = len(data)
    out: list[Any] = []
    for _ in range(count):
        if pos >= end:
            return None
        b = data[pos]
        pos += 1
        if b < 0x80:
            out.append(b)
            continue
        if b >= 0xE0:
            out.append(b - 0x100)
            continue
        if 0xA0 <= b <= 0xBF:
            n = b & 0x1F
            is_str = True
        elif b == 0xC0:
            out.append(None)
            continue
        elif b == 0xC2 or b == 0xC3:
            out.append(b == 0xC3)
            continue
        elif 0xCC <= b <= 0xD3:  # uint8..64, int8..64
            width = 1 << ((b - 0xCC) & 3)
            if pos + width > end:
                return None
            out.append(int.from_bytes(data[pos : pos + width], "big", signed=b >= 0xD0))
            pos += width
            continue
        else:
            width = _WIDTH.get(b, 0)
            if not width or pos + width > end:
                return None  # not in the subset (arrays, nested maps, floats, extensions), or cut
            n = int.from_bytes(data[pos : pos + width], "big")
            pos += width
            is_str = b >= 0xD9
        if n > max_bin or pos + n > end:
            return None
        raw = data[pos : pos + n]
        pos += n
        if is_str:
            try:
                out.append(raw.decode())
            except UnicodeDecodeError:
                return None
        else:
            out.append(raw)
    return out if pos == end else None
