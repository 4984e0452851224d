"""Resumable calls: a large tensor argument survives dropped connections.

``await node.rpc.call(peer, "train.apply", big_tensor, resumable=True)`` uploads the tensor in chunks
into a staging area on the callee (``lattice.upload.*`` methods), then commits: the callee checks the
whole tensor's CRC32 and runs the method with the complete tensor as its payload, exactly as a plain
call would. If the connection drops, the caller reconnects, asks which chunks arrived and sends only
the missing ones. Staging is bounded (total bytes, transfers per peer), owned by the sending peer,
and expires after ``ttl`` seconds without progress.
"""

from __future__ import annotations

import math
import os
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import trio

from lattice.codec import tensors
from lattice.errors import LatticeError, PayloadError
from lattice.identity import PeerId

CHUNK = 8 << 20
MAX_CHUNKS = 1 << 16


@dataclass
class _Staged:
    owner: PeerId
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    chunk: int
    buffer: np.ndarray
    have: set[int] = field(default_factory=set)
    touched: float = field(default_factory=time.monotonic)

    @property
    def chunks(self) -> int:
        return max(1, math.ceil(self.nbytes / self.chunk))


class Uploads:
    """The callee's staging area; installs the ``lattice.upload.*`` methods on an RPC service."""

    def __init__(self, rpc: Any, max_bytes: int = 8 << 30, max_per_peer: int = 8, ttl: float = 300.0) -> None:
        self.rpc = rpc
        self.max_bytes = max_bytes
        self.max_per_peer = max_per_peer
        self.ttl = ttl
        self._staged: dict[bytes, _Staged] = {}
        rpc.register("lattice.upload.begin", self._begin)
        rpc.register("lattice.upload.chunk", self._chunk)
        rpc.register("lattice.upload.commit", self._commit)

    @property
    def staged_bytes(self) -> int:
        return sum(s.nbytes for s in self._staged.values())

    def _expire(self) -> None:
        now = time.monotonic()
        for key in [k for k, s in self._staged.items() if now - s.touched > self.ttl]:
            del self._staged[key]

    def _get(self, tid: Any, peer: PeerId) -> _Staged:
        staged = self._staged.get(tid) if isinstance(tid, bytes) else None
        if staged is None or staged.owner != peer:
            raise PayloadError("unknown or expired upload")
        staged.touched = time.monotonic()
        return staged

    async def _begin(self, req: Any, ctx: Any) -> dict:
        self._expire()
        if not isinstance(req, dict):
            raise PayloadError("upload.begin takes a map")
        tid = req.get("id")
        if not isinstance(tid, bytes) or len(tid) != 16:
            raise PayloadError("upload id must be 16 bytes")
        existing = self._staged.get(tid)
        if existing is not None:
            if existing.owner != ctx.peer:
                raise PayloadError("upload id belongs to another peer")
            existing.touched = time.monotonic()
            return {"have": sorted(existing.have)}
        dtype, shape, chunk = req.get("dtype"), req.get("shape"), req.get("chunk")
        if dtype not in tensors._DTYPES or not isinstance(shape, list) or len(shape) > tensors.MAX_DIMS:
            raise PayloadError("invalid dtype or shape")
        if not all(isinstance(d, int) and d >= 0 for d in shape):
            raise PayloadError("invalid shape")
        nbytes = math.prod(shape) * tensors._DTYPES[dtype].itemsize
        if nbytes > self.rpc.config.max_message or self.staged_bytes + nbytes > self.max_bytes:
            raise PayloadError(f"upload of {nbytes} bytes exceeds the staging limit")
        if not isinstance(chunk, int) or not 1 << 16 <= chunk <= 64 << 20 or nbytes / chunk > MAX_CHUNKS:
            raise PayloadError("invalid chunk size")
        if sum(1 for s in self._staged.values() if s.owner == ctx.peer) >= self.max_per_peer:
            raise PayloadError("too many uploads in progress from this peer")
        buffer = np.empty(nbytes, dtype=np.uint8)  # allocated only after every check above
        self._staged[tid] = _Staged(ctx.peer, dtype, tuple(shape), nbytes, chunk, buffer)
        return {"have": []}

    async def _chunk(self, req: Any, ctx: Any) -> None:
        if not isinstance(req, dict):
            raise PayloadError("upload.chunk takes a map")
        staged = self._get(req.get("id"), ctx.peer)
        index, data = req.get("index"), req.get("data")
        if not isinstance(index, int) or not 0 <= index < staged.chunks:
            raise PayloadError("chunk index out of range")
        start = index * staged.chunk
        size = min(staged.chunk, staged.nbytes - start)
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.nbytes != size:
            raise PayloadError(f"chunk {index} must be {size} bytes")
        staged.buffer[start : start + size] = data.reshape(-1)
        staged.have.add(index)

    async def _commit(self, req: Any, ctx: Any) -> Any:
        if not isinstance(req, dict):
            raise PayloadError("upload.commit takes a map")
        tid = req.get("id")
        staged = self._get(tid, ctx.peer)
        if len(staged.have) != staged.chunks:
            raise PayloadError(f"upload incomplete: {len(staged.have)} of {staged.chunks} chunks")
        if zlib.crc32(staged.buffer) != req.get("crc"):
            del self._staged[tid]
            raise PayloadError("uploaded tensor does not match its checksum")
        method = req.get("method")
        entry = self.rpc._methods.get(method) if isinstance(method, str) else None
        if entry is None or entry.kind != "unary" or method.startswith("lattice.upload."):
            raise PayloadError(f"no unary method {method!r} to commit to")
        del self._staged[tid]
        spec = tensors.TensorSpec(
            staged.dtype, staged.shape, staged.nbytes, req.get("origin", "numpy"), None, None
        )
        spec.buffer = staged.buffer
        payload = tensors.finish(spec)
        return await self.rpc._invoke(entry, payload, ctx)


async def call(
    rpc: Any,
    peer: Any,
    method: str,
    tensor: Any,
    *,
    timeout: float | None,
    chunk: int = CHUNK,
    retries: int = 5,
    as_torch: bool | None = None,
) -> Any:
    """Caller side of a resumable call (see module docstring)."""
    dtype, shape, raw, origin = tensors.tensor_bytes(tensor)
    data = np.frombuffer(raw, dtype=np.uint8)
    tid = os.urandom(16)
    crc = zlib.crc32(raw)
    nchunks = max(1, math.ceil(len(data) / chunk))
    begin = {"id": tid, "dtype": dtype, "shape": list(shape), "chunk": chunk}
    deadline = trio.current_time() + (timeout if timeout is not None else rpc.config.default_timeout)
    attempt = 0
    rpc.stats.setdefault("resumed", 0)
    while True:
        try:
            remaining = max(0.1, deadline - trio.current_time())
            have = set((await rpc.call(peer, "lattice.upload.begin", begin, timeout=remaining))["have"])
            if attempt:
                rpc.stats["resumed"] += 1
            for index in range(nchunks):
                if index in have:
                    continue
                piece = data[index * chunk : (index + 1) * chunk]
                remaining = max(0.1, deadline - trio.current_time())
                await rpc.call(peer, "lattice.upload.chunk", {"id": tid, "index": index, "data": piece},
                               timeout=remaining)  # fmt: skip
            remaining = max(0.1, deadline - trio.current_time())
            commit = {"id": tid, "method": method, "crc": crc, "origin": origin}
            return await rpc.call(peer, "lattice.upload.commit", commit, timeout=remaining, as_torch=as_torch)
        except LatticeError as exc:
            from lattice.rpc.errors import RemoteError, RPCTimeout

            attempt += 1
            if (
                isinstance(exc, RemoteError | RPCTimeout)
                or attempt > retries
                or trio.current_time() >= deadline
            ):
                raise
            await trio.sleep(
                min(0.1 * 2**attempt, 2.0)
            )  # the connection dropped: back off, reconnect, resume
