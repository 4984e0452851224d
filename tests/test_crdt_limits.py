"""What a writer can make a CRDT document hold (issue 16, defect 11): Yjs data checked also beyond a
sequence gap, bounded held (out-of-order) updates, per-author quotas, a clear DocumentFull, and a log
that cannot bring junk back after a restart."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lattice.crdt import Document, DocumentFull, SignedUpdate, UpdateLog, log_path, sign
from lattice.identity import KeyPair

NAME = "open/doc"


def keys(n: int) -> list[KeyPair]:
    return [KeyPair.from_seed(bytes([i + 40]) * 32) for i in range(n)]


def genuine(key: KeyPair, directory: Path, n: int, size: int = 8) -> list[SignedUpdate]:
    """``n`` real signed updates of ``key`` (seqs 1..n, one map key of ``size`` characters each)."""
    writer = Document(NAME, key, directory, writers={key.peer_id}, max_bytes=1 << 24)
    for i in range(n):
        writer.get_map("m")[f"{key.peer_id.short()}-{i}"] = "v" * size
    writer.close()
    return writer.updates()


def frames(directory: Path) -> list[SignedUpdate]:
    return list(UpdateLog(log_path(directory, NAME)).replay())


def test_gap_updates_with_junk_yjs_data_are_rejected_and_never_stored(tmp_path: Path) -> None:
    rogue, reader = keys(2)
    (first,) = genuine(rogue, tmp_path / "w", 1)
    doc = Document(NAME, reader, tmp_path / "r", max_bytes=200_000)
    assert doc.apply(first)
    junk = [sign(rogue, NAME, seq, os.urandom(4_000)) for seq in range(6, 106)]  # seq n+5 on: a gap
    assert doc.apply_many(junk) == 0
    assert doc.stats.rejected_malformed == 100 and doc.stats.invalid == 100
    assert doc.pending_count() == 0 and doc.size() == len(first.data)
    assert doc.missing_for({}) == [first]  # nothing of it is offered to other replicas
    doc.get_map("m")["mine"] = 1  # the document still takes writes
    doc.close()
    assert all(f.seq == 1 for f in frames(tmp_path / "r"))  # nor is it on disk


def test_held_updates_are_bounded_released_in_order_and_never_passed_on(tmp_path: Path) -> None:
    from lattice.crdt import DocLimits

    author, reader = keys(2)
    ups = genuine(author, tmp_path / "w", 60)
    doc = Document(NAME, reader, tmp_path / "r", limits=DocLimits(max_pending=10))
    seen: list[int] = []
    doc.observe(lambda change: seen.append(change.seq))
    assert doc.apply(ups[0])
    assert doc.apply_many(ups[2:]) == 0  # 58 beyond the gap at seq 2: 10 held, the rest dropped
    assert (doc.stats.held, doc.stats.dropped_pending, doc.pending_count()) == (10, 48, 10)
    assert doc.version() == {str(author.peer_id): 1} and doc.missing_for({}) == [ups[0]]
    assert doc.size() == len(ups[0].data) and seen == [1]  # held: not counted, not observed
    assert doc.apply(ups[1])  # the gap is filled: the held run follows, in order
    assert doc.version() == {str(author.peer_id): 12} and doc.pending_count() == 0
    assert seen == list(range(1, 13))
    doc.apply_many(ups[12:])  # what anti-entropy sends next (in order, from the version)
    assert doc.version() == {str(author.peer_id): 60} and len(doc.get_map("m").to_py()) == 60
    doc.close()
    assert [f.seq for f in frames(tmp_path / "r")] == list(range(1, 61))
    # the bytes are bounded too, per author and per document
    big = genuine(author, tmp_path / "w2", 20, size=2_000)
    limits = DocLimits(max_pending_bytes=10_000, max_pending_total=15_000)
    other = Document(NAME, reader, tmp_path / "r2", limits=limits)
    other.apply_many(big[1:])
    assert 0 < other.pending_bytes() <= 10_000 and other.stats.dropped_pending > 0
    more = genuine(keys(3)[2], tmp_path / "w3", 20, size=2_000)
    other.apply_many(more[1:])
    assert other.pending_bytes() <= 15_000


def test_a_legitimately_out_of_order_arrival_converges(tmp_path: Path) -> None:
    """Gossip may deliver n+1..n+3 before n: they wait (with the default limits) and apply once n
    arrives; nothing has to be fetched again."""
    author, reader = keys(2)
    ups = genuine(author, tmp_path / "w", 5)
    doc = Document(NAME, reader, tmp_path / "r")
    seen: list[int] = []
    doc.observe(lambda change: seen.append(change.seq))
    assert doc.apply(ups[0])
    assert all(doc.apply(u) for u in ups[2:])  # taken (held), not applied yet
    assert seen == [1] and doc.version() == {str(author.peer_id): 1}
    assert doc.apply(ups[1])
    assert seen == [1, 2, 3, 4, 5] and doc.version() == {str(author.peer_id): 5}
    assert len(doc.get_map("m").to_py()) == 5 and doc.pending_count() == 0
    assert doc.apply(ups[3]) is False and doc.stats.duplicates == 1


def test_one_author_cannot_fill_an_open_document(tmp_path: Path) -> None:
    flooder, honest, reader = keys(3)
    doc = Document(NAME, reader, tmp_path / "r", max_bytes=20_000)
    assert doc.max_author_bytes == 5_000  # default: a quarter of the document per author
    doc.apply_many(genuine(flooder, tmp_path / "f", 40, size=400))  # 16 KB of valid updates
    assert doc.stats.rejected_quota > 0 and doc.size() <= 5_000
    assert doc.apply_many(genuine(honest, tmp_path / "h", 5, size=400)) == 5  # others still get in
    doc.get_map("m")["local"] = "x"  # so does the local writer
    with pytest.raises(DocumentFull) as info, doc.transaction():  # within its own share only
        doc.get_map("m")["big"] = "y" * 6_000
    message = str(info.value)
    assert "\n" not in message and repr(NAME) in message and "per-author limit of 5000 bytes" in message
    assert "big" not in doc.get_map("m").to_py()
    # with a writer list each writer gets an equal share; one writer gets the whole document
    pair = {flooder.peer_id, honest.peer_id}
    assert Document("pair", reader, tmp_path / "p", writers=pair, max_bytes=20_000).max_author_bytes == 10_000
    solo = Document("solo", reader, tmp_path / "s", writers={reader.peer_id}, max_bytes=20_000)
    assert solo.max_author_bytes == 20_000


def test_junk_logged_by_an_older_version_is_dropped_when_the_document_opens(tmp_path: Path) -> None:
    """Older versions logged updates beyond a gap without checking them: 71 such updates made a
    document unwritable, also after a restart. Opening checks them and rewrites the log."""
    rogue, owner, other = keys(3)
    directory = tmp_path / "d"
    doc = Document(NAME, owner, directory, max_bytes=100_000)
    doc.get_map("m")["a"] = 1
    doc.close()
    held = genuine(other, tmp_path / "o", 3)[2]  # valid, but seq 3 of an author we hold nothing of
    log = UpdateLog(log_path(directory, NAME))
    for seq in range(6, 77):  # 71 junk updates of 4 KB: more than max_bytes
        log.append(sign(rogue, NAME, seq, os.urandom(4_000)), sync=False)
    log.append(held)
    log.close()
    again = Document(NAME, owner, directory, max_bytes=100_000)
    assert again.size() < 100 and again.pending_count() == 1  # the valid one waits for its gap
    again.get_map("m")["b"] = 2  # writable
    again.close()
    assert {f.author for f in frames(directory)} == {owner.peer_id}  # junk and held: off the disk
    assert Document(NAME, owner, directory).get_map("m").to_py() == {"a": 1.0, "b": 2.0}
