"""Records and provider entries a node holds, in memory and (optionally) in sqlite.

Records are written to sqlite (WAL, synchronous=NORMAL) either at once or, with ``defer=True``,
behind: the DHT service acknowledges a replica from memory and commits the pending ones in one
transaction every ``WRITE_BEHIND`` seconds (one commit per batch instead of one per request, the
largest per-replica cost after the signature check). So a crash of the process loses at most the
records acknowledged in the last ``WRITE_BEHIND`` seconds (a stop loses nothing; a power loss may
lose the last moments too); replicas are soft state that their publishers republish. A failed
commit keeps the records pending (retried, counted in ``write_errors``), never silently dropped.
A restarted node loads what is unexpired. Every size is bounded: total records, providers per key.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import msgpack

from lattice.dht.records import Record, RecordError, may_replace, validate
from lattice.identity import PeerId

MAX_RECORDS = 200_000
WRITE_BEHIND = 0.1  # seconds: the longest a deferred record waits for its commit
MAX_PROVIDERS_PER_KEY = 64
PROVIDER_TTL = 24 * 3600.0


class Store:
    def __init__(self, path: Path | None = None) -> None:
        self.records: dict[bytes, dict[bytes, Record]] = {}  # key -> subkey -> record
        self.providers: dict[
            bytes, dict[PeerId, tuple[list[bytes], float]]
        ] = {}  # key -> peer -> (addrs, exp)
        self._db: sqlite3.Connection | None = None
        self._pending: dict[tuple[bytes, bytes], tuple] = {}  # slot -> row (a newer version replaces)
        self.write_errors = 0
        self._count = 0  # records held (kept up to date: put is on the hot path)
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
        assert self._db is not None
        now = time.time()
        for (blob,) in self._db.execute("SELECT blob FROM records WHERE expires > ?", (now,)):
            try:
                record = Record.decode(blob)
                validate(record, now)
            except RecordError:
                continue
            slots = self.records.setdefault(record.key, {})
            self._count += record.subkey not in slots
            slots[record.subkey] = record
        for key, peer, addrs, expires in self._db.execute(
            "SELECT key, peer, addrs, expires FROM providers WHERE expires > ?", (now,)
        ):
            self.providers.setdefault(key, {})[PeerId(peer)] = (msgpack.unpackb(addrs), expires)
        self._db.execute("DELETE FROM records WHERE expires <= ?", (now,))
        self._db.execute("DELETE FROM providers WHERE expires <= ?", (now,))

    @property
    def record_count(self) -> int:
        return self._count

    def put(self, record: Record, now: float | None = None, defer: bool = False) -> bool:
        """Validate and store; False if the slot holds a record this one may not replace."""
        now = time.time() if now is None else now
        validate(record, now)
        slots = self.records.setdefault(record.key, {})
        if not may_replace(slots.get(record.subkey), record, now):
            return False
        if record.subkey not in slots:
            if self._count >= MAX_RECORDS:
                self.expire(now)
                if self._count >= MAX_RECORDS:
                    raise RecordError("this node's record store is full")
            self._count += 1
        slots[record.subkey] = record
        if self._db is not None:
            row = (record.key, record.subkey, record.encode(), record.expires_at)
            self._pending[(record.key, record.subkey)] = row
            if not defer:
                self.flush()
        return True

    @property
    def pending(self) -> int:
        """Records acknowledged but not yet committed to disk."""
        return len(self._pending)

    def flush(self) -> None:
        """Commit the pending records in one transaction; on failure they stay pending (retried)."""
        if self._db is None or not self._pending:
            return
        rows = list(self._pending.values())
        try:
            self._db.execute("BEGIN")
            try:
                self._db.executemany("INSERT OR REPLACE INTO records VALUES (?, ?, ?, ?)", rows)
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

    def add_provider(self, key: bytes, peer: PeerId, addrs: list[bytes], now: float | None = None) -> None:
        now = time.time() if now is None else now
        entries = self.providers.setdefault(key, {})
        if peer not in entries and len(entries) >= MAX_PROVIDERS_PER_KEY:
            oldest = min(entries, key=lambda p: entries[p][1])
            del entries[oldest]
        entries[peer] = (addrs[:8], now + PROVIDER_TTL)
        if self._db is not None:
            self._db.execute(
                "INSERT OR REPLACE INTO providers VALUES (?, ?, ?, ?)",
                (key, peer.multihash, msgpack.packb(addrs[:8]), now + PROVIDER_TTL),
            )

    def get_providers(self, key: bytes, now: float | None = None) -> list[tuple[PeerId, list[bytes]]]:
        now = time.time() if now is None else now
        return [(p, a) for p, (a, exp) in self.providers.get(key, {}).items() if exp > now]

    def expire(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        for key in list(self.records):
            slots = self.records[key]
            for sub in [s for s, r in slots.items() if r.expires_at <= now]:
                del slots[sub]
                self._count -= 1
            if not slots:
                del self.records[key]
        for key in list(self.providers):
            entries = self.providers[key]
            for peer in [p for p, (_, exp) in entries.items() if exp <= now]:
                del entries[peer]
            if not entries:
                del self.providers[key]
        if self._db is not None:
            self._db.execute("DELETE FROM records WHERE expires <= ?", (now,))
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
