"""Manifests: what a content id names. A DAG-JSON block (sorted keys, no whitespace) that links to
the content's chunks by their CIDs, so any IPLD tool can read it and the manifest's own CID covers
every byte::

    {"chunk_size": 1048576, "chunks": [{"/": "bafkr4i..."}, ...], "format": "lattice-content/1",
     "kind": "blob" | "safetensors", "size": 3145728,
     "tensors": [{"dtype": "F32", "name": "w", "offsets": [start, end], "shape": [1024, 768]}, ...]}

``offsets`` are absolute byte offsets in the content (for a safetensors file: past its header), so
a peer can fetch only the chunks that hold the tensors it needs. Decoding is bounded (size before
parsing, counts, lengths, consistency of every offset) and never evaluates anything.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from lattice.content.cid import DAG_JSON, HASHES, RAW, ContentId
from lattice.content.errors import ContentError, PayloadError

__all__ = [
    "FORMAT",
    "MAX_CHUNK",
    "MIN_CHUNK",
    "Manifest",
    "TensorEntry",
    "safetensors_layout",
    "safetensors_metadata",
]

FORMAT = "lattice-content/1"
MIN_CHUNK = 4 << 10
MAX_CHUNK = 4 << 20  # a chunk is one RPC message: a receiver holds at most this per request
MAX_TENSORS = 1_000_000
MAX_NAME = 1024
MAX_DIMS = 32
MAX_SAFETENSORS_HEADER = 100 << 20  # the safetensors spec's own limit
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str  # safetensors spelling: F32, BF16, ...
    shape: tuple[int, ...]
    start: int  # absolute offsets in the content
    end: int


@dataclass(frozen=True)
class Manifest:
    size: int
    chunk_size: int
    hash_code: int  # multihash code of every chunk
    chunks: tuple[bytes, ...]  # chunk digests, in order
    kind: str = "blob"
    tensors: tuple[TensorEntry, ...] = ()

    @property
    def count(self) -> int:
        return len(self.chunks)

    def chunk_range(self, index: int) -> tuple[int, int]:
        start = index * self.chunk_size
        return start, min(self.size, start + self.chunk_size)

    def chunk_len(self, index: int) -> int:
        start, end = self.chunk_range(index)
        return end - start

    def chunk_id(self, index: int) -> ContentId:
        return ContentId(RAW, self.hash_code, self.chunks[index])

    def chunks_for(self, names: Iterable[str]) -> list[int]:
        """The chunks holding the tensors ``names`` (ContentError names a tensor that is not there)."""
        by_name = {t.name: t for t in self.tensors}
        wanted: set[int] = set()
        for name in names:
            entry = by_name.get(name)
            if entry is None:
                raise ContentError(f"no tensor {name!r} in this content")
            wanted.update(self.chunks_in(entry.start, entry.end))
        return sorted(wanted)

    def chunks_in(self, start: int, end: int) -> range:
        """The chunks holding bytes [start, end) (none if the range is empty)."""
        end = min(end, self.size)
        if end <= start:
            return range(0)
        return range(start // self.chunk_size, (end - 1) // self.chunk_size + 1)

    def encode(self) -> bytes:
        doc: dict = {
            "chunk_size": self.chunk_size,
            "chunks": [{"/": str(self.chunk_id(i))} for i in range(self.count)],
            "format": FORMAT,
            "kind": self.kind,
            "size": self.size,
        }
        if self.tensors:
            doc["tensors"] = [
                {"dtype": t.dtype, "name": t.name, "offsets": [t.start, t.end], "shape": list(t.shape)}
                for t in self.tensors
            ]
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

    @property
    def cid(self) -> ContentId:
        return ContentId.of(self.encode(), DAG_JSON, self.hash_code)

    @classmethod
    def decode(cls, data: bytes, max_bytes: int) -> Manifest:
        """Parse and check a manifest (PayloadError, one line, for anything wrong)."""
        if len(data) > max_bytes:
            raise PayloadError(f"manifest of {len(data)} bytes is over the limit of {max_bytes}")
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError) as exc:
            raise PayloadError(f"malformed manifest: {str(exc)[:200]}") from None
        try:
            return _from_doc(doc)
        except ContentError as exc:
            raise PayloadError(f"malformed manifest: {exc}") from None


def _int(value: object, what: str, low: int = 0, high: int = 1 << 62) -> int:
    if type(value) is not int or not low <= value <= high:
        raise PayloadError(f"{what} must be an integer in [{low}, {high}]")
    return value


def _from_doc(doc: object) -> Manifest:
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise PayloadError(f"not a {FORMAT} manifest")
    size = _int(doc.get("size"), "size")
    chunk_size = _int(doc.get("chunk_size"), "chunk_size", MIN_CHUNK, MAX_CHUNK)
    links = doc.get("chunks")
    if not isinstance(links, list) or len(links) != math.ceil(size / chunk_size):
        raise PayloadError("chunks must list ceil(size / chunk_size) links")
    digests = []
    hash_code = None
    for link in links:
        if not isinstance(link, dict) or len(link) != 1 or not isinstance(link.get("/"), str):
            raise PayloadError("a chunk link is {'/': cid}")
        cid = ContentId.parse(link["/"])
        if cid.codec != RAW or (hash_code is not None and cid.hash_code != hash_code):
            raise PayloadError("chunks must be raw blocks hashed alike")
        hash_code = cid.hash_code
        digests.append(cid.digest)
    kind = doc.get("kind")
    if kind not in ("blob", "safetensors"):
        raise PayloadError("kind must be 'blob' or 'safetensors'")
    tensors = _tensors(doc.get("tensors", []), size) if kind == "safetensors" else ()
    if kind == "blob" and "tensors" in doc:
        raise PayloadError("a blob has no tensors")
    return Manifest(size, chunk_size, hash_code or min(HASHES), tuple(digests), kind, tensors)


def _tensors(raw: object, size: int) -> tuple[TensorEntry, ...]:
    if not isinstance(raw, list) or len(raw) > MAX_TENSORS:
        raise PayloadError(f"tensors must be a list of at most {MAX_TENSORS}")
    out = []
    names = set()
    for item in raw:
        if not isinstance(item, dict):
            raise PayloadError("a tensor entry is a map")
        name, dtype, shape, offsets = (
            item.get("name"),
            item.get("dtype"),
            item.get("shape"),
            item.get("offsets"),
        )
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME or name in names:
            raise PayloadError("tensor names are unique strings of 1-1024 characters")
        if dtype not in DTYPE_SIZES:
            raise PayloadError(f"tensor {name!r}: unknown dtype")
        if not isinstance(shape, list) or len(shape) > MAX_DIMS:
            raise PayloadError(f"tensor {name!r}: shape must be a list of at most {MAX_DIMS} dimensions")
        dims = tuple(_int(d, "a dimension", 0, size) for d in shape)
        if not isinstance(offsets, list) or len(offsets) != 2:
            raise PayloadError(f"tensor {name!r}: offsets are [start, end]")
        start, end = _int(offsets[0], "offset", 0, size), _int(offsets[1], "offset", 0, size)
        if end < start or end - start != math.prod(dims) * DTYPE_SIZES[dtype]:
            raise PayloadError(f"tensor {name!r}: offsets do not match its dtype and shape")
        names.add(name)
        out.append(TensorEntry(name, dtype, dims, start, end))
    return tuple(out)


def safetensors_metadata(header: bytes) -> dict[str, str]:
    """The ``__metadata__`` map (strings to strings) of a safetensors JSON header; PayloadError if
    the header is not one or the map is not strings (it came from whoever made the content)."""
    try:
        doc = json.loads(header)
    except (ValueError, RecursionError):
        raise PayloadError("not a safetensors file (header is not JSON)") from None
    if not isinstance(doc, dict):
        raise PayloadError("not a safetensors file (header is not a map)")
    meta = doc.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise PayloadError("safetensors __metadata__ must map strings to strings")
    return meta


def safetensors_layout(head: bytes, size: int) -> tuple[TensorEntry, ...]:
    """The tensors of a safetensors file of ``size`` bytes, from its first bytes ``head`` (8-byte
    little-endian header length, then the JSON header); PayloadError if it is not one."""
    if len(head) < 8:
        raise PayloadError("not a safetensors file (too short)")
    (n,) = struct.unpack_from("<Q", head)
    if n > MAX_SAFETENSORS_HEADER or 8 + n > size or len(head) < 8 + n:
        raise PayloadError("not a safetensors file (header length)")
    try:
        header = json.loads(bytes(head[8 : 8 + n]))
    except (ValueError, RecursionError):
        raise PayloadError("not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise PayloadError("not a safetensors file (header is not a map)")
    base = 8 + n
    items = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or not isinstance(info.get("data_offsets"), list):
            raise PayloadError(f"safetensors tensor {name!r} has no data_offsets")
        begin, end = info["data_offsets"][:2] if len(info["data_offsets"]) == 2 else (None, None)
        if type(begin) is not int or type(end) is not int:
            raise PayloadError(f"safetensors tensor {name!r}: bad data_offsets")
        items.append({"name": name, "dtype": info.get("dtype"), "shape": info.get("shape"),
                      "offsets": [base + begin, base + end]})  # fmt: skip
    items.sort(key=lambda t: (t["offsets"][0], t["name"]))
    return _tensors(items, size)
