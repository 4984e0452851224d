"""A fair lock whose uncontended acquire and release are a few attribute operations.

trio.Lock records its owner task and registers a parking-lot breaker on every acquire, and checks
its parking lot on every release: about ten Python calls into trio and ``inspect`` per use. On a
small call's path (the muxer's send lock, taken once per frame on both sides) that code runs after
an idle gap, when the CPU fetches all of it cold: there, every distinct function touched costs more
than the rest of its work (docs/perf.md, "Cold calls").
"""

from __future__ import annotations

from typing import Any

import trio
from trio.lowlevel import ParkingLot, cancel_shielded_checkpoint, checkpoint_if_cancelled


class FairLock:
    """Mutual exclusion between trio tasks, first come first served (a release hands the lock to
    the longest waiter). Unlike trio.Lock it does not track its owner: the holder must release it
    (use ``async with``, or ``try``/``finally``)."""

    __slots__ = ("_lot", "_waiting", "held")

    def __init__(self) -> None:
        self.held = False  # read it directly on hot paths (no call)
        self._waiting = 0  # parked tasks, and one handed the lock until it resumes (>= len(self._lot))
        self._lot = ParkingLot()

    def locked(self) -> bool:
        return self.held

    def acquire_nowait(self) -> None:
        """Take the lock, or raise trio.WouldBlock. (Nobody waits while it is free: a release hands
        it to the first waiter, and a cancelled waiter leaves the parking lot at once.)"""
        if self.held:
            raise trio.WouldBlock
        self.held = True

    async def acquire(self) -> None:
        """Take the lock (a checkpoint, as trio.Lock.acquire)."""
        await checkpoint_if_cancelled()
        if not self.held:
            self.held = True
            await cancel_shielded_checkpoint()
            return
        self._waiting += 1
        try:
            await self._lot.park()  # woken by release, which leaves ``held`` set for us
        finally:
            self._waiting -= 1

    def release(self) -> None:
        if not self.held:
            raise RuntimeError("release of a lock that is not held")
        if not (self._waiting and self._lot.unpark()):
            self.held = False

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc: Any) -> None:
        self.release()


class FairSemaphore:
    """A counting semaphore with the same fast paths as :class:`FairLock` (a caller's call slots
    per peer: taken and given back once per call). Waiters are served in order."""

    __slots__ = ("_lot", "_waiting", "value")

    def __init__(self, value: int) -> None:
        if value < 0:
            raise ValueError("a semaphore's initial value must be >= 0")
        self.value = value  # free slots (0 while anyone waits)
        self._waiting = 0
        self._lot = ParkingLot()

    def try_acquire(self) -> bool:
        """Take a slot if one is free (no checkpoint, no exception on the fast path)."""
        if not self.value:
            return False
        self.value -= 1
        return True

    def acquire_nowait(self) -> None:
        """Take a slot, or raise trio.WouldBlock."""
        if not self.try_acquire():
            raise trio.WouldBlock

    async def acquire(self) -> None:
        """Take a slot (a checkpoint, as trio.Semaphore.acquire)."""
        await checkpoint_if_cancelled()
        if self.value:
            self.value -= 1
            await cancel_shielded_checkpoint()
            return
        self._waiting += 1
        try:
            await self._lot.park()  # woken by release, which hands its slot over
        finally:
            self._waiting -= 1

    def release(self) -> None:
        if not (self._waiting and self._lot.unpark()):
            self.value += 1
