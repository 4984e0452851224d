"""The append-only update log that makes a document durable.

Frame: ``u32 length | u32 crc32(body) | body`` (big-endian), body = ``SignedUpdate.encode()``.
Writes go straight to the file descriptor (no user-space buffer), so once ``append`` returns the
frame survives a SIGKILL of the process. fsync policy:

- ``"always"``: ``append`` fsyncs before returning, so an acknowledged write also survives power loss.
- ``"batch"``: fsync at most every ``BATCH_COUNT`` appends or ``BATCH_SECONDS``, and on ``sync``/``close``;
  a power loss may lose the last unsynced writes (never corrupt the log: the torn tail is dropped).

``append(sync=False)`` leaves the fsync to a later :meth:`sync`, which may run in a worker thread
(group commit off the event loop: one fsync covers every frame appended before it started; a lock
keeps compaction and close from swapping the file descriptor under it).

A crash can leave a partial or corrupt last frame: ``replay`` stops at the last good frame and
truncates the file there, so the next append does not land behind garbage.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

from lattice.errors import PayloadError

from .updates import MAX_ENCODED, SignedUpdate

log = logging.getLogger(__name__)

FsyncPolicy = Literal["always", "batch"]
BATCH_COUNT = 64
BATCH_SECONDS = 0.2
_HEADER = struct.Struct(">II")


class UpdateLog:
    """One document's append-only log file (mode 0600)."""

    def __init__(self, path: str | os.PathLike[str], fsync: FsyncPolicy = "always") -> None:
        if fsync not in ("always", "batch"):
            raise ValueError("fsync must be 'always' or 'batch'")
        self.path = Path(path)
        self.fsync = fsync
        self.dropped_bytes = 0  # bytes cut from a torn/corrupt tail by the last replay
        existed = self.path.exists()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        if not existed:  # make the new directory entry durable too
            _fsync_dir(self.path.parent)
        self._appended = 0  # frames written since open (they survive a SIGKILL of the process)
        self._synced = 0  # ... of which fsynced (they survive a power loss too)
        self._lock = threading.Lock()  # fsync (maybe in a worker thread) vs compact/close
        self._last_sync = time.monotonic()

    def append(self, update: SignedUpdate, sync: bool = True) -> None:
        """Write one frame; durable per the fsync policy when this returns. ``sync=False`` defers
        the fsync to the caller's next :meth:`sync` (group commit)."""
        _write_all(self._fd, _frame(update))
        self._appended += 1
        if sync:
            self.commit()

    def append_many(self, updates: list[SignedUpdate], sync: bool = True) -> None:
        """Write several frames with one system call (then as :meth:`append`)."""
        if not updates:
            return
        _write_all(self._fd, b"".join(_frame(u) for u in updates))
        self._appended += len(updates)
        if sync:
            self.commit()

    @property
    def appended(self) -> int:
        return self._appended

    @property
    def synced(self) -> int:
        return self._synced

    @property
    def unsynced(self) -> int:
        """Frames appended but not yet fsynced."""
        return self._appended - self._synced

    def due(self) -> bool:
        """Whether the policy wants an fsync now ("always": whenever anything is unsynced)."""
        if not self.unsynced:
            return False
        return (
            self.fsync == "always"
            or self.unsynced >= BATCH_COUNT
            or time.monotonic() - self._last_sync >= BATCH_SECONDS
        )

    def commit(self) -> None:
        """fsync what was appended if the policy says so now ("always": yes; "batch": when due)."""
        if self.due():
            self.sync()

    def sync(self) -> None:
        """fsync every frame appended so far (thread-safe: may run in a worker thread)."""
        with self._lock:
            target = self._appended
            if target > self._synced and self._fd >= 0:
                os.fsync(self._fd)
                self._synced = max(self._synced, target)
            self._last_sync = time.monotonic()

    def replay(self) -> Iterator[SignedUpdate]:
        """Every intact update in order; a torn or corrupt tail is truncated away (and logged)."""
        data = self.path.read_bytes()
        updates: list[SignedUpdate] = []
        pos = 0
        while pos + _HEADER.size <= len(data):
            length, crc = _HEADER.unpack_from(data, pos)
            start = pos + _HEADER.size
            if length > MAX_ENCODED or start + length > len(data):
                break
            body = data[start : start + length]
            if zlib.crc32(body) != crc:
                break
            try:
                updates.append(SignedUpdate.decode(body))
            except PayloadError:
                break
            pos = start + length
        self.dropped_bytes = len(data) - pos
        if self.dropped_bytes:
            log.warning("%s: dropped %d bytes of torn or corrupt log tail", self.path, self.dropped_bytes)
            os.ftruncate(self._fd, pos)
            os.fsync(self._fd)
        yield from updates

    def compact(self, updates: Iterable[SignedUpdate]) -> None:
        """Atomically replace the log with exactly ``updates`` (temp file, fsync, rename, fsync dir)."""
        with self._lock:
            self._compact(updates)

    def _compact(self, updates: Iterable[SignedUpdate]) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _write_all(fd, b"".join(_frame(u) for u in updates))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self._synced = self._appended  # every accepted update is in the new, fsynced file

    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def close(self) -> None:
        if self._fd >= 0:
            try:
                self.sync()
            finally:
                with self._lock:
                    os.close(self._fd)
                    self._fd = -1


def _frame(update: SignedUpdate) -> bytes:
    body = update.encode()
    return _HEADER.pack(len(body), zlib.crc32(body)) + body


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
