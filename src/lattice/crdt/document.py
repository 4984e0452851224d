"""A named, replicated, durable CRDT document (a pycrdt/Yjs ``Doc`` plus a signed update log).

Every local transaction becomes one :class:`SignedUpdate` (the author's next ``seq``), appended to
the log from inside pycrdt's transaction observer, so it is on disk (per the log's fsync policy)
before the write call returns; inside :meth:`Document.deferred` it is written but fsynced only by the
next :meth:`Document.flush` (group commit, off the event loop), which must complete before the
write is acknowledged to anyone. Remote updates are verified, applied, then logged before ``apply``
returns True. Each ``(author, seq)`` is applied at most once, in any order, so two replicas holding the
same set of updates are identical.

Strangers may write an open document, so what they can make it hold is bounded (:class:`DocLimits`):
every update's Yjs data is checked before it is taken, each author has a byte quota (a fair share of
``max_bytes``), and an update that arrives ahead of a sequence gap is *held* in memory, per author and
per document bounded, until the missing seqs arrive: it is not logged, not counted in the size, not
offered to other replicas and not seen by observers before it is applied. Only applied, contiguous
runs reach the log, so a restart cannot bring junk back (a log written by an older version is checked
on open and rewritten without what fails).

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
from typing import TYPE_CHECKING
from urllib.parse import quote

import trio

from lattice._lazy import lazy_module
from lattice.errors import ConfigError, LatticeError, PayloadError
from lattice.identity import KeyPair, PeerId

from .errors import AccessDenied, DocumentFull, StaleHandle
from .log import FsyncPolicy, UpdateLog
from .updates import MAX_DOC_NAME, MAX_UPDATE, NO_PREV, SignedUpdate, sign
from .yjs import check_update

if TYPE_CHECKING:
    import pycrdt
    from pycrdt import Array, Doc, Map, Text, TransactionEvent
else:
    pycrdt = lazy_module("pycrdt")  # loaded with the first document (lattice._lazy)

log = logging.getLogger(__name__)

MAX_DOC_BYTES = 16 * 1024 * 1024
HELD_OVERHEAD = 512  # bytes a held update is charged beyond its Yjs data (object, signature, raw copy)
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


@dataclass(frozen=True)
class DocLimits:
    """What remote writers can make one document hold (defaults: docs/operators.md, "CRDT documents").

    ``author_share``: in a document anyone may write, one author's updates may take at most this share
    of ``max_bytes`` (with a writer list each writer gets ``max_bytes / len(writers)``), so one writer
    cannot fill the document for everyone. Updates ahead of a sequence gap are held until it is
    filled: per author at most ``max_pending`` of them and ``max_pending_bytes``, per document
    ``max_pending_total`` bytes (each held update is charged ``HELD_OVERHEAD`` bytes beyond its data);
    beyond that they are dropped and anti-entropy fetches them again, in order."""

    author_share: float = 0.25
    max_pending: int = 1024
    max_pending_bytes: int = 1 << 20
    max_pending_total: int = 8 << 20

    def __post_init__(self) -> None:
        if not isinstance(self.author_share, int | float) or not 0 < self.author_share <= 1:
            raise ConfigError("author_share must be a number in (0, 1]")
        for name in ("max_pending", "max_pending_bytes", "max_pending_total"):
            value = getattr(self, name)
            if type(value) is not int or value <= 0:
                raise ConfigError(f"CRDT limit {name} must be a positive integer")

    def author_quota(self, max_bytes: int, writers: frozenset[PeerId] | None) -> int:
        """One author's fair share of a document of ``max_bytes``."""
        if writers:
            return max(1, max_bytes // len(writers))
        return max(1, int(max_bytes * self.author_share))


@dataclass
class DocStats:
    applied: int = 0
    duplicates: int = 0
    rejected_signature: int = 0
    rejected_access: int = 0
    rejected_doc: int = 0
    rejected_size: int = 0
    rejected_quota: int = 0  # over the author's share of the document
    rejected_malformed: int = 0  # Yjs data that does not parse (checked also for held updates)
    held: int = 0  # updates taken ahead of a sequence gap (applied once it is filled)
    dropped_pending: int = 0  # ... and refused because the held ones were at their limit

    @property
    def rejected(self) -> int:
        return (self.rejected_signature + self.rejected_access + self.rejected_doc + self.rejected_size
                + self.rejected_quota + self.rejected_malformed)  # fmt: skip

    @property
    def invalid(self) -> int:
        """Rejections an honest peer never causes (it checks the same before it forwards anything)."""
        return self.rejected_signature + self.rejected_doc + self.rejected_malformed


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
        max_author_bytes: int | None = None,
        limits: DocLimits | None = None,
    ) -> None:
        if not 0 < len(name) <= MAX_DOC_NAME:
            raise PayloadError(f"document name must have 1 to {MAX_DOC_NAME} characters")
        self.name = name
        self.keypair = keypair
        self.writers = None if writers is None else frozenset(writers)
        self.max_bytes = max_bytes
        self.limits = limits or DocLimits()
        if max_author_bytes is None:  # one author's share of the document
            max_author_bytes = self.limits.author_quota(max_bytes, self.writers)
        self.max_author_bytes = max_author_bytes
        self.stats = DocStats()
        self._updates: dict[PeerId, dict[int, SignedUpdate]] = {}  # applied: per author seqs 1..n
        self._integrated: dict[PeerId, int] = {}  # per author: seqs 1..n are in the Yjs doc
        self._bytes = 0  # sum of accepted update sizes: the document size that max_bytes limits
        self._author_bytes: dict[PeerId, int] = {}  # ... per author (max_author_bytes)
        self._held: dict[PeerId, dict[int, SignedUpdate]] = {}  # ahead of a gap: memory only
        self._held_data: dict[PeerId, int] = {}  # per author: Yjs bytes of the held updates
        self._held_bytes = 0  # their cost (see _held_cost), bounded by limits.max_pending_total
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
            unusable = self._replay()
        finally:
            self._applying = False
        if unusable:  # junk or held updates logged by an older version: never read them again
            log.warning("%s: %d logged updates were unusable or ahead of a gap; rewriting the log",
                        name, unusable)  # fmt: skip
            self.compact()

    # ---- reading and writing -------------------------------------------------------------------

    def get_map(self, name: str) -> Map:
        return self._current().get(name, type=pycrdt.Map)

    def get_array(self, name: str) -> Array:
        return self._current().get(name, type=pycrdt.Array)

    def get_text(self, name: str) -> Text:
        return self._current().get(name, type=pycrdt.Text)

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
        many were applied (held updates count when the update that unblocks them arrives).

        An author's run of consecutive updates linked by their hash chain costs one signature
        verification (of its newest update) instead of one per update."""
        verified = self._chain_verified(updates)
        accepted: list[SignedUpdate] = []
        scratch: list[Doc] = []  # one scratch doc checks the whole batch's Yjs data
        try:
            for update in updates:
                accepted.extend(self._accept(update, id(update) in verified, scratch))
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
        """Verify, apply and log a remote update; True if taken (applied, or held until the seqs
        before it arrive), False (counted in ``stats``) if rejected, known or dropped."""
        held = self.stats.held
        return self.apply_many([update], sync=sync) > 0 or self.stats.held > held

    def _accept(self, update: SignedUpdate, verified: bool, scratch: list[Doc]) -> list[SignedUpdate]:
        """Check one remote update; returns what it lets into the Yjs doc (the caller logs them): itself
        and the held updates it unblocks, or nothing (refused, or held back by a gap)."""
        self._current()
        refusal = self._refusal(update)
        if refusal is None and not verified and not update.verify():
            refusal = "rejected_signature"
        if refusal is None and not yjs_parses(update.data, scratch):  # gap or not: before it is kept
            refusal = "rejected_malformed"
        if refusal is not None:
            setattr(self.stats, refusal, getattr(self.stats, refusal) + 1)
            return []
        if self._is_gap(update):
            self._hold(update)
            return []
        return self._take(update)

    def _refusal(self, update: SignedUpdate) -> str | None:
        """The ``DocStats`` counter of the first cheap check ``update`` fails (signature and Yjs data
        are checked after these), or None."""
        if update.doc != self.name:
            return "rejected_doc"
        if self._has(update):
            return "duplicates"
        if len(update.data) > MAX_UPDATE:
            return "rejected_size"
        if self.writers is not None and update.author not in self.writers:
            return "rejected_access"
        if not self._is_gap(update):
            return self._room_refusal(update.author, len(update.data))
        count = len(self._held.get(update.author, ()))
        held_data = self._held_data.get(update.author, 0)
        refusal = self._room_refusal(update.author, len(update.data) + held_data)  # counts once applied
        if refusal is not None:
            return refusal
        cost = _held_cost(update)
        held_cost = held_data + count * HELD_OVERHEAD
        if count >= self.limits.max_pending or held_cost + cost > self.limits.max_pending_bytes:
            return "dropped_pending"
        if self._held_bytes + cost > self.limits.max_pending_total:
            return "dropped_pending"
        return None

    def _room_refusal(self, author: PeerId, size: int) -> str | None:
        """Whether ``size`` more bytes of ``author`` fit the document and the author's share."""
        if self._bytes + size > self.max_bytes:
            return "rejected_size"
        if self._author_bytes.get(author, 0) + size > self.max_author_bytes:
            return "rejected_quota"
        return None

    def _is_gap(self, update: SignedUpdate) -> bool:
        return update.seq > self._integrated.get(update.author, 0) + 1

    def _hold(self, update: SignedUpdate) -> None:
        self._held.setdefault(update.author, {})[update.seq] = update
        self._held_data[update.author] = self._held_data.get(update.author, 0) + len(update.data)
        self._held_bytes += _held_cost(update)
        self.stats.held += 1

    def _unhold(self, author: PeerId, seq: int) -> SignedUpdate | None:
        """Remove and return the held update ``seq`` of ``author`` (None if there is none)."""
        held = self._held.get(author)
        update = held.pop(seq, None) if held else None
        if update is not None:
            self._held_bytes -= _held_cost(update)
            self._held_data[author] -= len(update.data)
        if held is not None and not held:
            del self._held[author]
            del self._held_data[author]
        return update

    def _take(self, update: SignedUpdate) -> list[SignedUpdate]:
        """Apply a contiguous update and the held run behind it (each re-checked for room)."""
        author = update.author
        taken: list[SignedUpdate] = []
        next_update: SignedUpdate | None = update
        while next_update is not None:
            self._remember(next_update)
            taken.append(next_update)
            next_update = self._unhold(author, next_update.seq + 1)
            refusal = None if next_update is None else self._room_refusal(author, len(next_update.data))
            if refusal is not None:  # room went to other writes meanwhile: anti-entropy retries it
                setattr(self.stats, refusal, getattr(self.stats, refusal) + 1)
                next_update = None
        self._applying = True
        try:
            self._integrate(author)
        finally:
            self._applying = False
        self.stats.applied += len(taken)
        return taken

    def pending_count(self) -> int:
        """Updates held ahead of a sequence gap (in memory only)."""
        return sum(map(len, self._held.values()))

    def pending_bytes(self) -> int:
        """What the held updates are charged against ``limits.max_pending_total``."""
        return self._held_bytes

    def version(self) -> dict[str, int]:
        """Per author (base58), the highest seq such that every seq up to it is held."""
        # Yjs receives each author's updates in seq order, so what is integrated is the contiguous run
        return {str(author): self._integrated.get(author, 0) for author in self._updates}

    def missing_for(self, version: dict[str, int]) -> list[SignedUpdate]:
        """Updates a replica at ``version`` may lack (anything above its contiguous seq, per author;
        applied updates only: held ones are not passed on before they are applied here)."""
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
        doc: Doc = pycrdt.Doc()
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
            mine = self._author_bytes.get(author, 0)
            if mine + len(data) > self.max_author_bytes:
                raise DocumentFull(
                    f"document {self.name!r} is full for this writer: this write of {len(data)} bytes would"
                    f" take it over its per-author limit of {self.max_author_bytes} bytes (it wrote {mine})"
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

    def _replay(self) -> int:
        """Restore the applied updates from the log; returns how many of this document's frames were
        not restored (their Yjs data fails, or they lie beyond a gap: held, within the limits).

        Signatures are not checked again (the log is ours: crc-checked, mode 0600), the Yjs data is:
        an older version logged updates beyond a gap without checking them."""
        by_author: dict[PeerId, dict[int, SignedUpdate]] = {}
        for update in self._log.replay():
            self._log_frames += 1
            if update.doc == self.name:
                by_author.setdefault(update.author, {}).setdefault(update.seq, update)
        unusable = 0
        scratch: list[Doc] = []
        for author, seqs in by_author.items():
            for seq in sorted(seqs):
                update = seqs[seq]
                if not self._is_gap(update) and _applies(self._doc, update.data):
                    self._remember(update)
                    self._integrated[author] = seq
                    continue
                unusable += 1
                holdable = self._is_gap(update) and self._refusal(update) is None
                if holdable and yjs_parses(update.data, scratch):
                    self._hold(update)
        return unusable

    def _integrate(self, author: PeerId) -> None:
        """Feed the author's next contiguous updates to Yjs.

        Updates reach Yjs in their author's seq order (later ones are held until the gap is filled):
        pycrdt/yrs 0.14 loses map entries when an overwrite arrives before the value it overwrites
        (measured), so per-author causal order is enforced here rather than trusted to Yjs's
        pending-update buffer.
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
        self._author_bytes[update.author] = self._author_bytes.get(update.author, 0) + len(update.data)
        self._unhold(update.author, update.seq)  # a held copy of a seq now applied (a local write)

    def _notify(self, change: Change) -> None:
        for callback in list(self._observers):
            try:
                callback(change)
            except Exception:  # an observer's bug must not undo a durable write
                log.exception("CRDT observer failed on %s", self.name)


def yjs_parses(data: bytes, scratch: list[Doc]) -> bool:
    """Whether ``data`` is a usable Yjs update, tried on a scratch doc (shared by a batch; after a
    failure its state is suspect, so the next check starts from a fresh one)."""
    if not scratch:
        scratch.append(pycrdt.Doc())
    if _applies(scratch[0], data):
        return True
    scratch.clear()
    return False


def _applies(doc: Doc, data: bytes) -> bool:
    """Apply ``data`` to ``doc`` if it is within the bounds yrs needs (see lattice.crdt.yjs)."""
    try:
        check_update(data)  # first: yrs trusts declared sizes and nesting (a 80 KB update crashed it)
        doc.apply_update(data)
    except Exception:  # PayloadError, or the plain exceptions pycrdt raises for data it refuses
        return False
    return True


def _held_cost(update: SignedUpdate) -> int:
    return len(update.data) + HELD_OVERHEAD
