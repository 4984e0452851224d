"""A tensor inbox (``lattice-node run --inbox``): peers drop named tensors, the node saves them as .npy.

The server side of ``lattice-node send-tensor PEER FILE.npy``. Off by default, since it lets peers
write to our disk: names are restricted to a safe alphabet, a tensor larger than the per-peer byte
cap is refused before it is read (the method's payload limit), the inbox is bounded by
:class:`InboxLimits` (files and bytes, for everyone and per peer, so one peer cannot fill it for the
others), and files appear atomically: written under a random name opened with O_EXCL|O_NOFOLLOW (a
symlink planted in the inbox is never followed), fsynced, renamed. The sender learns the bare file
name, not where our disk keeps it.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import trio

from lattice._files import exclusive_temp, private_dir
from lattice.errors import PayloadError

METHOD = "lattice.inbox.put"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
PART = ".part"


@dataclass(frozen=True)
class InboxLimits:
    """What peers may store (the defaults of NodeConfig.inbox_*; see docs/operators.md)."""

    max_files: int = 1024
    max_bytes: int = 16 << 30
    max_files_per_peer: int = 128
    max_bytes_per_peer: int = 4 << 30


def room_problem(
    listing: dict[str, int], filename: str, prefix: str, nbytes: int, limits: InboxLimits
) -> str | None:
    """Why storing ``nbytes`` as ``filename`` would go over a limit, or None. ``listing`` maps the
    inbox's file names to sizes; the peer's files start with ``prefix``; a file of the same name is
    replaced, so its space counts as free."""
    others = {name: size for name, size in listing.items() if name != filename}
    mine = [size for name, size in others.items() if name.startswith(prefix)]
    if len(mine) >= limits.max_files_per_peer:
        return f"the inbox is full for this peer (limit {limits.max_files_per_peer} files per peer)"
    if sum(mine) + nbytes > limits.max_bytes_per_peer:
        return f"the inbox is full for this peer (limit {limits.max_bytes_per_peer} bytes per peer)"
    if len(others) >= limits.max_files:
        return f"the inbox is full (limit {limits.max_files} files)"
    if sum(others.values()) + nbytes > limits.max_bytes:
        return f"the inbox is full (limit {limits.max_bytes} bytes)"
    return None


def _listing(directory: Path) -> dict[str, int]:
    """Sizes of the inbox's .npy files (regular files only; symlinks are not followed)."""
    with os.scandir(directory) as entries:
        return {
            e.name: e.stat(follow_symlinks=False).st_size
            for e in entries
            if e.name.endswith(".npy") and e.is_file(follow_symlinks=False)
        }


def _remove_parts(directory: Path) -> None:
    """Temporary files left by a crash (they count against no limit, so they must not pile up)."""
    with os.scandir(directory) as entries:
        for e in entries:
            if e.name.startswith(".") and e.name.endswith(PART):
                Path(e.path).unlink(missing_ok=True)


def _save(directory: Path, filename: str, prefix: str, array: np.ndarray, limits: InboxLimits) -> dict:
    problem = room_problem(_listing(directory), filename, prefix, int(array.nbytes), limits)
    if problem is not None:
        raise PayloadError(problem)
    fd, tmp = exclusive_temp(directory, filename, PART)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, array, allow_pickle=False)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, directory / filename)
    except OSError as exc:  # the message names no local path: it goes to the remote peer
        tmp.unlink(missing_ok=True)
        raise PayloadError(f"the inbox cannot store {filename}: {exc.strerror}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    digest = hashlib.sha256(np.ascontiguousarray(array).view(np.uint8).reshape(-1).data).hexdigest()
    return {"file": filename, "bytes": int(array.nbytes), "sha256": digest}


def install(rpc: Any, directory: Path, limits: InboxLimits | None = None) -> None:
    """Serve ``lattice.inbox.put({"name": str, "tensor": array})`` into ``directory``."""
    limits = limits or InboxLimits()
    private_dir(directory, "inbox")
    _remove_parts(directory)
    lock = trio.Lock()  # one write at a time: the limit check and the write see the same inbox

    @rpc.method(METHOD, max_payload=limits.max_bytes_per_peer)  # more would never fit
    async def put(payload: Any, ctx: Any) -> dict:
        if not isinstance(payload, dict) or set(payload) != {"name", "tensor"}:
            raise PayloadError('expected {"name": str, "tensor": array}')
        name, tensor = payload["name"], payload["tensor"]
        if not isinstance(name, str) or not NAME.match(name):
            raise PayloadError("a name is 1-100 characters of A-Z a-z 0-9 . _ - (not starting with . _ -)")
        if not isinstance(tensor, np.ndarray) or tensor.dtype.hasobject:
            raise PayloadError("the tensor must be a numeric array")
        prefix = f"{ctx.peer.short()}-"
        filename = f"{prefix}{name.removesuffix('.npy')}.npy"
        async with lock:
            return await trio.to_thread.run_sync(_save, directory, filename, prefix, tensor, limits)


__all__ = ["METHOD", "InboxLimits", "install", "room_problem"]
