"""What providers and fetchers say to each other over the node's RPC (pure checks, no I/O).

    content.manifest  server stream  {"cid": str}                 -> one message: the manifest bytes
    content.chunks    server stream  {"cid": str, "chunks": [i]}  -> per chunk asked, in order:
                                                                      {"i": i, "d": uint8 array}
                                                                      or {"i": i, "missing": true}

Providers are announced in the DHT under ``provider_key(cid)``. Every field a peer sends is checked
here before it is used: the requester bounds reply sizes (``RPC.call_stream(max_reply=...)``)
before anything is allocated, the provider bounds the chunks one request may ask for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lattice._lazy import lazy_module
from lattice.content.cid import ContentId
from lattice.content.errors import ContentError, PayloadError

if TYPE_CHECKING:
    import numpy as np
else:
    np = lazy_module("numpy")  # loaded with the first chunk or tensor (lattice._lazy)

__all__ = ["CHUNKS", "MANIFEST", "ChunkReply", "parse_chunk_reply", "parse_chunk_request", "provider_key"]

MANIFEST = "content.manifest"
CHUNKS = "content.chunks"
KEY_PREFIX = b"/lattice/content/"
REPLY_SLACK = 4096  # a reply's header and value document beside the chunk's bytes


def provider_key(cid: ContentId) -> bytes:
    """The DHT key providers of ``cid`` announce themselves under."""
    return KEY_PREFIX + cid.to_bytes()


def parse_cid(payload: Any) -> ContentId:
    if not isinstance(payload, dict):
        raise PayloadError("a content request is a map")
    cid = payload.get("cid")
    if not isinstance(cid, str):
        raise PayloadError("a content request names its cid")
    try:
        return ContentId.parse(cid)
    except ContentError as exc:
        raise PayloadError(str(exc)) from None


def parse_chunk_request(payload: Any, max_chunks: int) -> tuple[ContentId, list[int]]:
    """(content id, chunk indices) of a ``content.chunks`` request; PayloadError if malformed."""
    cid = parse_cid(payload)
    chunks = payload.get("chunks")
    if not isinstance(chunks, list) or not 0 < len(chunks) <= max_chunks:
        raise PayloadError(f"a request asks for 1 to {max_chunks} chunks")
    if not all(type(i) is int and 0 <= i < 1 << 40 for i in chunks) or len(set(chunks)) != len(chunks):
        raise PayloadError("chunk indices are distinct non-negative integers")
    return cid, chunks


class ChunkReply:
    __slots__ = ("data", "index")

    def __init__(self, index: int, data: np.ndarray | None) -> None:
        self.index = index
        self.data = data  # None: the provider does not have it


def parse_chunk_reply(item: Any) -> ChunkReply:
    """One message of a ``content.chunks`` reply; PayloadError if malformed (the caller checks the
    index against what it asked for and the bytes against the chunk's hash)."""
    if not isinstance(item, dict) or type(item.get("i")) is not int:
        raise PayloadError("a chunk reply is a map with an index")
    if item.get("missing") is True:
        return ChunkReply(item["i"], None)
    data = item.get("d")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 1:
        raise PayloadError("a chunk reply carries its bytes as a 1-D uint8 array")
    return ChunkReply(item["i"], data)
