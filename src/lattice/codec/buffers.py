"""Receive buffers for tensors: page-aligned, and large ones recycled once nothing refers to them.

Why a module of its own: the codecs (``tensors``, ``compression``) both allocate from here.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lattice._lazy import lazy_module

if TYPE_CHECKING:
    import numpy as np
else:
    np = lazy_module("numpy")

__all__ = ["ALIGN_FROM", "PAGE", "RECYCLER", "BufferRecycler", "RecycleConfig", "aligned_empty", "recycled"]


PAGE = 4096
ALIGN_FROM = 64 << 10  # tensors this large land page-aligned


def aligned_empty(nbytes: int) -> np.ndarray:
    """An uninitialized uint8 array starting on a page boundary: a content chunk received into it is
    written with ``O_DIRECT`` straight from it (no bounce copy). Costs at most a page more."""
    raw = np.empty(nbytes + PAGE, dtype=np.uint8)
    start = -raw.ctypes.data % PAGE
    return raw[start : start + nbytes]


@dataclass
class RecycleConfig:
    """What :class:`BufferRecycler` keeps: receive buffers of at least ``min_bytes``, up to
    ``max_bytes`` of them in all (lent or free; beyond, buffers are plain allocations). Free ones
    stay in the process's memory outside the resource manager's budgets, so the bound is small: a
    gossip round of a 16 MB model uses ~4 buffers of 16 MiB."""

    max_bytes: int = 64 << 20
    min_bytes: int = 1 << 20


class BufferRecycler:
    """Hands out large receive buffers again once nothing refers to them any more.

    Why: a fresh buffer's pages are faulted in and zeroed on first touch, on this VM ~0.5 ms of CPU
    per MiB (16 % of a gossip peer's CPU: every round received 32 MB into new memory). A buffer is
    free when only this recycler refers to its owner array: every numpy view, memoryview and
    ``torch.from_numpy`` tensor of it keeps the owner alive, so a buffer still in use is never reused.
    Process-wide (it is an allocator cache); thread-safe.
    """

    def __init__(self, config: RecycleConfig | None = None) -> None:
        self.config = config or RecycleConfig()
        self._owners: list[np.ndarray] = []  # every owner array handed out, oldest first
        self._lock = threading.Lock()
        self.reused = 0  # buffers handed out again (a counter for tests and benches)

    def held_bytes(self) -> int:
        return sum(o.nbytes for o in self._owners)

    def take(self, nbytes: int) -> np.ndarray:
        """A page-aligned uint8 array of ``nbytes`` (a free one of the same size if there is one)."""
        if nbytes < self.config.min_bytes:
            return aligned_empty(nbytes)
        size = nbytes + PAGE
        with self._lock:
            free = _unreferenced(self._owners)
            for i in free:
                if self._owners[i].nbytes == size:
                    owner = self._owners.pop(i)
                    self._owners.append(owner)  # most recently used last
                    self.reused += 1
                    return _aligned_view(owner, nbytes)
            held, drop = self.held_bytes(), set()
            for i in free:  # make room: forget free buffers of other sizes, least recently used first
                if held + size <= self.config.max_bytes:
                    break
                held -= self._owners[i].nbytes
                drop.add(i)
            self._owners = [o for i, o in enumerate(self._owners) if i not in drop]
            owner = np.empty(size, dtype=np.uint8)
            if held + size <= self.config.max_bytes:
                self._owners.append(owner)
            return _aligned_view(owner, nbytes)

    def clear(self) -> None:
        """Forget every buffer (those in use stay valid: they are plain arrays)."""
        with self._lock:
            self._owners.clear()


def _unreferenced(owners: list[np.ndarray]) -> list[int]:
    """Indices of the owners nothing but the list refers to (ascending)."""
    return [i for i in range(len(owners)) if sys.getrefcount(owners[i]) <= _FREE_REFS]


def _free_refs() -> int:
    """What sys.getrefcount says in :func:`_unreferenced` of an object only a list refers to,
    measured the same way (an interpreter that counts differently keeps the test right)."""
    probe = [object()]
    return sys.getrefcount(probe[0])


_FREE_REFS = _free_refs()
RECYCLER = BufferRecycler()


def _aligned_view(owner: np.ndarray, nbytes: int) -> np.ndarray:
    start = -owner.ctypes.data % PAGE
    return owner[start : start + nbytes]


def recycled(nbytes: int) -> np.ndarray:
    """An uninitialized uint8 array of ``nbytes``; large ones page-aligned and recycled once nothing
    refers to them any more (:class:`BufferRecycler`). For buffers made anew for every message."""
    return RECYCLER.take(nbytes) if nbytes >= ALIGN_FROM else np.empty(nbytes, dtype=np.uint8)
