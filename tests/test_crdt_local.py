"""The CRDT store's local layer: convergence, trust checks, durability (restart, torn tail, SIGKILL)."""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lattice.crdt import AccessDenied, Document, SignedUpdate, UpdateLog, log_path, sign
from lattice.crdt.updates import MAX_UPDATE
from lattice.errors import PayloadError
from lattice.identity import KeyPair

NAME = "swarm/config"
SRC = str(Path(__file__).resolve().parents[1] / "src")


def keys(n: int) -> list[KeyPair]:
    return [KeyPair.from_seed(bytes([i + 1]) * 32) for i in range(n)]


def state(doc: Document) -> tuple:
    return (
        doc.get_map("m").to_py(),
        doc.get_array("a").to_py(),
        str(doc.get_text("t")),
        doc.counter("c", "hits"),
    )


def edit(doc: Document, tag: str) -> None:
    doc.get_map("m")[tag] = tag
    doc.get_map("m")["shared"] = tag
    with doc.transaction():
        doc.get_array("a").append(tag)
        doc.get_text("t").insert(0, tag)
    doc.increment("c", "hits", 2)


def test_two_replicas_converge_any_order_with_duplicates(tmp_path: Path) -> None:
    a_key, b_key = keys(2)
    a = Document(NAME, a_key, tmp_path / "a")
    b = Document(NAME, b_key, tmp_path / "b")
    edit(a, "A1")
    edit(b, "B1")
    edit(a, "A2")
    edit(b, "B2")
    seen = []
    a.observe(seen.append)
    to_b = a.missing_for(b.version())
    to_a = b.missing_for(a.version())
    rng = random.Random(7)
    rng.shuffle(to_b)
    rng.shuffle(to_a)
    for u in to_b + to_b[:3]:
        b.apply(u)
    for u in to_a + to_a[:3]:
        a.apply(u)
    assert a.stats.duplicates == 3 and b.stats.duplicates == 3
    assert state(a) == state(b)
    assert state(a)[3] == 8
    assert sorted(state(a)[1]) == ["A1", "A2", "B1", "B2"]
    assert a.version() == b.version() == {str(a_key.peer_id): 8, str(b_key.peer_id): 8}
    assert a.missing_for(b.version()) == [] and len(seen) == len(to_a)
    assert all(not c.local and c.author == b_key.peer_id for c in seen)
    # a third replica fed in reverse order converges too
    c = Document(NAME, keys(3)[2], tmp_path / "c")
    for u in reversed(a.updates()):
        c.apply(u)
    assert state(c) == state(a)


def test_rejections_leave_state_unchanged(tmp_path: Path) -> None:
    owner, intruder, reader = keys(3)
    src = Document(NAME, owner, tmp_path / "src")
    src.get_map("m")["x"] = 1
    good = src.updates()[0]
    doc = Document(NAME, reader, tmp_path / "dst", writers={owner.peer_id}, max_bytes=10_000)
    before = state(doc)
    forged = dataclasses.replace(good, signature=bytes(64))
    tampered = dataclasses.replace(good, data=good.data[:-1] + b"\x01")
    wrong_doc = sign(owner, "other", 1, good.data)
    evil = Document(NAME, intruder, tmp_path / "evil")
    evil.get_map("m")["x"] = 666
    unauthorized = evil.updates()[0]
    huge = dataclasses.replace(good, seq=2, data=b"\0" * (MAX_UPDATE + 1))
    over_doc = sign(owner, NAME, 3, b"\0" * 20_000)
    renumbered = dataclasses.replace(good, seq=9)
    for bad in (forged, tampered, wrong_doc, unauthorized, huge, over_doc, renumbered):
        assert doc.apply(bad) is False
    s = doc.stats
    assert (s.rejected_signature, s.rejected_doc, s.rejected_access, s.rejected_size) == (3, 1, 1, 2)
    assert state(doc) == before and doc.version() == {}
    assert doc.apply(good) is True and doc.get_map("m").to_py() == {"x": 1.0}
    # a node without write access cannot write locally either, and its state is rolled back
    with pytest.raises(AccessDenied), doc.transaction():
        doc.get_map("m")["y"] = 2
    with pytest.raises(AccessDenied):
        doc.increment("c", "hits")
    with pytest.raises(ExceptionGroup) as info:
        doc.get_map("m")["z"] = 3
    assert info.group_contains(AccessDenied)
    assert doc.get_map("m").to_py() == {"x": 1.0}
    doc.close()
    assert Document(NAME, reader, tmp_path / "dst").get_map("m").to_py() == {"x": 1.0}


def test_encode_decode_and_malformed() -> None:
    (k,) = keys(1)
    u = sign(k, NAME, 5, b"\x00\x00")
    assert SignedUpdate.decode(u.encode()) == u and u.verify()
    for raw in (b"", b"\xc1", b"\x93\x01\x02\x03", u.encode()[:-3]):
        with pytest.raises(PayloadError):
            SignedUpdate.decode(raw)
    with pytest.raises(PayloadError):
        sign(k, "x" * 201, 1, b"")
    with pytest.raises(PayloadError):
        sign(k, NAME, 0, b"")


def test_restart_restores_state(tmp_path: Path) -> None:
    (k,) = keys(1)
    doc = Document(NAME, k, tmp_path)
    edit(doc, "one")
    edit(doc, "two")
    expected, version = state(doc), doc.version()
    doc.close()
    assert os.stat(log_path(tmp_path, NAME)).st_mode & 0o777 == 0o600
    again = Document(NAME, k, tmp_path)
    assert state(again) == expected and again.version() == version
    edit(again, "three")  # seqs continue after a restart
    assert again.version()[str(k.peer_id)] == version[str(k.peer_id)] + 4


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_torn_tail_is_dropped(tmp_path: Path, damage: str) -> None:
    (k,) = keys(1)
    doc = Document(NAME, k, tmp_path)
    for i in range(10):
        doc.get_map("m")[str(i)] = i
    doc.close()
    path = log_path(tmp_path, NAME)
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[:-5]
    else:
        raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))
    again = Document(NAME, k, tmp_path)
    assert again.get_map("m").to_py() == {str(i): float(i) for i in range(9)}
    assert again._log.dropped_bytes > 0
    again.get_map("m")["new"] = 1  # appends after the cut, not behind garbage
    again.close()
    third = Document(NAME, k, tmp_path)
    assert len(third.get_map("m").to_py()) == 10 and third._log.dropped_bytes == 0


def test_compaction_keeps_state(tmp_path: Path) -> None:
    (k,) = keys(1)
    doc = Document(NAME, k, tmp_path)
    for _ in range(50):
        doc.increment("c", "hits")
    expected = state(doc)
    with open(log_path(tmp_path, NAME), "ab") as f:
        f.write(b"\x00\x00\x01")  # garbage a compaction must drop
    before = doc.log_size()
    doc.compact()
    assert doc.log_size() <= before
    doc.close()
    assert state(Document(NAME, k, tmp_path)) == expected


CHILD = """
import sys
sys.path.insert(0, {src!r})
from lattice.crdt import Document
from lattice.identity import KeyPair
doc = Document("swarm/config", KeyPair.from_seed(b"\\x07" * 32), {dir!r})
m = doc.get_map("m")
for i in range(1000):
    m[str(i)] = i
    sys.stdout.write(f"{{i}}\\n")
    sys.stdout.flush()
"""


def test_sigkill_keeps_every_acknowledged_write(tmp_path: Path) -> None:
    code = CHILD.format(src=SRC, dir=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    acked: list[int] = []
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    while len(acked) < 300 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        acked.append(int(line))
    proc.send_signal(signal.SIGKILL)
    rest = proc.stdout.read()  # lines already written before the kill were acknowledged too
    acked.extend(int(x) for x in rest.split())
    proc.wait()
    assert len(acked) >= 300, "child did not acknowledge enough writes"
    doc = Document(NAME, KeyPair.from_seed(b"\x07" * 32), tmp_path)
    present = doc.get_map("m").to_py()
    assert all(str(i) in present for i in acked)
    assert set(present) == {str(i) for i in range(len(present))}  # a prefix: nothing out of order
    assert len(present) < 1000 or len(acked) == 1000


def test_update_log_roundtrip(tmp_path: Path) -> None:
    (k,) = keys(1)
    log = UpdateLog(tmp_path / "x.log", fsync="batch")
    ups = [sign(k, NAME, i, bytes([i])) for i in range(1, 6)]
    for u in ups:
        log.append(u)
    log.close()
    assert list(UpdateLog(tmp_path / "x.log").replay()) == ups


def test_remote_batches_follow_the_fsync_policy(tmp_path: Path, monkeypatch) -> None:
    """ "always" fsyncs every applied batch; "batch" group-commits them (at most every BATCH_SECONDS)."""
    from lattice.crdt import log as log_module

    writer = Document("pol", KeyPair.generate(), tmp_path / "w")
    for i in range(3):
        writer.get_map("root")[f"k{i}"] = i
    batches = [[u] for u in writer.updates()]
    fsyncs = []
    real_fsync = os.fsync
    monkeypatch.setattr(log_module.os, "fsync", lambda fd: fsyncs.append(fd) or real_fsync(fd))
    for policy, expected in (("always", 3), ("batch", 0)):
        reader = Document("pol", KeyPair.generate(), tmp_path / policy, fsync=policy)
        fsyncs.clear()  # creating the log fsyncs its directory
        reader._log._last_sync = time.monotonic()  # a sync just happened: the next is not due yet
        for batch in batches:
            assert reader.apply_many(batch) == 1
        assert len(fsyncs) == expected
        reader.close()  # closing syncs whatever is pending
        assert reader.get_map("root").to_py() == {"k0": 0, "k1": 1, "k2": 2}


def test_a_hash_chained_batch_costs_one_verification_and_catches_tampering(tmp_path, monkeypatch):
    from lattice.crdt import Document, SignedUpdate

    writer = Document("chain", KeyPair.generate(), tmp_path / "w")
    for i in range(50):
        writer.get_map("root")[f"k{i}"] = i
    batch = writer.updates()
    calls = []
    real_verify = SignedUpdate.verify
    monkeypatch.setattr(SignedUpdate, "verify", lambda self: calls.append(self.seq) or real_verify(self))
    reader = Document("chain", KeyPair.generate(), tmp_path / "r")
    assert reader.apply_many(batch) == 50 and calls == [50]  # one signature for the whole run
    assert reader.get_map("root").to_py() == writer.get_map("root").to_py()
    # a tampered update in the middle breaks the chain: it is checked alone and rejected
    calls.clear()
    other = Document("chain", KeyPair.generate(), tmp_path / "o")
    forged = [dataclasses.replace(u, data=batch[0].data) if u.seq == 25 else u for u in batch]
    assert other.apply_many(forged) == 24 and other.stats.rejected_signature == 1
    assert 25 in calls
    assert other.stats.held == 25 and other.version() == {str(writer.keypair.peer_id): 24}  # 26..50 wait
    assert other.apply(batch[24]) and other.version() == {str(writer.keypair.peer_id): 50}


def test_deferred_writes_are_durable_after_flush_and_share_one_fsync(tmp_path, monkeypatch) -> None:
    """Group commit: writes inside deferred() are logged at once (readable after a crash of the
    process), fsynced by the next flush() in a worker thread: one fsync for all of them."""
    import trio

    from lattice.crdt import log as log_module

    doc = Document("gc", KeyPair.generate(), tmp_path / "d")
    fsyncs = []
    real_fsync = os.fsync
    monkeypatch.setattr(log_module.os, "fsync", lambda fd: fsyncs.append(fd) or real_fsync(fd))
    for i in range(20):
        with doc.deferred():
            doc.get_map("root")[f"k{i}"] = i
    assert doc.unsynced() == 20 and fsyncs == []
    assert len(list(UpdateLog(log_path(tmp_path / "d", "gc")).replay())) == 20  # already in the file

    async def flush_concurrently() -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(doc.flush)

    trio.run(flush_concurrently)
    assert doc.unsynced() == 0 and len(fsyncs) == 1
    doc.get_map("root")["plain"] = 1  # outside deferred(): fsynced before the write returns
    assert doc.unsynced() == 0 and len(fsyncs) == 2
    doc.close()
    again = Document("gc", KeyPair.generate(), tmp_path / "d")
    assert len(again.get_map("root").to_py()) == 21


def test_sync_in_a_thread_races_appends_and_compaction_without_losing_frames(tmp_path: Path) -> None:
    import threading

    (k,) = keys(1)
    log = UpdateLog(tmp_path / "r.log")
    ups = [sign(k, NAME, i, bytes([i % 256])) for i in range(1, 401)]
    stop = threading.Event()

    def syncer() -> None:
        while not stop.is_set():
            log.sync()

    thread = threading.Thread(target=syncer)
    thread.start()
    try:
        for i, u in enumerate(ups):
            log.append(u, sync=False)
            if i % 100 == 99:
                log.compact(ups[: i + 1])
    finally:
        stop.set()
        thread.join(10)
    log.sync()
    assert log.unsynced == 0
    log.close()
    assert list(UpdateLog(tmp_path / "r.log").replay()) == ups


def test_a_malformed_update_in_a_batch_rejects_only_itself(tmp_path: Path) -> None:
    """One scratch doc checks a whole batch's Yjs data; after a bad update it starts afresh."""
    a_key, b_key = keys(2)
    writer = Document("mix", a_key, tmp_path / "w")
    other = Document("mix", b_key, tmp_path / "o")
    for i in range(3):
        writer.get_map("root")[f"w{i}"] = i
        other.get_map("root")[f"o{i}"] = i
    bad = sign(KeyPair.from_seed(b"\x09" * 32), "mix", 1, b"\xff\xfe garbage")
    batch = [*writer.updates()[:2], bad, *other.updates(), *writer.updates()[2:]]
    reader = Document("mix", KeyPair.generate(), tmp_path / "r")
    assert reader.apply_many(batch) == 6
    assert reader.stats.rejected_malformed == 1
    assert reader.get_map("root").to_py() == {"w0": 0, "w1": 1, "w2": 2, "o0": 0, "o1": 1, "o2": 2}
