"""multistream-select 1.0: protocol negotiation on a connection or a stream.

Messages are uvarint-length-prefixed lines ending in ``\\n``. The dialer pipelines the header and its
first proposal in one write (one round trip when the proposal is accepted). Reads are bounded, and
bytes read past the negotiation are left in the caller's buffer (the peer may pipeline data).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from lattice import _proto
from lattice.errors import NegotiationError

if TYPE_CHECKING:
    from lattice.transport.stream import Stream

HEADER = "/multistream/1.0.0"
NA = "na"
MAX_MESSAGE = 1024
MAX_ATTEMPTS = 16


class ByteStream(Protocol):
    """What negotiation reads and writes: a socket, a secure channel or a stream."""

    async def send_all(self, data: bytes) -> None: ...
    async def receive_some(self, max_bytes: int) -> bytes | bytearray: ...


def encode(message: str) -> bytes:
    data = message.encode() + b"\n"
    return _proto.delimited(data)


async def read_message(stream: ByteStream, buf: bytearray) -> str:
    while True:
        try:
            length, pos = _proto.decode_uvarint(buf)
        except _proto.TruncatedError:
            pass
        except _proto.DecodeError:
            raise NegotiationError("malformed multistream message") from None
        else:
            if length > MAX_MESSAGE or length == 0:
                raise NegotiationError(f"multistream message of invalid length {length}")
            if len(buf) - pos >= length:
                raw = bytes(buf[pos : pos + length])
                del buf[: pos + length]
                if not raw.endswith(b"\n"):
                    raise NegotiationError("multistream message without trailing newline")
                try:
                    return raw[:-1].decode()
                except UnicodeDecodeError:
                    raise NegotiationError("multistream message is not UTF-8") from None
        if len(buf) > MAX_MESSAGE + 16:
            raise NegotiationError("multistream message too long")
        chunk = await stream.receive_some(MAX_MESSAGE)
        if not chunk:
            raise NegotiationError("stream closed during protocol negotiation")
        buf += chunk


async def select_outbound(stream: ByteStream, protocols: Sequence[str], buf: bytearray) -> str:
    """Propose ``protocols`` in order; return the first the listener accepts."""
    if not protocols:
        raise ValueError("no protocols to propose")
    await stream.send_all(encode(HEADER) + encode(protocols[0]))
    header = await read_message(stream, buf)
    if header != HEADER:
        raise NegotiationError(f"peer does not speak multistream 1.0 (got {header[:64]!r})")
    for i, proto in enumerate(protocols):
        if i:
            await stream.send_all(encode(proto))
        answer = await read_message(stream, buf)
        if answer == proto:
            return proto
        if answer != NA:
            raise NegotiationError(f"unexpected multistream answer {answer[:64]!r}")
    raise NegotiationError(f"peer supports none of {list(protocols)}")


@functools.cache
def proposal(protocol: str) -> bytes:
    """What a dialer sends to propose ``protocol`` alone: the header and the proposal. A listener
    that accepts answers with the same bytes."""
    return encode(HEADER) + encode(protocol)


async def expect_accepted(stream: ByteStream, protocol: str, buf: bytearray) -> None:
    """Read the listener's answer to a lazy proposal of ``protocol`` (its header, then the protocol
    echoed); NegotiationError unless it accepted. Bytes after the answer stay in ``buf``."""
    header = await read_message(stream, buf)
    if header != HEADER:
        raise NegotiationError(f"peer does not speak multistream 1.0 (got {header[:64]!r})")
    answer = await read_message(stream, buf)
    if answer != protocol:
        raise NegotiationError(f"the peer does not serve {protocol}")


async def confirm(stream: Stream, protocol: str) -> None:
    """Read the listener's answer to a lazy proposal of ``protocol`` (sent in front of the dialer's
    first data, without waiting: ``Host.new_stream(..., lazy=True)``); NegotiationError unless it
    accepted. Bytes after the answer stay in the stream."""
    expected = proposal(protocol)
    got = await stream.read_exactly(len(expected)) if stream.buffered >= len(expected) else None
    if got == expected:  # the usual case: compare bytes, no parsing
        return
    if got is not None:
        stream.unread(got)
    buf = bytearray()
    try:
        await expect_accepted(stream, protocol, buf)
    finally:
        stream.unread(bytes(buf))


async def select_inbound(
    stream: ByteStream,
    supported: Callable[[str], bool],
    buf: bytearray,
    defer_accept: bool = False,
    header_first: bool = False,
) -> tuple[str, bytes]:
    """Answer proposals until one is supported; return (protocol, unsent acceptance bytes).

    Our header goes out with the first answer (or at once with ``header_first``, or when the dialer
    waits for it). With ``defer_accept`` the acceptance is returned instead of sent, for the caller
    to put in front of its first write (saves a write and a wake-up per stream).
    """
    pending = encode(HEADER)
    if header_first:  # connection level: speak first, in case the dialer waits for us
        await stream.send_all(pending)
        pending = b""
    header = await read_message(stream, buf)
    if header != HEADER:
        raise NegotiationError(f"peer does not speak multistream 1.0 (got {header[:64]!r})")
    if pending and not buf:  # the dialer may be waiting for our header before it proposes
        await stream.send_all(pending)
        pending = b""
    for _ in range(MAX_ATTEMPTS):
        proposal = await read_message(stream, buf)
        if proposal != "ls" and supported(proposal):
            pending += encode(proposal)
            if defer_accept:
                return proposal, pending
            await stream.send_all(pending)
            return proposal, b""
        await stream.send_all(pending + encode(NA))
        pending = b""
    raise NegotiationError("too many rejected protocol proposals")
