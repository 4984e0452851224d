"""Length-prefixed messages on a stream: the uvarint-delimited framing that identify, the DHT,
gossipsub, circuit relay, DCUtR and AutoNAT share (libp2p's "delimited" protobuf messages)."""

from __future__ import annotations

from lattice import _proto
from lattice.errors import ProtocolError, StreamError
from lattice.transport.stream import Stream

__all__ = ["read_delimited"]


async def read_delimited(stream: Stream, max_size: int) -> bytes | None:
    """One uvarint-length-prefixed message, or None at a clean end of stream; ProtocolError for a
    malformed or oversized prefix (never a bare DecodeError: callers catch the transport errors)."""
    chunk = stream.first_chunk()
    if chunk is None:  # not here yet: wait, then take it whole
        try:
            await stream.wait_data()
        except StreamError:
            if not stream.remote_closed:  # reset or connection lost
                raise
            return None  # a clean end of stream
        chunk = stream.first_chunk()
    if chunk is not None:  # the usual case: the prefix is buffered already, no byte-wise reads
        try:
            length, used = _proto.decode_uvarint(chunk)
        except _proto.TruncatedError:
            pass
        except _proto.DecodeError:  # a prefix longer than any 64-bit length: the peer's fault
            raise ProtocolError("malformed message length prefix") from None
        else:
            if length > max_size:
                raise ProtocolError(f"message of {length} bytes exceeds the limit of {max_size}")
            stream.skip_first(used)
            return await stream.read_exactly(length)
    prefix = bytearray()
    while True:
        byte = await stream.read(1)
        if not byte:
            if prefix:
                raise ProtocolError("stream ended inside a length prefix")
            return None
        prefix += byte
        try:
            length, _ = _proto.decode_uvarint(prefix)
            break
        except _proto.TruncatedError:
            continue
        except _proto.DecodeError:
            raise ProtocolError("malformed message length prefix") from None
    if length > max_size:
        raise ProtocolError(f"message of {length} bytes exceeds the limit of {max_size}")
    return await stream.read_exactly(length)
