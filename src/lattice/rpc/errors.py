"""RPC errors."""

from __future__ import annotations

from lattice.errors import LatticeError, PayloadError, RemoteError

__all__ = [
    "MethodNotFound",
    "OverLimit",
    "Overloaded",
    "PayloadError",
    "RPCError",
    "RPCTimeout",
    "RemoteCallError",
    "RemoteError",
]


class RPCError(LatticeError):
    """An RPC failed."""


class RPCTimeout(RPCError, TimeoutError):
    """The call did not complete within its timeout (the stream was reset; the connection is fine)."""


class MethodNotFound(RPCError):
    """The peer serves no such method."""


class Overloaded(RPCError):
    """A budget of the callee is exhausted for this call (call slots, memory, upload staging): the
    caller sees ``RemoteError`` of type "Overloaded" naming the budget, and may retry later."""


class OverLimit(PayloadError):
    """A message is over a method's payload limit (refused before any payload byte is read; the
    caller sees a PayloadError naming the limit and the method)."""


class RemoteCallError(RPCError, RemoteError):
    """The handler on the peer raised; ``type`` is its exception's class name (``except RemoteError``
    catches it, as does ``except RPCError``)."""
