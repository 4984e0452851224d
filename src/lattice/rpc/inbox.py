"""A tensor inbox (``lattice-node run --inbox``): peers drop named tensors, the node saves them as .npy.

The server side of ``lattice-node send-tensor PEER FILE.npy``. Off by default, since it lets peers
write to our disk: names are restricted to a safe alphabet, every tensor is bounded by the RPC's
message limit, the inbox as a whole by ``max_bytes``, and files appear atomically (written to a
temporary name, fsynced, renamed), so a reader never sees half a tensor.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import trio

from lattice.errors import PayloadError

METHOD = "lattice.inbox.put"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def _used(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.npy") if p.is_file())


def _save(directory: Path, filename: str, array: np.ndarray, max_bytes: int) -> dict:
    if _used(directory) + array.nbytes > max_bytes:
        raise PayloadError(f"the inbox is full (limit {max_bytes} bytes)")
    final = directory / filename
    tmp = directory / f".{filename}.part"
    with tmp.open("wb") as fh:
        np.save(fh, array, allow_pickle=False)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    digest = hashlib.sha256(np.ascontiguousarray(array).view(np.uint8).reshape(-1)).hexdigest()
    return {"path": str(final), "bytes": int(array.nbytes), "sha256": digest}


def install(rpc: Any, directory: Path, max_bytes: int = 16 << 30) -> None:
    """Serve ``lattice.inbox.put({"name": str, "tensor": array})`` into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    @rpc.method(METHOD)
    async def put(payload: Any, ctx: Any) -> dict:
        if not isinstance(payload, dict) or set(payload) != {"name", "tensor"}:
            raise PayloadError('expected {"name": str, "tensor": array}')
        name, tensor = payload["name"], payload["tensor"]
        if not isinstance(name, str) or not NAME.match(name):
            raise PayloadError("a name is 1-100 characters of A-Z a-z 0-9 . _ - (not starting with . _ -)")
        if not isinstance(tensor, np.ndarray) or tensor.dtype.hasobject:
            raise PayloadError("the tensor must be a numeric array")
        filename = f"{ctx.peer.short()}-{name.removesuffix('.npy')}.npy"
        return await trio.to_thread.run_sync(_save, directory, filename, tensor, max_bytes)


__all__ = ["METHOD", "install"]
