"""A named, replicated, durable CRDT document (a pycrdt/Yjs ``Doc`` plus a signed update log).

Every local transaction becomes one :class:`SignedUpdate` (the author's next ``seq``), appended to
the log from inside pycrdt's transaction observer, so it is on disk (per the log's fsync policy)
before the write call returns; inside :meth:`Document.deferred` it is written but fsynced only by the
next :meth:`Document.flush` (group commit, off the event loop), which must complete before the
write is acknowledged to anyone. Remote updates are verified, applied, then logged before ``apply``
returns True. Each ``(author, seq)`` is applied at most once, in any order (Yjs buffers updates whose
dependencies have not arrived yet), so two replicas holding the same set of updates are identical.

A rejected local write (no write access, over a size limit, log failure) has already touched the
in-memory Yjs doc, and Yjs cannot take it back without leaving holes in this client's clock that
would stall every peer. The document therefore rebuilds its in-memory state from the accepted
updates; handles obtained before (``get_map`` etc.) become stale and raise :class:`StaleHandle`.
Writes through a raw handle outside :meth:`Document.transaction` surface a rejection as an
``ExceptionGroup`` from pycrdt (catch with ``except* AccessDenied``); ``transaction()`` unwraps it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import trio
from pycrdt import Array, Doc, Map, Text, TransactionEvent

from lattice.errors import LatticeError, PayloadError
from lattice.identity import KeyPair, PeerId

from .errors import AccessDenied, DocumentFull, StaleHandle
from .log import FsyncPolicy, UpdateLog
from .updates import MAX_DOC_NAME, MAX_UPDATE, NO_PREV, SignedUpdate, sign

log = logging.getLogger(__name__)

MAX_DOC_BYTES = 16 * 1024 * 1024
INLINE_FSYNC_FRAMES = 1  # flush(): up to this many pending updates are fsynced without a thread
_EMPTY_UPDATE = b"\x00\x00"
_COUNTER_SEP = "@"  # base58 peer ids never contain it, so rpartition splits counter keys safely


@dataclass(frozen=True)
class Change:
    """What observers receive after an update is applied and logged (fsynced unless deferred)."""

    doc: str
    author: PeerId
    seq: int
    local: bool


@dataclass
class DocStats:
    applied: int = 0
    duplicates: int = 0
    rejected_signature: int = 0
    rejected_access: int = 0
    rejected_doc: int = 0
    rejected_size: int = 0
    rejected_malformed: int = 0

    @property
    def rejected(self) -> int:
        return (self.rejected_signature + self.rejected_access + self.rejected_doc + self.rejected_size
                + self.rejected_malformed)  # fmt: skip


def log_path(directory: str | os.PathLike[str], name: str) -> Path:
    """The log file of document ``name`` (the name is percent-encoded into one path component)."""
    return Path(directory) / (quote(name, safe="-_") + ".crdtlog")


class Document:
    """One replicated document: maps, arrays, text and counters, durable and access-controlled."""

    def __init__(
        self,
        name: str,
        keypair: KeyPair,
        directory: str | os.PathLike[str],
        writers: set[PeerId] | None = None,
        max_bytes: int = MAX_DOC_BYTES,
        fsync: FsyncPolicy = "always",
    ) -> None:
        if not 0 < len(name) <= MAX_DOC_NAME:
            raise PayloadError(f"document name must have 1 to {MAX_DOC_NAME} characters")
        self.name = name
        self.keypair = keypair
        self.writers = None if writers is None else frozenset(writers)
        self.max_bytes = max_bytes
        self.stats = DocStats()
        self._updates: dict[PeerId, dict[int, SignedUpdate]] = {}
        self._integrated: dict[PeerId, int] = {}  # per author: seqs 1..n are in the Yjs doc
        self._bytes = 0  # sum of accepted update sizes: the document size that max_bytes limits
        self._observers: list[Callable[[Change], None]] = []
        self._applying = False
        self._stale = False
        self._deferred = 0  # > 0: local writes are logged without fsync (see deferred())
        self._flush_lock: trio.Lock | None = None
        Path(directory).mkdir(parents=True, exist_ok=True, mode=0o700)
        self._log = UpdateLog(log_path(directory, name), fsync=fsync)
        self._doc = self._new_doc()
        self._log_frames = 0  # frames in the log file; more than the accepted updates: compact
        self._applying = True
        try:
            for update in self._log.replay():  # the local log is trusted: crc-checked, mode 0600
                self._log_frames += 1
                if self._has(update) or update.doc != name:
                    continue
                self._remember(update)
                self._integrate(update.author)
        finally:
            self._applying = False

    # ---- reading and writing -------------------------------------------------------------------

    def get_map(self, name: str) -> Map:
        return self._current().get(name, type=Map)

    def get_array(self, name: str) -> Array:
        return self._current().get(name, type=Array)

    def get_text(self, name: str) -> Text:
        return self._current().get(name, type=Text)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Doc]:
        """Group local writes into one signed, durable update (written when the block exits)."""
        doc = self._current()
        self._check_access(self.keypair.peer_id)
        try:
            with doc.transaction():
                yield doc
        except ExceptionGroup as group:  # raised by our observer inside pycrdt's commit
            inner = next((e for e in group.exceptions if isinstance(e, LatticeError | OSError)), None)
            if inner is None:
                raise
            raise inner from None
        finally:
            if self._stale:
                self._reload()

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Local writes inside are logged (they survive a SIGKILL) but not yet fsynced: ``await
        flush()`` before acknowledging them. Many writers then share one fsync, and the event loop
        never waits for the disk. Do not hold it across an ``await`` (other tasks' writes would be
        deferred too)."""
        self._deferred += 1
        try:
            yield
        finally:
            self._deferred -= 1

    async def flush(self) -> None:
        """Make everything logged so far durable, per the fsync policy ("batch": only when due).

        The fsync of several updates runs in a worker thread; concurrent callers wait for the same
        one (group commit). A lone update is fsynced inline: handing it to a thread costs more
        (~0.2-0.35 ms here) than the loop waits for its fsync (~0.27 ms)."""
        if self._flush_lock is None:
            self._flush_lock = trio.Lock()
        target = self._log.appended
        async with self._flush_lock:
            if self._log.synced >= target or not self._log.due():
                return
            if self._log.unsynced <= INLINE_FSYNC_FRAMES:
                self._log.sync()
            else:
                await trio.to_thread.run_sync(self._log.sync)

    def unsynced(self) -> int:
        """Logged updates not yet fsynced (they survive a crash of the process, not of the machine)."""
        return self._log.unsynced

    def increment(self, map_name: str, key: str, delta: int = 1) -> int:
        """Add ``delta`` to counter ``key`` in map ``map_name``; returns the new total.

        Yjs has no counter type, and concurrent ``m[k] = m[k] + 1`` loses increments (last writer
        wins). Each author therefore owns one entry ``"<key>@<peer id>"`` that only it writes, and the
        counter is the sum of all authors' entries. Values are JS numbers: exact up to 2**53.
        """
        entry = f"{key}{_COUNTER_SEP}{self.keypair.peer_id}"
        with self.transaction():
            m = self.get_map(map_name)
            m[entry] = int(m.get(entry, 0)) + int(delta)
        return self.counter(map_name, key)

    def counter(self, map_name: str, key: str) -> int:
        m = self.get_map(map_name)
        return sum(int(v) for k, v in m.items() if k.rpartition(_COUNTER_SEP)[0] == key)

    def observe(self, callback: Callable[[Change], None]) -> Callable[[], None]:
        """Call ``callback`` after every applied update (local or remote); returns an unsubscribe."""
        self._observers.append(callback)
        return lambda: self._observers.remove(callback)

    # ---- replication ---------------------------------------------------------------------------

    def apply_many(self, updates: list[SignedUpdate], sync: bool = True) -> int:
        """:meth:`apply` each update with one fsync for the whole batch (under the "batch" policy:
        only when one is due; ``sync=False``: none, the caller will :meth:`flush`); returns how
        many applied.

        An author's run of consecutive updates linked by their hash chain costs one signature
        verification (of its newest update) instead of one per update."""
        verified = self._chain_verified(updates)
        accepted: list[SignedUpdate] = []
        scratch: list[Doc] = []  # one scratch doc checks the whole batch's Yjs data
        try:
            for update in updates:
                if self._accept(update, id(update) in verified, scratch):
                    accepted.append(update)
        finally:  # logged with one write, then observers hear of them
            self._log.append_many(accepted, sync=sync)
            self._log_frames += len(accepted)
        for update in accepted:
            self._notify(Change(self.name, update.author, update.seq, local=False))
        return len(accepted)

    def _chain_verified(self, updates: list[SignedUpdate]) -> set[int]:
        """ids of updates authenticated by a valid signature further up their author's hash chain.

        In a run of consecutive seqs where each update's ``prev`` is the digest of the one below, the
        newest update's signature commits to every digest below it: one verification covers the run.
        Anything else is left to :meth:`apply`, which verifies it alone."""
        by_author: dict[PeerId, dict[int, SignedUpdate]] = {}
        for update in updates:
            if update.doc == self.name:
                by_author.setdefault(update.author, {})[update.seq] = update
        out: set[int] = set()
        for seqs in by_author.values():
            run: list[SignedUpdate] = []
            for seq in sorted(seqs):
                update = seqs[seq]
                if run and run[-1].seq == seq - 1 and update.prev == run[-1].digest():
                    run.append(update)
                    continue
                out |= self._verify_run(run)
                run = [update]
            out |= self._verify_run(run)
        return out

    @staticmethod
    def _verify_run(run: list[SignedUpdate]) -> set[int]:
        if len(run) < 2 or not run[-1].verify():
            return set()
        return {id(u) for u in run}

    def apply(self, update: SignedUpdate, sync: bool = True) -> bool:
        """Verify, apply and log a remote update; False (counted in ``stats``) if rejected or known."""
        return self.apply_many([update], sync=sync) == 1

    def _accept(self, update: SignedUpdate, verified: bool, scratch: list[Doc]) -> bool:
        """Check one remote update and take it into memory (the caller logs it)."""
        self._current()
        if update.doc != self.name:
            self.stats.rejected_doc += 1
            return False
        if self._has(update):
            self.stats.duplicates += 1
            return False
        if len(update.data) > MAX_UPDATE or self._bytes + len(update.data) > self.max_bytes:
            self.stats.rejected_size += 1
            return False
        if self.writers is not None and update.author not in self.writers:
            self.stats.rejected_access += 1
            return False
        if not verified and not update.verify():
            self.stats.rejected_signature += 1
            return False
        if update.seq == self._integrated.get(update.author, 0) + 1:
            try:  # check the Yjs data before it is logged; scratch doc: a bad update leaves no trace
                if not scratch:
                    scratch.append(Doc())
                scratch[0].apply_update(update.data)
            except Exception:
                scratch.clear()  # its state is suspect now: the next check starts from a fresh one
                self.stats.rejected_malformed += 1
                return False
        self._remember(update)
        self._applying = True
        try:
            self._integrate(update.author)
        finally:
            self._applying = False
        self.stats.applied += 1
        return True

    def version(self) -> dict[str, int]:
        """Per author (base58), the highest seq such that every seq up to it is held."""
        # Yjs receives each author's updates in seq order, so what is integrated is the contiguous run
        return {str(author): self._integrated.get(author, 0) for author in self._updates}

    def missing_for(self, version: dict[str, int]) -> list[SignedUpdate]:
        """Updates a replica at ``version`` may lack (anything above its contiguous seq, per author)."""
        out: list[SignedUpdate] = []
        for author, seqs in self._updates.items():
            have = version.get(str(author), 0)
            out.extend(seqs[s] for s in sorted(seqs) if s > have)
        return out

    def updates(self) -> list[SignedUpdate]:
        return self.missing_for({})

    def get_update(self, author: PeerId, seq: int) -> SignedUpdate | None:
        return self._updates.get(author, {}).get(seq)

    # ---- maintenance ---------------------------------------------------------------------------

    def compact(self) -> None:
        """Rewrite the log with exactly the accepted updates (drops torn tails and duplicates)."""
        updates = self.updates()
        self._log.compact(updates)
        self._log_frames = len(updates)

    def needs_compaction(self, factor: float = 2.0, slack: int = 64) -> bool:
        """Whether the log holds more than ``factor`` times the frames needed (plus ``slack``).

        Every accepted update is appended exactly once (duplicates and rejections never reach the
        log), so surplus frames come from replay leftovers: duplicated or foreign frames (a log
        copied or merged by hand, an older version). Shrinking the history itself would need
        signed snapshots: peers must still be able to fetch and verify every author's update."""
        needed = sum(map(len, self._updates.values()))
        return self._log_frames > factor * needed + slack

    def log_frames(self) -> int:
        return self._log_frames

    def log_dropped_bytes(self) -> int:
        """Bytes of torn or corrupt tail cut from the log when it was opened (0: it was intact)."""
        return self._log.dropped_bytes

    def size(self) -> int:
        """Sum of the accepted updates' sizes, the quantity ``max_bytes`` bounds."""
        return self._bytes

    def log_size(self) -> int:
        return self._log.size()

    def sync(self) -> None:
        self._log.sync()

    def close(self) -> None:
        self._log.close()

    def __enter__(self) -> Document:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Document({self.name!r}, updates={sum(map(len, self._updates.values()))}, bytes={self._bytes})"
        )

    # ---- internals -----------------------------------------------------------------------------

    def _new_doc(self) -> Doc:
        doc: Doc = Doc()
        doc.observe(lambda event: self._on_transaction(doc, event))
        return doc

    def _current(self) -> Doc:
        if self._stale:
            self._reload()
        return self._doc

    def _reload(self) -> None:
        """Rebuild the in-memory doc from the accepted updates (after a rejected local write)."""
        self._doc = self._new_doc()
        self._integrated = {}
        self._stale = False
        self._applying = True
        try:
            for author in list(self._updates):
                self._integrate(author)
        finally:
            self._applying = False

    def _on_transaction(self, doc: Doc, event: TransactionEvent) -> None:
        """pycrdt calls this at every commit: sign and log local transactions before the call returns."""
        if self._applying:
            return
        data = bytes(event.update)
        if data == _EMPTY_UPDATE:
            return
        if doc is not self._doc or self._stale:
            self._stale = True
            raise StaleHandle("this handle predates a rejected write; get the shared type again")
        author = self.keypair.peer_id
        try:
            self._check_access(author)
            if len(data) > MAX_UPDATE:
                raise PayloadError(f"a transaction of {len(data)} bytes is over the {MAX_UPDATE} limit")
            if self._bytes + len(data) > self.max_bytes:
                raise DocumentFull(
                    f"document {self.name!r} is full: this write of {len(data)} bytes would take it over"
                    f" its limit of {self.max_bytes} bytes (it holds {self._bytes})"
                )
            seqs = self._updates.get(author)
            last = max(seqs) if seqs else 0
            prev = seqs[last].digest() if seqs else NO_PREV
            update = sign(self.keypair, self.name, last + 1, data, prev)
            self._log.append(update, sync=not self._deferred)
            self._log_frames += 1
        except BaseException:
            self._stale = True
            raise
        self._remember(update)
        self._integrated[author] = max(self._integrated.get(author, 0), update.seq)
        self._notify(Change(self.name, author, update.seq, local=True))

    def _integrate(self, author: PeerId) -> None:
        """Feed the author's next contiguous updates to Yjs.

        Updates wait here until all earlier seqs of their author arrived: pycrdt/yrs 0.14 loses map
        entries when an overwrite arrives before the value it overwrites (measured), so per-author
        causal order is enforced here rather than trusted to Yjs's pending-update buffer.
        """
        seqs = self._updates.get(author, {})
        n = self._integrated.get(author, 0)
        while n + 1 in seqs:
            try:
                self._doc.apply_update(seqs[n + 1].data)
            except Exception:  # logged earlier by a faulty version or hand-edited: skip, keep going
                log.warning("%s: skipping unusable update %s/%d", self.name, author.short(), n + 1)
            n += 1
        self._integrated[author] = n

    def _check_access(self, author: PeerId) -> None:
        if self.writers is not None and author not in self.writers:
            raise AccessDenied(f"{author} may not write document {self.name!r}")

    def _has(self, update: SignedUpdate) -> bool:
        return update.seq in self._updates.get(update.author, ())

    def _remember(self, update: SignedUpdate) -> None:
        self._updates.setdefault(update.author, {})[update.seq] = update
        self._bytes += len(update.data)

    def _notify(self, change: Change) -> None:
        for callback in list(self._observers):
            try:
                callback(change)
            except Exception:  # an observer's bug must not undo a durable write
                log.exception("CRDT observer failed on %s", self.name)
