"""Resumable calls: a large tensor argument survives dropped connections.

``await node.rpc.call(peer, "train.apply", big_tensor, resumable=True)`` uploads the tensor in chunks
into a staging area on the callee (``lattice.upload.*`` methods), then commits: the callee checks the
whole tensor's CRC32 and runs the method with the complete tensor as its payload, exactly as a plain
call would. If the connection drops, the caller reconnects, asks which chunks arrived and sends only
the missing ones.

Staging is memory a stranger makes the callee hold, so it is bounded like any (RPCConfig.upload_*):
per peer (bytes and uploads in progress) and for the node, and the declared bytes are reserved from
the peer's and the node's memory budget at ``begin``. Staging that receives no chunk is dropped after
``upload_first_chunk_timeout``, then after ``upload_ttl`` without a new chunk; asking again
(``begin`` of the same id, to resume) does not extend either. The staging buffer is allocated at
the first chunk.
"""

from __future__ import annotations

import math
import os
import time
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from lattice._lazy import lazy_module
from lattice.codec import tensors
from lattice.codec.shapes import MAX_ARRAY_BYTES, checked_nbytes
from lattice.errors import LatticeError, PayloadError
from lattice.identity import PeerId
from lattice.rpc.errors import Overloaded
from lattice.transport.resources import Lease

if TYPE_CHECKING:
    import numpy as np
else:
    np = lazy_module("numpy")  # loaded with the first staged chunk (lattice._lazy)

CHUNK = 8 << 20
MAX_CHUNK = 64 << 20
MAX_CHUNKS = 1 << 16


@dataclass
class _Staged:
    owner: PeerId
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    chunk: int
    lease: Lease | None  # the declared bytes, reserved from the owner's and the node's budgets
    expires: float  # time.monotonic() after which it is dropped
    buffer: np.ndarray | None = None  # allocated at the first chunk
    have: set[int] = field(default_factory=set)

    @property
    def chunks(self) -> int:
        return max(1, math.ceil(self.nbytes / self.chunk))

    def release(self) -> None:
        if self.lease is not None:
            self.lease.close()


class Uploads:
    """The callee's staging area; installs the ``lattice.upload.*`` methods on an RPC service (its
    limits are the service's RPCConfig ``upload_*`` fields)."""

    def __init__(self, rpc: Any) -> None:
        self.rpc = rpc
        self._staged: dict[bytes, _Staged] = {}
        self.expired = 0
        rpc.register("lattice.upload.begin", self._begin)
        rpc.register("lattice.upload.chunk", self._chunk, max_payload=MAX_CHUNK)
        rpc.register("lattice.upload.commit", self._commit)

    @property
    def staged_bytes(self) -> int:
        return sum(s.nbytes for s in self._staged.values())

    def expire(self) -> None:
        """Drop staging whose time is up (called on begin and by the RPC's idle reaper)."""
        now = time.monotonic()
        for key in [k for k, s in self._staged.items() if now > s.expires]:
            self._drop(key)
            self.expired += 1

    def _drop(self, tid: bytes) -> _Staged | None:
        staged = self._staged.pop(tid, None)
        if staged is not None:
            staged.release()
        return staged

    def _get(self, tid: Any, peer: PeerId) -> _Staged:
        staged = self._staged.get(tid) if isinstance(tid, bytes) else None
        if staged is None or staged.owner != peer:
            raise PayloadError("unknown or expired upload")
        return staged

    async def _begin(self, req: Any, ctx: Any) -> dict:
        self.expire()
        if not isinstance(req, dict):
            raise PayloadError("upload.begin takes a map")
        tid = req.get("id")
        if not isinstance(tid, bytes) or len(tid) != 16:
            raise PayloadError("upload id must be 16 bytes")
        existing = self._staged.get(tid)
        if existing is not None:  # a resume: which chunks arrived (its deadline stays as it is)
            if existing.owner != ctx.peer:
                raise PayloadError("upload id belongs to another peer")
            return {"have": sorted(existing.have)}
        cfg = self.rpc.config
        dtype, shape, chunk = req.get("dtype"), req.get("shape"), req.get("chunk")
        if not isinstance(dtype, str) or not isinstance(shape, list | tuple):
            raise PayloadError("an upload names its tensor's dtype and shape")
        nbytes = checked_nbytes(shape, tensors.itemsize(dtype), MAX_ARRAY_BYTES)
        if nbytes > cfg.max_message:
            raise PayloadError(f"upload of {nbytes} bytes exceeds the staging limit of {cfg.max_message}")
        if not isinstance(chunk, int) or not 1 << 16 <= chunk <= MAX_CHUNK or nbytes / chunk > MAX_CHUNKS:
            raise PayloadError("invalid chunk size")
        mine = [s for s in self._staged.values() if s.owner == ctx.peer]
        if len(mine) >= cfg.upload_peer_count:
            raise PayloadError(f"too many uploads in progress from this peer (limit {cfg.upload_peer_count})")
        held = sum(s.nbytes for s in mine)
        if held + nbytes > cfg.upload_peer_bytes:
            raise PayloadError(
                f"upload of {nbytes} bytes is over this peer's staging quota of {cfg.upload_peer_bytes}"
                f" bytes ({held} staged)"
            )
        if self.staged_bytes + nbytes > cfg.upload_max_bytes:
            used = self.staged_bytes
            raise Overloaded(f"upload staging is full ({used}+{nbytes} > {cfg.upload_max_bytes})")
        lease = self.rpc.reserve(ctx.peer, nbytes)  # Overloaded if the peer's or node's budget is full
        expires = time.monotonic() + cfg.upload_first_chunk_timeout
        self._staged[tid] = _Staged(ctx.peer, dtype, tuple(shape), nbytes, chunk, lease, expires)
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
        if staged.buffer is None:
            staged.buffer = np.empty(staged.nbytes, dtype=np.uint8)  # reserved at begin
        staged.buffer[start : start + size] = data.reshape(-1)
        staged.have.add(index)
        staged.expires = time.monotonic() + self.rpc.config.upload_ttl  # progress

    async def _commit(self, req: Any, ctx: Any) -> Any:
        if not isinstance(req, dict):
            raise PayloadError("upload.commit takes a map")
        tid = req.get("id")
        staged = self._get(tid, ctx.peer)
        assert isinstance(tid, bytes)  # _get found it
        if len(staged.have) != staged.chunks or staged.buffer is None:
            raise PayloadError(f"upload incomplete: {len(staged.have)} of {staged.chunks} chunks")
        if zlib.crc32(staged.buffer.data) != req.get("crc"):
            self._drop(tid)
            raise PayloadError("uploaded tensor does not match its checksum")
        method = req.get("method")
        entry = self.rpc.lookup(method)
        if entry is None or entry.kind != "unary" or str(method).startswith("lattice.upload."):
            raise PayloadError(f"no unary method {method!r} to commit to")
        del self._staged[tid]
        try:
            spec = tensors.TensorSpec(
                staged.dtype, staged.shape, staged.nbytes, req.get("origin", "numpy"), None, None
            )
            spec.buffer = staged.buffer
            payload = tensors.finish(spec)
            return await self.rpc.invoke(entry, payload, ctx)
        finally:
            staged.release()  # held until the method is done with the tensor


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
    rpc.counters.setdefault("resumed", 0)
    while True:
        try:
            remaining = max(0.1, deadline - trio.current_time())
            have = set((await rpc.call(peer, "lattice.upload.begin", begin, timeout=remaining))["have"])
            if attempt:
                rpc.counters["resumed"] += 1
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
