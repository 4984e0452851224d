"""Minimal, bounded protobuf and varint codec.

libp2p's wire messages (keys, Noise payloads, identify, Kademlia) are small protobufs. A hand-written
codec avoids importing the protobuf runtime (start-up time, memory) and lets every length be checked
before anything is allocated.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal, overload

__all__ = ["DecodeError", "Field", "TruncatedError", "decode", "decode_uvarint", "encode", "encode_uvarint"]

VARINT = 0
I64 = 1
LEN = 2
I32 = 5

MAX_VARINT_BYTES = 10


class DecodeError(ValueError):
    """Malformed protobuf or varint input."""


class TruncatedError(DecodeError):
    """The input ended in the middle of a value (a stream reader may wait for more bytes)."""


def encode_uvarint(value: int) -> bytes:
    if value < 0:
        raise ValueError("uvarint must be non-negative")
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def delimited(data: bytes) -> bytes:
    """``data`` behind its uvarint length: the framing of libp2p's protobuf protocols."""
    return encode_uvarint(len(data)) + data


def decode_uvarint(buf: bytes | bytearray | memoryview, pos: int = 0) -> tuple[int, int]:
    """Decode an unsigned varint at ``pos``; return (value, next position)."""
    result = 0
    for shift in range(0, 7 * MAX_VARINT_BYTES, 7):
        if pos >= len(buf):
            raise TruncatedError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
    raise DecodeError("varint too long")


Field = tuple[int, int | bytes | str]


def encode(fields: Iterable[tuple[int, int | bytes | str | None]]) -> bytes:
    """Encode (field number, value) pairs: int as varint, bytes/str as length-delimited.

    ``None`` values are skipped, so optional fields can be passed unconditionally.
    """
    out = bytearray()
    for number, value in fields:  # one-byte varints (most keys and lengths) inline: hot in the DHT
        if value is None:
            continue
        if isinstance(value, bool | int):
            key = number << 3 | VARINT
            out += bytes((key,)) if key < 0x80 else encode_uvarint(key)
            value = int(value)
            if 0 <= value < 0x80:
                out.append(value)
            else:
                out += encode_uvarint(value)
        else:
            data = (
                value.encode()
                if isinstance(value, str)
                else value
                if isinstance(value, bytes)
                else bytes(value)
            )
            key = number << 3 | LEN
            out += bytes((key,)) if key < 0x80 else encode_uvarint(key)
            size = len(data)
            if size < 0x80:
                out.append(size)
            else:
                out += encode_uvarint(size)
            out += data
    return bytes(out)


def decode(data: bytes | bytearray | memoryview, max_fields: int = 1024) -> dict[int, list[int | bytes]]:
    """Decode a message into {field number: [values]}; bytes for LEN fields, ints for varints.

    Fixed-width fields are skipped. Raises DecodeError on anything malformed.
    """
    fields: dict[int, list[int | bytes]] = {}
    pos = 0
    count = 0
    n = len(data)
    while pos < n:
        count += 1
        if count > max_fields:
            raise DecodeError("too many fields")
        key = data[pos]
        if key < 0x80:  # one-byte varints inline (most keys and lengths): hot in the DHT
            pos += 1
        else:
            key, pos = decode_uvarint(data, pos)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise DecodeError("field number 0")
        if wire_type == VARINT:
            value, pos = decode_uvarint(data, pos)
            fields.setdefault(number, []).append(value)
        elif wire_type == LEN:
            if pos < n and data[pos] < 0x80:
                length = data[pos]
                pos += 1
            else:
                length, pos = decode_uvarint(data, pos)
            if length > n - pos:
                raise DecodeError("length-delimited field overruns message")
            fields.setdefault(number, []).append(bytes(data[pos : pos + length]))
            pos += length
        elif wire_type == I64:
            pos += 8
        elif wire_type == I32:
            pos += 4
        else:
            raise DecodeError(f"unsupported wire type {wire_type}")
        if pos > n:
            raise DecodeError("truncated fixed-width field")
    return fields


@overload
def one_bytes(fields: dict[int, list[int | bytes]], number: int, required: Literal[True]) -> bytes: ...
@overload
def one_bytes(fields: dict[int, list[int | bytes]], number: int, required: bool = False) -> bytes | None: ...
def one_bytes(fields: dict[int, list[int | bytes]], number: int, required: bool = False) -> bytes | None:
    """The last value of a length-delimited field (protobuf semantics: last one wins)."""
    values = fields.get(number)
    if not values:
        if required:
            raise DecodeError(f"missing field {number}")
        return None
    value = values[-1]
    if not isinstance(value, bytes):
        raise DecodeError(f"field {number} is not length-delimited")
    return value


@overload
def one_int(fields: dict[int, list[int | bytes]], number: int, default: int) -> int: ...
@overload
def one_int(fields: dict[int, list[int | bytes]], number: int, default: None = None) -> int | None: ...
def one_int(fields: dict[int, list[int | bytes]], number: int, default: int | None = None) -> int | None:
    values = fields.get(number)
    if not values:
        return default
    value = values[-1]
    if not isinstance(value, int):
        raise DecodeError(f"field {number} is not a varint")
    return value


def all_bytes(fields: dict[int, list[int | bytes]], number: int) -> list[bytes]:
    values = fields.get(number, [])
    if any(not isinstance(v, bytes) for v in values):
        raise DecodeError(f"field {number} is not length-delimited")
    return values  # type: ignore[return-value]
