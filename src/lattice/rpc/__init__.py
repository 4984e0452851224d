"""Chunked RPC that moves tensors between peers: unary and streaming calls, compression codecs."""

from lattice.codec.compression import Compressed, ErrorFeedback
from lattice.codec.compression import register as register_codec
from lattice.rpc.errors import (
    MethodNotFound,
    PayloadError,
    RemoteCallError,
    RemoteError,
    RPCError,
    RPCTimeout,
)
from lattice.rpc.service import PROTOCOL_ID, RPC, CallContext, RPCConfig, RPCStream

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
