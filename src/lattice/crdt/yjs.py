"""Bounds on Yjs update bytes from the network, checked before pycrdt (yrs) decodes them.

yrs trusts the counts an update declares and reserves memory for them before it reads a single
element: 32 random bytes made it reserve and touch ~530 MiB and spend up to 2 s (measured, pycrdt
0.14.13 / yrs 0.28). It also nests Any values without a depth limit and reads strings without
checking their UTF-8. :func:`check_update` walks the v1 encoding (lib0, as yrs's ``Update::decode``
reads it) in pure Python, allocating nothing from a declared size, and raises PayloadError unless
every count fits in the bytes that remain, every clock range fits in 31 bits, strings are UTF-8,
Any values nest at most ``MAX_DEPTH`` deep and nothing trails the update. Whether yrs accepts the
update is still tried afterwards, on a scratch document.

Content pycrdt never writes is refused: legacy JSON content (yrs and Yjs disagree on its length)
and weak links.
"""

from __future__ import annotations

from lattice.errors import PayloadError

MAX_DEPTH = 64  # nesting of Any arrays and maps
MAX_CLOCK = 1 << 31  # clock + length of any block or deleted range
_SKIP, _GC = 10, 0
_HAS_ORIGIN, _HAS_RIGHT_ORIGIN, _HAS_PARENT_SUB = 0x80, 0x40, 0x20
_XML_ELEMENT = 3
_TYPE_REFS = frozenset({0, 1, 2, 3, 4, 5, 6, 9, 15})  # not 7: weak links
_FIXED_ANY = {127: 0, 126: 0, 121: 0, 120: 0, 124: 4, 123: 8, 122: 8}  # tag -> bytes that follow


class _Bad(Exception):
    pass


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def left(self) -> int:
        return len(self.data) - self.pos

    def u8(self) -> int:
        if self.pos >= len(self.data):
            raise _Bad("ends early")
        self.pos += 1
        return self.data[self.pos - 1]

    def skip(self, n: int) -> bytes:
        if n > self.left():
            raise _Bad("ends early")
        self.pos += n
        return self.data[self.pos - n : self.pos]

    def var(self, bits: int = 32) -> int:
        """An unsigned lib0 var int as yrs reads it: at most 11 bytes, shifts wrap at ``bits``."""
        num = shift = 0
        while True:
            b = self.u8()
            num |= (b & 0x7F) << (shift % bits)
            shift += 7
            if b < 0x80:
                return num & ((1 << bits) - 1)
            if shift > 70:
                raise _Bad("var int too long")

    def signed(self) -> None:
        """Skip a signed lib0 var int (6 bits in the first byte, then 7 per byte)."""
        if self.u8() < 0x80:
            return
        shift = 6
        while True:
            shift += 7
            if self.u8() < 0x80:
                return
            if shift > 70:
                raise _Bad("var int too long")

    def count(self, min_size: int, bits: int = 32, owed: int = 0) -> int:
        """A declared number of elements of at least ``min_size`` bytes each: they must fit in what
        is left, beside the ``owed`` bytes that enclosing containers still need."""
        n = self.var(bits)
        if n * min_size + owed > self.left():
            raise _Bad(f"declares {n} elements in {self.left()} bytes")
        return n

    def string(self) -> int:
        """Skip a string; returns its length in bytes (at least its length in UTF-16 units)."""
        raw = self.skip(self.var())
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _Bad("string is not UTF-8") from None
        return len(raw)

    def any(self, depth: int = 0, owed: int = 0) -> None:
        """Skip one Any value (``owed``: bytes the containers around it still need, at least)."""
        if depth > MAX_DEPTH:
            raise _Bad("values nest too deep")
        tag = self.u8()
        if tag in _FIXED_ANY:
            self.skip(_FIXED_ANY[tag])
        elif tag == 125:
            self.signed()
        elif tag == 119:
            self.string()
        elif tag == 116:
            self.skip(self.var())
        elif tag == 118:  # yrs reads these lengths as usize and reserves them at once
            n = self.count(2, 64, owed)
            for i in range(n):
                self.string()
                self.any(depth + 1, owed + 2 * (n - i - 1))
        elif tag == 117:
            n = self.count(1, 64, owed)
            for i in range(n):
                self.any(depth + 1, owed + n - i - 1)
        else:
            raise _Bad(f"unknown value tag {tag}")

    def id(self) -> None:
        self.var(64)
        self.var()

    def block(self) -> int:
        """Skip one block; returns an upper bound of its length in clock units."""
        info = self.u8()
        if info in (_SKIP, _GC):
            return self.var()
        if info & _HAS_ORIGIN:
            self.id()
        if info & _HAS_RIGHT_ORIGIN:
            self.id()
        if not info & (_HAS_ORIGIN | _HAS_RIGHT_ORIGIN):
            if self.var() == 1:
                self.string()  # a root type's name
            else:
                self.id()
            if info & _HAS_PARENT_SUB:
                self.string()
        return self.content(info & 0x0F)

    def content(self, ref: int) -> int:
        if ref == 1:  # deleted
            return self.var()
        if ref == 3:  # binary
            self.skip(self.var())
        elif ref == 4:  # string
            return self.string()
        elif ref == 5:  # embed (JSON text)
            self.string()
        elif ref == 6:  # format: key, JSON text
            self.string()
            self.string()
        elif ref == 7:  # a nested type
            type_ref = self.u8()
            if type_ref not in _TYPE_REFS:
                raise _Bad(f"unsupported type {type_ref}")
            if type_ref == _XML_ELEMENT:
                self.string()
        elif ref == 8:  # Any values
            n = self.count(1)
            for i in range(n):
                self.any(0, n - i - 1)
            return n
        elif ref == 9:  # a sub-document: guid, options
            self.string()
            self.any()
        else:
            raise _Bad(f"unsupported content {ref}")
        return 1

    def clock(self, start: int, length: int) -> int:
        end = start + length
        if end > MAX_CLOCK:
            raise _Bad("clock out of range")
        return end


def check_update(data: bytes) -> None:
    """Raise PayloadError unless ``data`` is a Yjs v1 update yrs can decode within bounded memory."""
    r = _Reader(bytes(data))
    try:
        for _ in range(r.count(3)):  # per client: blocks, client id, first clock
            blocks = r.var()
            r.var(64)
            clock = r.var()
            if blocks > r.left():
                raise _Bad(f"declares {blocks} blocks in {r.left()} bytes")
            for _ in range(blocks):
                clock = r.clock(clock, r.block())
        for _ in range(r.count(2)):  # the delete set: per client, ranges of clocks
            r.var(64)
            for _ in range(r.count(2)):
                r.clock(r.var(), r.var())
        if r.left():
            raise _Bad(f"{r.left()} bytes after the update")
    except _Bad as exc:
        raise PayloadError(f"malformed Yjs update: {exc}") from None
    except RecursionError:
        raise PayloadError("malformed Yjs update: values nest too deep") from None
