"""Chunked RPC that moves tensors between peers: unary and streaming calls, compression codecs."""

from typing import TYPE_CHECKING, Any

from lattice.rpc.errors import (
    MethodNotFound,
    PayloadError,
    RemoteCallError,
    RemoteError,
    RPCError,
    RPCTimeout,
)
from lattice.rpc.service import PROTOCOL_ID, RPC, CallContext, RPCConfig, RPCStream

if TYPE_CHECKING:
    from lattice.codec.compression import Compressed, ErrorFeedback
    from lattice.codec.compression import register as register_codec

__all__ = [
    "PROTOCOL_ID",
    "RPC",
    "CallContext",
    "Compressed",
    "ErrorFeedback",
    "MethodNotFound",
    "PayloadError",
    "RPCConfig",
    "RPCError",
    "RPCStream",
    "RPCTimeout",
    "RemoteCallError",
    "RemoteError",
    "register_codec",
]


def __getattr__(name: str) -> Any:
    """The codecs' names, loaded on first use (lattice.codec.compression imports numpy)."""
    if name not in ("Compressed", "ErrorFeedback", "register_codec"):
        raise AttributeError(f"module 'lattice.rpc' has no attribute {name!r}")
    from lattice.codec import compression

    return compression.register if name == "register_codec" else getattr(compression, name)
