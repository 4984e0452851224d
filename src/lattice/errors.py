"""The exception hierarchy: every error Lattice raises on purpose is a LatticeError."""

from __future__ import annotations


class LatticeError(Exception):
    """Base class of all Lattice errors."""


class ConfigError(LatticeError):
    """Invalid configuration: bad value, unreadable file, malformed multiaddr."""


class IdentityError(LatticeError):
    """Unusable key or peer id (bad file permissions, malformed key, wrong type)."""


class TransportError(LatticeError):
    """A connection could not be made or was lost."""


class DialError(TransportError):
    """Dialing a peer failed (refused, unreachable, handshake failed, wrong peer id)."""


class HandshakeError(TransportError):
    """The security or muxer handshake failed."""


class ProtocolError(TransportError):
    """The remote peer violated a wire protocol; the connection is closed."""


class StreamError(TransportError):
    """A stream failed: reset by the peer, or its connection was lost."""


class StreamReset(StreamError):
    """The peer (or we) reset the stream; data may be lost."""


class ConnectionLost(StreamError):
    """The underlying connection closed before the stream finished."""


class NegotiationError(TransportError):
    """The peer does not support any of the requested protocols."""


class ControlError(LatticeError):
    """The local control API failed: daemon not running, bad request, remote error."""


class NodeError(LatticeError):
    """A node operation failed (not started, already closed, ...)."""


class RemoteError(LatticeError):
    """The other side ran the operation and it raised: a handler on a peer (an RPC call: the
    ``lattice.rpc.RemoteCallError`` subclass, also an RPCError) or a daemon's control operation
    (``lattice.Client``: ``lattice.control.ControlRemoteError``, also a ControlError). ``type`` is
    the remote error's class name, ``remote_message`` its message."""

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type = type_name
        self.remote_message = message


class PayloadError(LatticeError):
    """A value cannot be encoded, or a received message is malformed or over a limit."""
