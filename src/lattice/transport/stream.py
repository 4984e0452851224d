"""The stream interface services program against: one multiplexed, flow-controlled, bidirectional
byte stream to a peer (today a Yamux stream, ``lattice.transport.yamux.YamuxStream``).

Services (RPC, DHT, pubsub, CRDT, content, NAT) type their streams as :class:`Stream`, never as the
muxer's class, so the muxer can change without them. Besides the ordinary reads and writes it names
the fast-path members the RPC's round trip is built on; each is cheap (no task switch, no
allocation) and documented with the contract a caller may rely on.

Errors: a reset or a lost connection is ``StreamError`` (``StreamReset``/``ConnectionLost``) on every
read and write that cannot complete; a read never returns a short result except ``read``'s ``b""``
after the peer's clean half-close.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Protocol, runtime_checkable

import trio

from lattice.identity import PeerId

__all__ = ["Session", "Stream"]


class Session(Protocol):
    """The muxed connection a stream belongs to (compare with ``Connection.session``)."""

    @property
    def closed(self) -> bool: ...

    @property
    def going_away(self) -> bool:
        """The peer accepts no new streams on this connection."""
        ...

    def carrier(self) -> object:
        """The byte stream under the secure channel (a TCP socket stream, or a relayed circuit):
        what ``tcp_stalled`` inspects to tell a starved path from a gone one."""
        ...


@runtime_checkable
class Stream(Protocol):
    """A stream of a connection; see the module docstring. (``isinstance(x, Stream)`` checks the
    members' presence only: for tests.)"""

    protocol: str | None  # the negotiated (or lazily proposed) protocol id; None while negotiating
    received: int  # payload bytes that arrived so far: what an idle reaper watches for progress
    # Called by the connection's reader right after data arrived; it may parse complete messages
    # from ``first_chunk`` and consume them (``skip_first``). True: it took every buffered byte, so
    # the stream's own reader task is not woken (one task switch less per small message).
    on_data: Callable[[], bool] | None

    @property
    def session(self) -> Session: ...

    @property
    def remote_peer(self) -> PeerId: ...

    @property
    def remote_closed(self) -> bool:
        """The peer has finished sending (its FIN arrived)."""
        ...

    @property
    def failed(self) -> bool:
        """Reset (by either side) or its connection lost: nothing more can be read or written."""
        ...

    @property
    def buffered(self) -> int:
        """Bytes that arrived and are not read yet (reading them cannot wait)."""
        ...

    # -- reading
    async def read(self, max_bytes: int = 65536) -> bytes:
        """Up to ``max_bytes``; ``b""`` only after the peer's clean half-close."""
        ...

    async def read_exactly(self, n: int) -> bytes:
        """Exactly ``n`` bytes, or StreamError if the stream ends first."""
        ...

    async def read_into(self, dest: memoryview) -> None:
        """Fill ``dest`` completely (StreamError if the stream ends first). While nothing is
        buffered the connection decrypts payload straight into ``dest``: the zero-copy receive of
        tensors."""
        ...

    async def wait_data(self) -> None:
        """Wait until at least one unread byte is buffered (StreamError if the stream ends first)."""
        ...

    def first_chunk(self) -> bytes | memoryview | None:
        """The first buffered chunk, to parse without waiting or copying (None: nothing buffered)."""
        ...

    def skip_first(self, n: int) -> None:
        """Consume ``n`` bytes (at most the first chunk's length) the caller parsed in place."""
        ...

    def unread(self, data: bytes) -> None:
        """Put bytes read too far back in front of the buffer (not counted as received again)."""
        ...

    def cancel_on_reset(self, scope: trio.CancelScope) -> None:
        """Cancel ``scope`` when the stream is reset or its connection lost (no watcher task)."""
        ...

    # -- writing
    def can_write_now(self, n: int) -> bool:
        """A write of ``n`` bytes would complete without waiting (window, locks, the connection):
        such a write needs no cancel scope around it."""
        ...

    async def write(self, data: bytes | bytearray | memoryview, fin: bool = False) -> None:
        """Send ``data`` (waiting for window as needed); ``fin=True`` half-closes in the same frame."""
        ...

    @property
    def exclusive_held(self) -> bool:
        """Another task keeps several writes together (see ``exclusive``)."""
        ...

    def exclusive(self) -> AbstractAsyncContextManager[None]:
        """Keep several writes together: no other writer of this stream interleaves."""
        ...

    async def close(self) -> None:
        """Half-close (FIN): we send no more; reading continues."""
        ...

    async def reset(self) -> None:
        """Abort both directions; unread data is dropped."""
        ...

    # -- trio's byte-stream names (the stream can carry a relayed connection)
    async def send_all(self, data: bytes | bytearray | memoryview) -> None: ...

    async def receive_some(self, max_bytes: int = 65536) -> bytes: ...

    async def aclose(self) -> None: ...
