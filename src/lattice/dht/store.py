"""Records and provider entries a node holds, in memory and (optionally) in sqlite.

Records are written to sqlite (WAL, synchronous=NORMAL) either at once or, with ``defer=True``,
behind: the DHT service acknowledges a replica from memory and commits the pending ones in one
transaction every ``WRITE_BEHIND`` seconds (one commit per batch instead of one per request, the
largest per-replica cost after the signature check). So a crash of the process loses at most the
records acknowledged in the last ``WRITE_BEHIND`` seconds (a stop loses nothing; a power loss may
lose the last moments too); replicas are soft state that their publishers republish. A failed
commit keeps the records pending (retried, counted in ``write_errors``), never silently dropped.
A restarted node loads what is unexpired (and within its quotas).

Everything a stranger can make us store is bounded before it is stored (``StoreLimits``): record
bytes for the whole store, per publisher (the record's signer) and per IP prefix of the peer that
sent the PUT; provider entries per key, per IP prefix on one key, per peer, per prefix and in all.
A full store makes room fairly: it evicts a record of the publisher holding the most bytes, and only
for a publisher that would still hold less, so sybils crowd out each other, not small honest writers.
"""

from __future__ import annotations

import heapq
import itertools
import sqlite3
import time
from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Generic, TypeVar

import msgpack

from lattice.dht.records import Record, RecordError, may_replace, validate
from lattice.errors import ConfigError, LatticeError
from lattice.identity import PeerId

__all__ = ["QuotaExceeded", "Store", "StoreLimits", "record_size"]

MiB = 1 << 20
WRITE_BEHIND = 0.1  # seconds: the longest a deferred record waits for its commit
PROVIDER_TTL = 24 * 3600.0
RECORD_OVERHEAD = 512  # bytes a record costs beyond key, subkey and value (signed envelope, objects)
EXPIRE_EVERY = 1.0  # seconds: a full store scans for expired entries at most this often
G = TypeVar("G", bound=Hashable)


@dataclass(frozen=True)
class StoreLimits:
    """What the DHT store of one node may hold (the ``dht_*`` fields of NodeConfig set the bytes)."""

    max_bytes: int = 256 * MiB  # record bytes, whole store (RAM and about as much on disk)
    max_bytes_per_publisher: int = 4 * MiB  # one signer's records: 64 records of 64 KiB
    max_bytes_per_prefix: int = 16 * MiB  # records PUT by peers of one /24 (IPv4) or /48 (IPv6)
    max_records: int = 200_000
    max_providers: int = 100_000  # provider entries, all keys
    max_providers_per_key: int = 64
    max_providers_per_prefix_per_key: int = 4  # sybils of one prefix cannot own a key
    max_provider_keys_per_peer: int = 1024
    max_providers_per_prefix: int = 4096

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"DHT store limit {f.name} must be a positive integer")


class QuotaExceeded(RecordError):
    """A record or provider entry is refused: a quota of this node's DHT store is used up."""

    def __init__(self, scope: str, message: str) -> None:
        super().__init__(message)
        self.scope = scope  # store | publisher | prefix | providers | provider_key | provider_peer | ...


def record_size(record: Record) -> int:
    """Bytes a record is charged: key, subkey, value and a fixed overhead."""
    return len(record.key) + len(record.subkey) + len(record.value) + RECORD_OVERHEAD


def over_quota(used: int, delta: int, quota: int) -> bool:
    """A put that adds ``delta`` to ``used`` breaks ``quota``; one that does not grow never does
    (a newer, smaller version of a record is always accepted)."""
    return delta > 0 and used + delta > quota


class Usage(Generic[G]):
    """Amounts held per group (bytes per publisher), with the largest group at hand: a max-heap
    updated lazily (stale entries are skipped, the heap is rebuilt when it holds too many)."""

    def __init__(self) -> None:
        self.of: dict[G, int] = {}
        self._heap: list[tuple[int, int, G]] = []
        self._seq = itertools.count()

    def get(self, group: G) -> int:
        return self.of.get(group, 0)

    def add(self, group: G, delta: int) -> None:
        value = self.of.get(group, 0) + delta
        if value > 0:
            self.of[group] = value
            heapq.heappush(self._heap, (-value, next(self._seq), group))
        else:
            self.of.pop(group, None)
        if len(self._heap) > 4 * len(self.of) + 64:
            self._heap = [(-v, next(self._seq), g) for g, v in self.of.items()]
            heapq.heapify(self._heap)

    def largest(self) -> tuple[G, int] | None:
        while self._heap:
            neg, _, group = self._heap[0]
            if self.of.get(group) == -neg:
                return group, -neg
            heapq.heappop(self._heap)
        return None


def provider_to_evict(entries: dict[PeerId, tuple], group: Hashable) -> PeerId | None:
    """The entry a full key gives up for a newcomer of ``group``: the soonest-expiring entry of the
    group listed most often, if that group is listed more often than the newcomer's; else None."""
    counts = Counter(_group(p, e[2]) for p, e in entries.items())
    most = max(counts.values(), default=0)
    if most <= counts.get(group, 0):
        return None
    crowd = [p for p, e in entries.items() if counts[_group(p, e[2])] == most]
    return min(crowd, key=lambda p: entries[p][1])


def _group(peer: PeerId, prefix: str | None) -> Hashable:
    """Providers are grouped by IP prefix; a peer on an exempt address is a group of its own."""
    return prefix if prefix is not None else peer


class Store:
    def __init__(self, path: Path | None = None, limits: StoreLimits | None = None) -> None:
        self.limits = limits or StoreLimits()
        self.records: dict[bytes, dict[bytes, Record]] = {}  # key -> subkey -> record
        # key -> peer -> (addrs, expires, IP prefix of the announcing peer or None)
        self.providers: dict[bytes, dict[PeerId, tuple[list[bytes], float, str | None]]] = {}
        self._db: sqlite3.Connection | None = None
        # slot -> row to write, or None: delete it (evicted or expired); a newer version replaces
        self._pending: dict[tuple[bytes, bytes], tuple | None] = {}
        self.write_errors = 0
        self._count = 0  # records held (kept up to date: put is on the hot path)
        self.stored_bytes = 0
        self.evicted = 0  # records given up for a smaller publisher (the store was full)
        self._publishers: Usage[bytes] = Usage()  # record bytes per publisher key
        self._prefixes: Counter[str] = Counter()  # record bytes per sender IP prefix
        self._by_publisher: dict[bytes, dict[tuple[bytes, bytes], None]] = {}  # oldest first
        self._origin: dict[tuple[bytes, bytes], str] = {}  # slot -> sender prefix (non-exempt only)
        self._provider_count = 0
        self._provider_keys: Counter[PeerId] = Counter()
        self._provider_prefixes: Counter[str] = Counter()
        self._last_expire = float("-inf")
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS records (key BLOB, subkey BLOB, blob BLOB, expires REAL,"
                " PRIMARY KEY (key, subkey))"
            )
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS providers (key BLOB, peer BLOB, addrs BLOB, expires REAL,"
                " PRIMARY KEY (key, peer))"
            )
            self._db.execute("CREATE TABLE IF NOT EXISTS routing (peer BLOB PRIMARY KEY, addrs BLOB)")
            self._load()

    def _load(self) -> None:
        """Records that are still valid (signature, subkey rule) and fit the quotas; the rest is
        deleted. Sender prefixes are not kept on disk: loaded records count for store and publisher."""
        assert self._db is not None
        now = time.time()
        dropped = []
        for key, subkey, blob in self._db.execute(
            "SELECT key, subkey, blob FROM records WHERE expires > ?", (now,)
        ):
            try:
                record = Record.decode(blob)
                validate(record, now)
                if (record.key, record.subkey) != (key, subkey):
                    raise RecordError("record stored under another slot")
                self._admit(record, None, None, now, evict=False)
            except RecordError:
                dropped.append((key, subkey))
                continue
            self._hold(record, None)
        self._db.executemany("DELETE FROM records WHERE key = ? AND subkey = ?", dropped)
        for key, peer, addrs, expires in self._db.execute(
            "SELECT key, peer, addrs, expires FROM providers WHERE expires > ?", (now,)
        ):
            try:
                self.add_provider(key, PeerId(peer), msgpack.unpackb(addrs), now, expires=expires, save=False)
            except (LatticeError, ValueError, TypeError):
                continue
        self._db.execute("DELETE FROM records WHERE expires <= ?", (now,))
        self._db.execute("DELETE FROM providers WHERE expires <= ?", (now,))

    @property
    def record_count(self) -> int:
        return self._count

    @property
    def provider_count(self) -> int:
        return self._provider_count

    def publisher_bytes(self, publisher: bytes) -> int:
        """Record bytes held for one publisher (raw public key)."""
        return self._publishers.get(publisher)

    def prefix_bytes(self, prefix: str) -> int:
        """Record bytes held that peers of one IP prefix sent."""
        return self._prefixes.get(prefix, 0)

    def put(
        self, record: Record, now: float | None = None, defer: bool = False, prefix: str | None = None
    ) -> bool:
        """Validate and store; False if the slot holds a record this one may not replace. ``prefix``:
        IP prefix of the peer that sent it (None: this node, or an exempt address). Raises
        QuotaExceeded (nothing stored) if the record does not fit."""
        now = time.time() if now is None else now
        validate(record, now)
        old = self.records.get(record.key, {}).get(record.subkey)
        if not may_replace(old, record, now):
            return False
        self._admit(record, old, prefix, now)
        self._hold(record, prefix)
        if self._db is not None:
            row = (record.key, record.subkey, record.encode(), record.expires_at)
            self._pending[(record.key, record.subkey)] = row
            if not defer:
                self.flush()
        return True

    def check(self, record: Record, prefix: str | None = None) -> None:
        """Raise QuotaExceeded if the publisher or prefix quota would refuse ``record`` (a dry run:
        the store itself may still make room by eviction)."""
        old = self.records.get(record.key, {}).get(record.subkey)
        self._check_writers(record, old, prefix)

    def _check_writers(self, record: Record, old: Record | None, prefix: str | None) -> None:
        size = record_size(record)
        lim = self.limits
        mine = old is not None and old.publisher == record.publisher
        delta = size - (record_size(old) if old is not None and mine else 0)
        if over_quota(self._publishers.get(record.publisher), delta, lim.max_bytes_per_publisher):
            quota = lim.max_bytes_per_publisher
            raise QuotaExceeded("publisher", f"the publisher's quota of {quota} bytes here is used up")
        if prefix is not None:
            same = old is not None and self._origin.get((old.key, old.subkey)) == prefix
            delta = size - (record_size(old) if old is not None and same else 0)
            if over_quota(self._prefixes.get(prefix, 0), delta, lim.max_bytes_per_prefix):
                quota = lim.max_bytes_per_prefix
                raise QuotaExceeded("prefix", f"the quota of {quota} bytes for peers of {prefix} is used up")

    def _admit(
        self, record: Record, old: Record | None, prefix: str | None, now: float, evict: bool = True
    ) -> None:
        """Raise QuotaExceeded unless ``record`` fits (replacing ``old``); a full store first drops
        expired records, then evicts records of publishers that hold more than this one would.
        ``evict=False`` (loading from disk): neither, a record that does not fit is refused."""
        self._check_writers(record, old, prefix)
        lim = self.limits
        slot = (record.key, record.subkey)
        size = record_size(record)
        expired = not evict
        while True:
            freed = record_size(old) if old is not None else 0
            fits_bytes = self.stored_bytes - freed + size <= lim.max_bytes
            if fits_bytes and self._count + (old is None) <= lim.max_records:
                return
            if not expired and now - self._last_expire >= EXPIRE_EVERY:
                expired = True
                self.expire(now)
                old = self.records.get(record.key, {}).get(record.subkey)
                continue
            after = self._publishers.get(record.publisher) + size
            if old is not None and old.publisher == record.publisher:
                after -= freed
            top = self._publishers.largest() if evict else None
            if top is None or top[1] <= after:
                raise QuotaExceeded("store", "this node's record store is full")
            self._evict_one(top[0], skip=slot)

    def _evict_one(self, publisher: bytes, skip: tuple[bytes, bytes]) -> None:
        slots = self._by_publisher[publisher]
        slot = next((s for s in slots if s != skip), None)
        if slot is None:  # only the slot being replaced: count it as the publisher's whole usage
            raise QuotaExceeded("store", "this node's record store is full")
        self._drop(slot)
        self.evicted += 1
        if self._db is not None:
            self._pending[slot] = None

    def _hold(self, record: Record, prefix: str | None) -> None:
        """Keep ``record`` in memory and charge it (its slot's old version is released first)."""
        slot = (record.key, record.subkey)
        if record.subkey in self.records.get(record.key, {}):
            self._drop(slot)
        size = record_size(record)
        self.records.setdefault(record.key, {})[record.subkey] = record
        self._count += 1
        self.stored_bytes += size
        self._publishers.add(record.publisher, size)
        self._by_publisher.setdefault(record.publisher, {})[slot] = None
        if prefix is not None:
            self._origin[slot] = prefix
            self._prefixes[prefix] += size

    def _drop(self, slot: tuple[bytes, bytes]) -> None:
        """Forget the record in ``slot`` (memory only) and release what it was charged."""
        key, subkey = slot
        slots = self.records[key]
        record = slots.pop(subkey)
        if not slots:
            del self.records[key]
        size = record_size(record)
        self._count -= 1
        self.stored_bytes -= size
        self._publishers.add(record.publisher, -size)
        mine = self._by_publisher[record.publisher]
        del mine[slot]
        if not mine:
            del self._by_publisher[record.publisher]
        prefix = self._origin.pop(slot, None)
        if prefix is not None:
            self._prefixes[prefix] -= size
            if self._prefixes[prefix] <= 0:
                del self._prefixes[prefix]

    @property
    def pending(self) -> int:
        """Records acknowledged (or evicted, expired) but not yet committed to disk."""
        return len(self._pending)

    def flush(self) -> None:
        """Commit the pending records in one transaction; on failure they stay pending (retried)."""
        if self._db is None or not self._pending:
            return
        rows = [row for row in self._pending.values() if row is not None]
        gone = [slot for slot, row in self._pending.items() if row is None]
        try:
            self._db.execute("BEGIN")
            try:
                self._db.executemany("INSERT OR REPLACE INTO records VALUES (?, ?, ?, ?)", rows)
                self._db.executemany("DELETE FROM records WHERE key = ? AND subkey = ?", gone)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        except sqlite3.Error:
            self.write_errors += 1
            raise
        self._pending.clear()

    def get(self, key: bytes, now: float | None = None) -> list[Record]:
        now = time.time() if now is None else now
        return [r for r in self.records.get(key, {}).values() if r.expires_at > now]

    def add_provider(
        self,
        key: bytes,
        peer: PeerId,
        addrs: list[bytes],
        now: float | None = None,
        prefix: str | None = None,
        *,
        expires: float | None = None,
        save: bool = True,
    ) -> None:
        """Record that ``peer`` (announcing from IP ``prefix``; None: exempt or this node) provides
        ``key``; raises QuotaExceeded if a provider quota refuses a new entry."""
        now = time.time() if now is None else now
        expires = now + PROVIDER_TTL if expires is None else expires
        entries = self.providers.get(key, {})
        old = entries.get(peer)
        if old is None:
            self._admit_provider(key, entries, peer, prefix, now)
            entries = self.providers.setdefault(key, {})
            self._provider_count += 1
            self._provider_keys[peer] += 1
        elif old[2] is not None:
            self._forget_prefix(old[2])
        if prefix is not None:
            self._provider_prefixes[prefix] += 1
        entries[peer] = (addrs[:8], expires, prefix)
        if self._db is not None and save:
            self._db.execute(
                "INSERT OR REPLACE INTO providers VALUES (?, ?, ?, ?)",
                (key, peer.multihash, msgpack.packb(addrs[:8]), expires),
            )

    def _admit_provider(
        self, key: bytes, entries: dict, peer: PeerId, prefix: str | None, now: float
    ) -> None:
        lim = self.limits
        if self._provider_count >= lim.max_providers and now - self._last_expire >= EXPIRE_EVERY:
            self.expire(now)
        if self._provider_count >= lim.max_providers:
            raise QuotaExceeded("providers", "this node's provider store is full")
        if self._provider_keys[peer] >= lim.max_provider_keys_per_peer:
            quota = lim.max_provider_keys_per_peer
            raise QuotaExceeded("provider_peer", f"a peer may provide at most {quota} keys here")
        if prefix is not None:
            if self._provider_prefixes[prefix] >= lim.max_providers_per_prefix:
                raise QuotaExceeded("provider_prefix", f"the provider quota for peers of {prefix} is used up")
            on_key = sum(1 for e in entries.values() if e[2] == prefix)
            if on_key >= lim.max_providers_per_prefix_per_key:
                quota = lim.max_providers_per_prefix_per_key
                raise QuotaExceeded("provider_prefix_key", f"{quota} peers of {prefix} provide this key")
        if len(entries) >= lim.max_providers_per_key:
            victim = provider_to_evict(entries, _group(peer, prefix))
            if victim is None:
                raise QuotaExceeded("provider_key", "this key has as many providers as it may list")
            self._remove_provider(key, victim)

    def remove_provider(self, key: bytes, peer: PeerId) -> bool:
        """Forget that ``peer`` provides ``key`` (False if it was not listed)."""
        if peer not in self.providers.get(key, {}):
            return False
        self._remove_provider(key, peer)
        return True

    def _remove_provider(self, key: bytes, peer: PeerId, on_disk: bool = True) -> None:
        entries = self.providers[key]
        _, _, prefix = entries.pop(peer)
        if not entries:
            del self.providers[key]
        self._provider_count -= 1
        self._provider_keys[peer] -= 1
        if self._provider_keys[peer] <= 0:
            del self._provider_keys[peer]
        if prefix is not None:
            self._forget_prefix(prefix)
        if self._db is not None and on_disk:
            self._db.execute("DELETE FROM providers WHERE key = ? AND peer = ?", (key, peer.multihash))

    def _forget_prefix(self, prefix: str) -> None:
        self._provider_prefixes[prefix] -= 1
        if self._provider_prefixes[prefix] <= 0:
            del self._provider_prefixes[prefix]

    def get_providers(self, key: bytes, now: float | None = None) -> list[tuple[PeerId, list[bytes]]]:
        now = time.time() if now is None else now
        return [(p, a) for p, (a, exp, _) in self.providers.get(key, {}).items() if exp > now]

    def expire(self, now: float | None = None) -> None:
        """Forget expired records and providers. Records leave the disk with the next ``flush`` (by
        primary key: a scan of the records table would read every blob)."""
        now = time.time() if now is None else now
        self._last_expire = now
        for key in list(self.records):
            for sub in [s for s, r in self.records[key].items() if r.expires_at <= now]:
                self._drop((key, sub))
                if self._db is not None:
                    self._pending[(key, sub)] = None
        for key in list(self.providers):
            for peer in [p for p, e in self.providers[key].items() if e[1] <= now]:
                self._remove_provider(key, peer, on_disk=False)
        if self._db is not None:
            self._db.execute("DELETE FROM providers WHERE expires <= ?", (now,))

    def save_routing(self, contacts: list[tuple[PeerId, list[bytes]]]) -> None:
        if self._db is None:
            return
        self._db.execute("DELETE FROM routing")
        self._db.executemany(
            "INSERT INTO routing VALUES (?, ?)", [(p.multihash, msgpack.packb(a)) for p, a in contacts]
        )

    def load_routing(self) -> list[tuple[PeerId, list[bytes]]]:
        if self._db is None:
            return []
        out = []
        for peer, addrs in self._db.execute("SELECT peer, addrs FROM routing"):
            try:
                out.append((PeerId(peer), msgpack.unpackb(addrs)))
            except Exception:
                continue
        return out

    def close(self) -> None:
        self.flush()
        if self._db is not None:
            self._db.close()
            self._db = None
